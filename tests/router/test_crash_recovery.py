"""A router killed mid-request leaves holds open in its ledger; the next router on that file closes them, charging
what its streams had delivered by their last checkpoint."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llamakit.router.ledger import ledger_at
from tests.router.ledger.conftest import backend_url
from tests.support.crashes import CHECKPOINT_FLAGS, CHECKPOINT_TOKENS, PROMPT_TOKENS, STALL, stream_until_killed
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import ADMIN_KEY, Herd
from tests.support.ports import free_port

PROMPT = "one two three four"

# What a router does up to the moment it is killed: an account with money, one request settled and two
# requests holding credits, then SIGKILL, so nothing is closed, flushed or checkpointed.
KILLED_ROUTER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from llamakit.router.ledger import ledger_at

    async def main() -> None:
        ledger = ledger_at(sys.argv[1])
        await ledger.open()
        account = await ledger.create_account("alice")
        print(await ledger.create_key(account.id), flush=True)
        await ledger.deposit(account.id, 1000)
        await ledger.hold(account.id, 100, request_id="req-done", model="fake-model")
        await ledger.settle("req-done", charge=60, node="n1", prompt_tokens=10, completion_tokens=20)
        await ledger.hold(account.id, 300, request_id="req-open-1", model="fake-model", bid="1")
        await ledger.hold(account.id, 250, request_id="req-open-2", model="fake-model", bid="1.5")
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def killed_router(db: Path) -> str:
    """Run a 'router' that is killed with two holds open on `db`; returns alice's API key."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_ROUTER, str(db), stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    out, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return out.decode().strip()


async def test_startup_releases_the_holds_of_a_killed_router(
    herd: Herd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = await killed_router(tmp_path / "ledger.db")
    async with ledger_at(tmp_path / "ledger.db") as before:  # what the killed router left: two open holds
        left = await before.books()
        assert (left.deposits, left.balances, left.holds, left.charges) == (1000, 390, 550, 60)

    caplog.set_level(logging.INFO)
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    router = await herd.start()
    assert "released 2 hold(s)" in caplog.text
    assert await herd.books() == {"deposits": 1000, "balances": 940, "holds": 0, "charges": 60, "balanced": True}
    async with httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {key}"}) as alice:
        account = (await alice.get("/v1/account")).json()
        assert (account["balance"], account["held"], account["spent"]) == (940, 0, 60)
        usage = {u["request_id"]: u for u in (await alice.get("/v1/account/usage")).json()["data"]}
        assert {r: (u["status"], u["cost_credits"], u["held"]) for r, u in usage.items()} == {
            "req-done": ("ok", 60, 100),
            "req-open-1": ("recovered", 0, 300),
            "req-open-2": ("recovered", 0, 250),
        }
        assert usage["req-open-2"]["bid"] == "1.5" and usage["req-open-1"]["error"]
        # The account works as before.
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert resp.status_code == 200
        spent = int(resp.headers["X-Llamakit-Cost-Credits"])
        assert (await alice.get("/v1/account")).json()["balance"] == 940 - spent
    # Recovery released only what a dead router held: nothing was released twice, no stats were skewed.
    stats = (await herd.admin.get("/admin/stats")).json()  # type: ignore[union-attr]
    assert stats["fees"]["earned"] == 60 + spent and stats["fees"]["by_node"] == {"n1": 60 + spent}


async def test_a_restart_after_a_clean_stop_releases_nothing(herd: Herd, caplog: pytest.LogCaptureFixture) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    router = await herd.start()
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})).status_code == 200
    before = await herd.books()
    await herd.admin.aclose()  # type: ignore[union-attr]
    await router.stop()
    caplog.set_level(logging.INFO)
    caplog.clear()
    await herd.start()
    assert "released" not in caplog.text
    assert await herd.books() == before
    usage = (await herd.admin.get("/admin/usage")).json()["data"]  # type: ignore[union-attr]
    assert [u["status"] for u in usage] == ["ok"]


