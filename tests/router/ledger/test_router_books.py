"""The router's books on each backend, through its HTTP API: remembered answers, usage records, a 200-way race
on one account, and a router process killed with SIGKILL at random moments under load, then restarted."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from contextlib import suppress
from pathlib import Path

import httpx

from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import ADMIN_KEY, Herd
from tests.support.ports import free_port
from tests.support.servers import RunningServer

ROOT = Path(__file__).parents[3]


async def test_a_200_way_race_on_one_account_never_overdraws(url: str, herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=8, script=Script(tokens=2, token_delay=0.001)))
    await herd.start(db=url)
    hold = 10 + (1 + 4) + 2 * 20  # what one request holds
    alice = await herd.account("alice", hold * 30 + 5)
    async with alice:
        results = await asyncio.gather(
            *(alice.post("/v1/completions", json={"prompt": "x", "max_tokens": 20}) for _ in range(200))
        )
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 402}, [r.text for r in results if r.status_code not in (200, 402)]
        # Every request that held money was served; every other one was refused with the amounts.
        assert codes.count(200) >= 30
        for refused in (r for r in results if r.status_code == 402):
            error = refused.json()["error"]
            assert error["code"] == "insufficient_funds" and error["needed"] == hold and error["balance"] < hold
        spent = sum(r.json()["usage"]["cost_credits"] for r in results if r.status_code == 200)
        account = (await alice.get("/v1/account")).json()
        assert account["spent"] == spent and account["balance"] == hold * 30 + 5 - spent >= 0
        assert account["held"] == 0


async def test_remembered_answers_and_usage_records(url: str, herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start(db=url)
    alice = await herd.account("alice", 10_000)
    async with alice:
        body = {"prompt": "one two three four", "max_tokens": 5}
        first = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "call-1"})
        again = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "call-1"})
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
        reused = await alice.post(
            "/v1/completions", json={**body, "max_tokens": 4}, headers={"Idempotency-Key": "call-1"}
        )
        assert reused.status_code == 422
        second = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "call-2"})
        assert len(node.received) == 2
        usage = (await alice.get("/v1/account/usage", params={"limit": 1})).json()
        assert [u["request_id"] for u in usage["data"]] == [second.headers["X-Llamakit-Request-Id"]]
        older = (await alice.get("/v1/account/usage", params={"before": usage["next_before"]})).json()["data"]
        assert [u["request_id"] for u in older] == [first.headers["X-Llamakit-Request-Id"]]
        record = older[0]
        assert (record["status"], record["prompt_tokens"], record["completion_tokens"]) == ("ok", 7, 5)
        charged = first.json()["usage"]["cost_credits"]
        assert record["cost_credits"] == charged == int(first.headers["X-Llamakit-Cost-Credits"])
        assert record["cost"] == first.json()["usage"]["cost"]
        account = (await alice.get("/v1/account")).json()
        assert account["spent"] == record["cost_credits"] + second.json()["usage"]["cost_credits"]


async def _start_router(db: str, node_url: str) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", db, "--node", node_url,
        "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN, "--health-interval", "0.1",
        cwd=ROOT, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(300):
            try:
                if (await client.get("/health")).json().get("ready") == 1:
                    return process, url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError("the router did not come up")


async def _load(url: str, key: str) -> None:
    """Requests without end, 24 at a time, streamed and whole, until the router dies under them."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:

        async def one(i: int) -> None:
            while True:
                body = {"prompt": "one two three", "max_tokens": 8, "stream": i % 2 == 0}
                await client.post("/v1/completions", json=body)

        await asyncio.gather(*(one(i) for i in range(24)))


async def test_a_router_killed_under_load_leaves_balanced_books_and_releases_its_holds(url: str) -> None:
    node = await RunningServer(FakeNode("n1", slots=8, script=Script(tokens=6, token_delay=0.003)).app()).start()
    try:
        router, router_url = await _start_router(url, node.url)
        admin = httpx.AsyncClient(base_url=router_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        async with admin:
            created = await admin.post("/admin/accounts", json={"name": "alice", "deposit": 10**9})
        key = created.json()["api_key"]
        served = 0
        for _ in range(3):
            load = asyncio.ensure_future(_load(router_url, key))
            await asyncio.sleep(random.uniform(0.5, 1.5))
            router.send_signal(signal.SIGKILL)
            assert await router.wait() == -signal.SIGKILL
            with suppress(httpx.TransportError):  # the clients saw their router die
                await load
            router, router_url = await _start_router(url, node.url)
            admin = httpx.AsyncClient(base_url=router_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            async with admin:
                books = (await admin.get("/admin/books")).json()
                assert books["balanced"] and books["holds"] == 0, books
                usage = (await admin.get("/admin/usage", params={"limit": 1000})).json()["data"]
            assert len(usage) > served  # requests were paid before each kill
            served = len(usage)
            statuses = {u["status"] for u in usage}
            assert statuses <= {"ok", "recovered", "cut", "cancelled", "error", "rejected", "broken"}, statuses
        assert "recovered" in statuses  # a kill caught requests in flight, and their holds were released
        router.send_signal(signal.SIGTERM)
        await router.wait()
    finally:
        await node.stop()
