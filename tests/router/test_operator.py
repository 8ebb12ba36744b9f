"""The operator's routes: accounts and deposits, fees that take effect at once, info, stats, the stats stream
and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import httpx

from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"  # the fake node counts 4 + 3 = 7 prompt tokens


def cost(prompt: int, completion: int, *, base: int = 10, per_prompt: int = 1, per_completion: int = 2) -> int:
    return base + per_prompt * prompt + per_completion * completion


async def test_create_an_account_with_a_deposit_then_deposit_more(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    resp = await herd.admin.post("/admin/accounts", json={"name": "carol", "kind": "agent", "deposit": 1234})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert created["api_key"].startswith("lk-")
    assert (created["name"], created["kind"], created["balance"], created["deposited"]) == (
        "carol",
        "agent",
        1234,
        1234,
    )
    resp = await herd.admin.post("/admin/accounts/carol/deposits", json={"amount": 766, "note": "top-up"})
    assert resp.status_code == 201 and resp.json() == {"account": "carol", "deposited": 766, "balance": 2000}
    # By id as well as by name.
    resp = await herd.admin.post(f"/admin/accounts/{created['id']}/deposits", json={"amount": 1})
    assert resp.json()["balance"] == 2001
    carol = httpx.AsyncClient(base_url=herd.router.url, headers={"Authorization": f"Bearer {created['api_key']}"})  # type: ignore[union-attr]
    async with carol:
        mine = (await carol.get("/v1/account")).json()
    assert (mine["balance"], mine["deposited"], mine["spent"], mine["held"]) == (2001, 2001, 0, 0)
    assert (await herd.books())["deposits"] == 2001
    # A taken name is 409 and changes nothing; an unknown account is 404.
    resp = await herd.admin.post("/admin/accounts", json={"name": "carol", "deposit": 5})
    assert resp.status_code == 409
    assert (await herd.admin.post("/admin/accounts/nobody/deposits", json={"amount": 5})).status_code == 404
    assert (await herd.books())["deposits"] == 2001


async def test_deposits_of_anything_but_a_positive_whole_number_are_400(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    await herd.account("dave", 100)
    for amount in (0, -5, 1.5, "10", True, None, [10], 10**16):
        resp = await herd.admin.post("/admin/accounts/dave/deposits", json={"amount": amount})
        assert resp.status_code == 400, (amount, resp.text)
        error = resp.json()["error"]
        assert error["param"] == "amount" or "amount" in error["message"], (amount, error)
    resp = await herd.admin.post("/admin/accounts/dave/deposits", json={})
    assert resp.status_code == 400
    # A deposit the ledger cannot hold is refused whole, not half-done (account made, money not deposited).
    resp = await herd.admin.post("/admin/accounts/dave/deposits", json={"amount": 10**15 - 100})
    assert resp.status_code == 201 and resp.json()["balance"] == 10**15
    resp = await herd.admin.post("/admin/accounts/dave/deposits", json={"amount": 1})
    assert resp.status_code == 400 and "at most" in resp.json()["error"]["message"]
    for deposit in (-5, 1.5, "10", True, 10**16):
        resp = await herd.admin.post("/admin/accounts", json={"name": f"erin-{deposit}", "deposit": deposit})
        assert resp.status_code == 400, (deposit, resp.text)
    assert [a["name"] for a in (await herd.admin.get("/admin/accounts")).json()["data"]] == ["dave"]
    assert (await herd.admin.get("/admin/accounts/dave")).json()["balance"] == 10**15
    assert (await herd.books())["deposits"] == 10**15


async def test_new_fees_price_the_very_next_request(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 5}
    assert (await alice.post("/v1/completions", json=body)).json()["usage"]["cost_credits"] == cost(7, 5)

    new = {"base_fee": 100, "prompt_token_fee": 3, "completion_token_fee": 7}
    resp = await herd.admin.put("/admin/fees/fake-model", json=new)
    assert resp.status_code == 200 and resp.json() == {"model": "fake-model", **new}
    resp = await alice.post("/v1/completions", json=body)
    assert resp.json()["usage"]["cost_credits"] == 100 + 3 * 7 + 7 * 5 == int(resp.headers["X-Llamakit-Cost-Credits"])
    resp = await alice.post("/v1/completions", json={**body, "bid": 1.5})
    assert resp.json()["usage"]["cost_credits"] == math.ceil(1.5 * (100 + 3 * 7 + 7 * 5))
    spent = cost(7, 5) + 156 + 234
    assert (await alice.get("/v1/account")).json()["spent"] == spent
    # Fees are shown to everyone; bad fee schedules are refused and leave the price as it was.
    fees = (await herd.admin.get("/admin/fees")).json()
    assert fees["fake-model"] == new and fees["*"] == {"base_fee": 10, "prompt_token_fee": 1, "completion_token_fee": 2}
    for bad in ({"base_fee": -1, "prompt_token_fee": 1, "completion_token_fee": 1}, {"base_fee": "x"}, [1]):
        assert (await herd.admin.put("/admin/fees/fake-model", json=bad)).status_code == 400, bad
    assert (await alice.post("/v1/completions", json=body)).json()["usage"]["cost_credits"] == 156


async def test_info_shows_fees_per_model_queue_length_and_the_last_multiplier(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    await herd.admin.put(
        "/admin/fees/fake-model", json={"base_fee": 4, "prompt_token_fee": 5, "completion_token_fee": 6}
    )
    async with httpx.AsyncClient(base_url=herd.router.url) as anonymous:  # type: ignore[union-attr]
        info = (await anonymous.get("/v1/info")).json()
        assert info["models"]["fake-model"]["fees"] == {"base_fee": 4, "prompt_token_fee": 5, "completion_token_fee": 6}
        assert info["fees"]["fake-model"] == info["models"]["fake-model"]["fees"]
        assert info["fees"]["*"] == {"base_fee": 10, "prompt_token_fee": 1, "completion_token_fee": 2}
        assert (info["queue_length"], info["last_multiplier"], info["nodes"]) == (0, 1.0, {"total": 1, "ready": 1})

        tasks = [asyncio.create_task(alice.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "bid": 2.5}))]
        while (await anonymous.get("/v1/info")).json()["last_multiplier"] != 2.5:
            await asyncio.sleep(0.01)
        for bid in (1.25, 3):
            tasks.append(
                asyncio.create_task(alice.post("/v1/completions", json={"prompt": "b", "max_tokens": 1, "bid": bid}))
            )
        while (info := (await anonymous.get("/v1/info")).json())["queue_length"] != 2:
            await asyncio.sleep(0.01)
        assert info["models"]["fake-model"]["queue_length"] == 2
        assert info["last_multiplier"] == 2.5 and info["last_multiplier_exact"] == "2.5"
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200, 200, 200]
        info = (await anonymous.get("/v1/info")).json()
        assert info["queue_length"] == 0
        assert info["last_multiplier"] == 1.25, "the bid of 3 was served before the bid of 1.25"


async def test_stats_show_nodes_queues_fees_requests_latency_and_agents(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=4)))
    await herd.add_node(FakeNode("n2", slots=1, model="other-model", script=Script(tokens=2, gate=gate)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 1000)
    bot = await herd.account("bot", 100_000)
    charged = []
    for _ in range(3):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        charged.append(resp.json()["usage"]["cost_credits"])
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 9999})).status_code == 402
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "model": "nope"})).status_code == 404
    # One request in flight on n2 and one waiting behind it.
    other = {"model": "other-model", "prompt": PROMPT, "max_tokens": 2}
    in_flight = asyncio.create_task(bot.post("/v1/completions", json=other))
    waiting = asyncio.create_task(bot.post("/v1/completions", json=other))
    for kind, data in [
        ("buy", {"position": 1, "pnl": 0.5}),
        ("skip", {}),
        ("buy", {"position": 2.5, "pnl": -1.25}),
        ("error", {"message": "feed down"}),
        ("request", {"position": "not a number"}),
    ]:
        assert (await bot.post("/v1/events", json={"kind": kind, "data": data})).status_code == 201
    while (stats := (await herd.admin.get("/admin/stats")).json())["queue"]["total"] != 1:
        await asyncio.sleep(0.01)

    nodes = {n["name"]: n for n in stats["nodes"]}
    assert {k: nodes["n1"][k] for k in ("state", "slots", "busy", "requests", "fees_earned", "models")} == {
        "state": "ready",
        "slots": 2,
        "busy": 0,
        "requests": 3,
        "fees_earned": sum(charged),
        "models": ["fake-model"],
    }
    assert (nodes["n2"]["busy"], nodes["n2"]["requests"], nodes["n2"]["fees_earned"]) == (1, 0, 0)
    assert stats["queue"]["models"]["other-model"]["depth"] == 1
    assert stats["queue"]["models"]["other-model"]["oldest_wait"] > 0
    assert stats["queue"]["models"]["fake-model"]["depth"] == 0
    assert stats["fees"]["earned"] == sum(charged) == stats["books"]["charges"]
    assert stats["fees"]["by_node"] == {"n1": sum(charged)}
    assert stats["books"]["balanced"] and stats["books"]["holds"] > 0  # the two bot requests hold credits
    # refusals are requests too: the 402 and the 404 above
    assert stats["requests"]["by_status"] == {"ok": 3, "insufficient_funds": 1, "model_not_found": 1}
    latency = stats["requests"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] < 2000
    assert stats["agents"] == {
        "bot": {
            "counts": {"buy": 2, "skip": 1, "error": 1, "request": 1},
            "total": 5,
            "position": 2.5,
            "pnl": -1.25,
            "last": stats["agents"]["bot"]["last"],
        }
    }

    gate.set()
    costs = [r.json()["usage"]["cost_credits"] for r in await asyncio.gather(in_flight, waiting)]
    stats = (await herd.admin.get("/admin/stats")).json()
    nodes = {n["name"]: n for n in stats["nodes"]}
    assert (nodes["n2"]["busy"], nodes["n2"]["requests"], nodes["n2"]["fees_earned"]) == (0, 2, sum(costs))
    assert stats["fees"]["earned"] == sum(charged) + sum(costs)
    assert stats["requests"]["by_status"] == {"ok": 5, "insufficient_funds": 1, "model_not_found": 1}
    assert stats["requests"]["total"] == 7
    assert stats["queue"]["total"] == 0 and stats["books"]["holds"] == 0


async def test_the_stats_stream_pushes_snapshots(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 10_000)
    snapshots: list[dict[str, Any]] = []
    started = asyncio.get_running_loop().time()
    async with herd.admin.stream("GET", "/admin/stats/stream?interval=0.2") as resp:
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                snapshots.append(json.loads(line[6:]))
                if len(snapshots) == 1:
                    await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
                if len(snapshots) == 3:
                    break
    elapsed = asyncio.get_running_loop().time() - started
    assert elapsed > 0.35, "snapshots come at the interval asked for, not faster"
    assert snapshots[0]["requests"]["total"] == 0
    assert snapshots[-1]["requests"]["total"] == 1, "a later snapshot shows what happened in between"
    assert snapshots[0]["time"] < snapshots[1]["time"] < snapshots[2]["time"]
    assert {n["name"] for n in snapshots[-1]["nodes"]} == {"n1"}
    for interval in ("0", "x", "61"):
        assert (await herd.admin.get(f"/admin/stats/stream?interval={interval}")).status_code == 400
    # The router is still well after the client left the stream.
    assert (await herd.admin.get("/admin/stats")).status_code == 200


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, None when there is no such sample."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if found == labels:
            return float(match[3])
    return None


def metric(text: str, name: str, **labels: str) -> float:
    value = sample(text, name, **labels)
    assert value is not None, f"no sample {name}{labels} in:\n{text}"
    return value


async def test_metrics_expose_requests_fees_and_queue_depth(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=2, gate=gate)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    async with httpx.AsyncClient(base_url=herd.router.url) as scraper:  # type: ignore[union-attr]
        tasks = [
            asyncio.create_task(alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}))
            for _ in range(3)
        ]
        while (
            sample(text := (await scraper.get("/metrics")).text, "llamakit_router_queue_depth", model="fake-model") != 2
        ):
            await asyncio.sleep(0.01)
        assert metric(text, "llamakit_router_nodes", state="ready") == 1
        gate.set()
        costs = [r.json()["usage"]["cost_credits"] for r in await asyncio.gather(*tasks)]
        assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "model": "nope"})).status_code == 404
        assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 9999})).status_code == 402
        text = (await scraper.get("/metrics")).text
    assert metric(text, "llamakit_router_requests_total", model="fake-model", status="ok") == 3
    assert metric(text, "llamakit_router_fees_earned_credits_total", node="n1") == sum(costs) == 3 * cost(7, 2)
    assert metric(text, "llamakit_router_queue_depth", model="fake-model") == 0
    assert metric(text, "llamakit_router_tokens_total", model="fake-model", kind="completion") == 6


async def test_account_and_node_names_are_plain_text_on_one_line(herd: Herd) -> None:
    """Names are shown to people (terminals, the dashboard): a control character in one is refused."""
    router = await herd.start()
    assert herd.admin is not None
    for name in ("a\x1b[31mb", "line\nbreak", "rtl\u202eevil"):
        resp = await herd.admin.post("/admin/accounts", json={"name": name, "deposit": 10})
        assert resp.status_code == 400 and "control or invisible characters" in resp.json()["error"]["message"], (
            resp.text
        )
    assert (await herd.admin.get("/admin/accounts")).json()["data"] == []
    join = {"url": "http://127.0.0.1:9", "name": "n\x1b[2J", "models": ["m"], "slots": 1}
    async with httpx.AsyncClient(base_url=router.url) as client:
        headers = {"Authorization": f"Bearer {HERD_TOKEN}"}
        assert (await client.post("/herd/join", json=join, headers=headers)).status_code == 400
        bad_model = {**join, "name": "n", "models": ["m\u2028x"]}
        assert (await client.post("/herd/join", json=bad_model, headers=headers)).status_code == 400