async def test_holds_left_by_a_closed_ledger_are_released_too(herd: Herd, tmp_path: Path) -> None:
    # The same through an orderly close that skipped settling (a router whose shutdown was cut short).
    async with ledger_at(tmp_path / "ledger.db") as ledger:
        account = await ledger.create_account("bob")
        await ledger.deposit(account.id, 500)
        for i in range(3):
            await ledger.hold(account.id, 100, request_id=f"req-{i}", model="fake-model")
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    bob = (await herd.admin.get("/admin/accounts/bob")).json()
    assert (bob["balance"], bob["held"], bob["spent"]) == (500, 0, 0)
    usage = (await herd.admin.get("/admin/usage")).json()["data"]
    assert sorted((u["request_id"], u["status"], u["cost_credits"]) for u in usage) == [
        (f"req-{i}", "recovered", 0) for i in range(3)
    ]


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A SQLite file, or a fresh PostgreSQL schema (skipped without LLAMAKIT_TEST_POSTGRES)."""
    async with backend_url(request.param, tmp_path) as url:
        yield url


async def spawn_router(db: str, node_url: str, log: Path, *flags: str) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m llamakit.router` on `db` in front of the node at `node_url`, once it has the node ready."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", db, "--node", node_url,
        "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN, "--health-interval", "0.1", "--base-fee", "10",
        "--prompt-token-fee", "1", "--completion-token-fee", "2", *flags,
        cwd=Path(__file__).parents[2], stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(300):
            try:
                if (await client.get("/health")).json().get("ready") == 1:
                    return process, url
            except httpx.TransportError:
                pass
            if process.returncode is not None:
                break
            await asyncio.sleep(0.05)
    process.kill()
    raise AssertionError(f"the router did not come up; its output is in {log}")


async def test_a_killed_routers_stream_is_charged_what_it_delivered(
    ledger_url: str, herd: Herd, tmp_path: Path
) -> None:  # ledger_url first: its schema outlives the herd's last look at the books
    await herd.add_node(FakeNode("n1", script=Script(tokens=64, token_delay=0.01, stall_after=STALL)))
    router, url = await spawn_router(ledger_url, herd.node_url("n1"), tmp_path / "router.log", *CHECKPOINT_FLAGS)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        made = await admin.post("/admin/accounts", json={"name": "alice", "deposit": 10_000})
        key = made.json()["api_key"]

    async def kill() -> None:
        router.send_signal(signal.SIGKILL)
        assert await router.wait() == -signal.SIGKILL

    request_id, delivered = await asyncio.wait_for(stream_until_killed(url, key, ledger_url, kill), 60)
    assert delivered == STALL
    async with ledger_at(ledger_url) as ledger:  # what the killed router left: an open hold, balanced books
        left = await ledger.books()
        assert left.balanced and left.holds > 0 and left.charges == 0

    await herd.start(db=ledger_url)  # the restart, on the same books
    assert herd.admin is not None
    [record] = (await herd.admin.get("/admin/usage")).json()["data"]
    assert (record["request_id"], record["status"], record["node"]) == (request_id, "recovered", "n1")
    tokens = record["completion_tokens"]
    assert delivered - CHECKPOINT_TOKENS < tokens <= delivered
    assert record["prompt_tokens"] == PROMPT_TOKENS
    assert record["cost_credits"] == 10 + PROMPT_TOKENS + 2 * tokens < record["held"]  # at the fees, within the hold
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0 and books["charges"] == record["cost_credits"]
    alice = (await herd.admin.get("/admin/accounts/alice")).json()
    charged = record["cost_credits"]
    assert (alice["balance"], alice["held"], alice["spent"]) == (10_000 - charged, 0, charged)


async def test_a_killed_routers_stream_pays_the_cached_fee_for_its_cached_tokens(
    ledger_url: str, herd: Herd, tmp_path: Path
) -> None:
    """Its checkpoints carry the prompt tokens the node's cache held: the recovered record is charged and reads as a
    cut stream's (docs/money.md#cached-prompt-tokens). Prompt fee 1, cached fee 0: each cached token saves 1."""
    await herd.add_node(FakeNode("n1", script=Script(tokens=64, token_delay=0.01, stall_after=STALL, cache=True)))
    flags = (*CHECKPOINT_FLAGS, "--cached-prompt-token-fee", "0")
    router, url = await spawn_router(ledger_url, herd.node_url("n1"), tmp_path / "router.log", *flags)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        key = (await admin.post("/admin/accounts", json={"name": "alice", "deposit": 10_000})).json()["api_key"]
        warm = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 2}  # the node's cache now holds PROMPT
        resp = await admin.post("/v1/completions", json=warm, headers={"Authorization": f"Bearer {key}"})
        assert resp.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

    async def kill() -> None:
        router.send_signal(signal.SIGKILL)
        assert await router.wait() == -signal.SIGKILL

    request_id, delivered = await asyncio.wait_for(stream_until_killed(url, key, ledger_url, kill), 60)
    await herd.start(db=ledger_url)
    assert herd.admin is not None
    record = next(r for r in (await herd.admin.get("/admin/usage")).json()["data"] if r["request_id"] == request_id)
    tokens = record["completion_tokens"]
    assert record["status"] == "recovered" and delivered - CHECKPOINT_TOKENS < tokens <= delivered
    cached = len(PROMPT.split())  # the fake node's cache: the words of the earlier prompt
    assert (record["prompt_tokens"], record["cached_tokens"]) == (PROMPT_TOKENS, cached)
    assert record["cost_credits"] == 10 + (PROMPT_TOKENS - cached) + 2 * tokens
    assert record["cache_discount_credits"] == cached
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0
