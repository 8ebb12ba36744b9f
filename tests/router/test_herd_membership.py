"""The herd as it changes: nodes join, heartbeat, leave, drain, get removed, die and come back, and each node's
fees are its own."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"
HERD_AUTH = {"Authorization": f"Bearer {HERD_TOKEN}"}


async def fees_per_node(herd: Herd) -> tuple[dict[str, int], dict[str, int]]:
    """(stats nodes[].fees_earned, stats fees.by_node) from /admin/stats."""
    assert herd.admin is not None
    stats = (await herd.admin.get("/admin/stats")).json()
    return {n["name"]: n["fees_earned"] for n in stats["nodes"]}, stats["fees"]["by_node"]


async def test_a_node_that_joins_gets_work_heartbeats_and_leaves(herd: Herd) -> None:
    joiner = await herd.add_node(FakeNode("joiner", slots=2, script=Script(tokens=3)), static=False)
    router = await herd.start()
    alice = await herd.account("alice", 10_000)
    # Before it joins the router knows no node and no model.
    assert (await herd.node_states()) == {}
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"

    resp = await herd.join("joiner")
    assert resp.status_code == 201 and resp.json()["id"] == "joiner"
    assert resp.json()["heartbeat_seconds"] == 0.1
    nodes = (await herd.admin.get("/admin/nodes")).json()["data"]  # type: ignore[union-attr]
    assert [(n["name"], n["url"], n["state"], n["slots"], n["static"]) for n in nodes] == [
        ("joiner", herd.node_url("joiner"), "ready", 2, False)
    ]
    assert [m["id"] for m in (await alice.get("/v1/models")).json()["data"]] == ["fake-model"]
    costs = []
    for _ in range(3):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
        assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "joiner"
        costs.append(int(resp.headers["X-Llamakit-Cost-Credits"]))
    assert len(joiner.received) == 3
    # Its health is checked like any node's: a few intervals later it is still ready.
    await asyncio.sleep(0.3)
    assert await herd.node_states() == {"joiner": "ready"}

    async with httpx.AsyncClient(base_url=router.url, headers=HERD_AUTH) as node_side:
        resp = await node_side.post("/herd/heartbeat", json={"name": "joiner", "models": ["fake-model"], "slots": 2})
        assert resp.status_code == 200 and resp.json() == {"id": "joiner", "state": "ready"}
        resp = await node_side.post("/herd/leave", json={"name": "joiner"})
        assert resp.status_code == 200 and resp.json() == {"removed": "joiner"}
        assert await herd.node_states() == {}
        resp = await node_side.post("/herd/heartbeat", json={"name": "joiner"})
        assert resp.status_code == 404, "a node that left must join again"
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 404
    assert len(joiner.received) == 3
    # What it earned stays on the books after it left.
    assert (await fees_per_node(herd))[1] == {"joiner": sum(costs)}


async def test_join_refuses_bad_fields_and_heartbeat_of_an_unknown_node_is_404(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    router = await herd.start()
    async with httpx.AsyncClient(base_url=router.url, headers=HERD_AUTH) as node_side:
        for name in ("ghost", "", "127.0.0.1"):
            resp = await node_side.post("/herd/heartbeat", json={"name": name, "models": ["x"], "slots": 1})
            assert resp.status_code == 404, (name, resp.text)
            assert "POST /herd/join" in resp.json()["error"]["message"]
        # A heartbeat is a node's name and what it serves, in JSON's own types: anything else is a 400 naming it.
        for bad, param in [({"name": None}, "name"), ({"slots": "1"}, "slots"), ({"models": "x"}, "models")]:
            resp = await node_side.post("/herd/heartbeat", json={"name": "n1", "models": ["x"], "slots": 1, **bad})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (bad, resp.text)
        good = {"url": "http://127.0.0.1:9", "name": "x", "models": ["m"], "slots": 1}
        for bad in (
            {"url": "ftp://x"},
            {"url": None},
            {"name": ""},
            {"name": "n" * 65},
            {"models": "m"},
            {"models": [1]},
            {"slots": 0},
            {"slots": True},
            {"slots": 1.5},
        ):
            resp = await node_side.post("/herd/join", json={**good, **bad})
            assert resp.status_code == 400, (bad, resp.text)
    assert await herd.node_states() == {"n1": "ready"}


async def test_a_drained_node_finishes_its_request_and_takes_no_more(herd: Herd) -> None:
    gate = asyncio.Event()
    n1 = await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=2, gate=gate)))
    n2 = await herd.add_node(FakeNode("n2", slots=2, script=Script(tokens=2)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    in_flight = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "first", "max_tokens": 2}))
    while not n1.received:  # n1 wins the tie between two idle nodes by name
        await asyncio.sleep(0.01)

    resp = await herd.admin.post("/admin/nodes/n1/drain")
    assert resp.status_code == 200 and resp.json()["state"] == "draining" and resp.json()["busy"] == 1
    served: Counter[str] = Counter()
    for i in range(6):
        resp = await alice.post("/v1/completions", json={"prompt": f"later {i}", "max_tokens": 2})
        assert resp.status_code == 200
        served[resp.headers["X-Llamakit-Node"]] += 1
    assert served == {"n2": 6}
    assert [r["prompt"] for r in n1.received] == ["first"]
    # The info call and /v1/models count only nodes that take work.
    assert (await alice.get("/v1/info")).json()["models"]["fake-model"]["nodes"] == 1

    gate.set()
    first = await in_flight
    assert first.status_code == 200 and first.headers["X-Llamakit-Node"] == "n1"
    assert first.json()["usage"]["completion_tokens"] == 2
    await asyncio.sleep(0.3)  # health checks do not undo a drain
    assert await herd.node_states() == {"n1": "draining", "n2": "ready"}

    assert (await herd.admin.post("/admin/nodes/n1/undrain")).json()["state"] == "ready"
    resp = await alice.post("/v1/completions", json={"prompt": "back", "max_tokens": 2})
    assert resp.headers["X-Llamakit-Node"] == "n1"

    # A static node keeps its address as id after it tells its name; either finds it.
    node_id = herd.node_url("n1").removeprefix("http://")
    resp = await herd.admin.delete("/admin/nodes/n1")
    assert resp.status_code == 200 and resp.json() == {"removed": node_id}
    assert (await herd.admin.delete("/admin/nodes/n1")).status_code == 404
    assert (await herd.admin.post(f"/admin/nodes/{node_id}/drain")).status_code == 404
    await asyncio.sleep(0.3)  # a removed static node is not brought back by health checks
    assert await herd.node_states() == {"n2": "ready"}
    for _ in range(3):
        resp = await alice.post("/v1/completions", json={"prompt": "after", "max_tokens": 2})
        assert resp.headers["X-Llamakit-Node"] == "n2"
    assert len(n1.received) == 2 and len(n2.received) == 9


async def test_draining_the_only_node_refunds_what_waits_for_it(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    in_flight = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}))
    waiting = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "b", "max_tokens": 1}))
    while (await alice.get("/v1/info")).json()["queue_length"] != 1:
        await asyncio.sleep(0.01)
    await herd.admin.post("/admin/nodes/n1/drain")
    refused = await waiting
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_node"
    gate.set()
    assert (await in_flight).status_code == 200
    account = (await alice.get("/v1/account")).json()
    assert account["held"] == 0 and account["balance"] == 100_000 - account["spent"]
    assert sorted(u["status"] for u in (await alice.get("/v1/account/usage")).json()["data"]) == ["no_node", "ok"]


async def test_a_killed_node_goes_down_and_comes_back_on_the_same_port(herd: Herd) -> None:
    n1 = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=2)))
    n2 = await herd.add_node(FakeNode("n2", slots=1, script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    earned: Counter[str] = Counter()

    async def ask(expect: str | None = None) -> str:
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
        assert resp.status_code == 200, resp.text
        node = resp.headers["X-Llamakit-Node"]
        earned[node] += int(resp.headers["X-Llamakit-Cost-Credits"])
        if expect is not None:
            assert node == expect
        return node

    await ask("n1")
    url = herd.node_url("n1")
    await herd.stop_node("n1")
    # At once, before a health check noticed: the request fails over.
    await ask("n2")
    await herd.wait_state("n1", "down", within=2)
    for _ in range(4):
        await ask("n2")
    assert len(n1.received) == 1

    await herd.restart_node("n1")
    assert herd.node_url("n1") == url
    await herd.wait_state("n1", "ready", within=2)
    # Both idle again: n1 wins the tie by name, and serves on its new server.
    await ask("n1")
    served = Counter([await ask() for _ in range(4)])
    assert served["n1"] >= 1 and len(n1.received) == 1 + 1 + served["n1"]
    assert len(n2.received) == 5 + served["n2"]

    per_node, by_node = await fees_per_node(herd)
    assert per_node == by_node == dict(earned)
    assert sum(earned.values()) == (await alice.get("/v1/account")).json()["spent"]


async def test_the_only_node_killed_is_503_with_a_full_refund_until_it_returns(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=2)))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 100_000)
    await herd.stop_node("n1")
    for _ in range(3):  # before and after the health checks notice
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_node", resp.text
        assert "nothing was charged" in resp.json()["error"]["message"]
    await herd.wait_state("n1", "down", within=2)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True})
    assert resp.status_code == 503
    account = (await alice.get("/v1/account")).json()
    assert (account["balance"], account["held"], account["spent"]) == (100_000, 0, 0)
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert len(usage) == 4 and {u["status"] for u in usage} == {"no_node"} and {u["cost_credits"] for u in usage} == {0}

    await herd.restart_node("n1")
    await herd.wait_state("n1", "ready", within=2)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "n1"
    assert len(node.received) == 1
    assert (await fees_per_node(herd)) == ({"n1": int(resp.headers["X-Llamakit-Cost-Credits"])},) * 2


async def test_a_joined_node_killed_and_restarted_comes_back_under_its_name(herd: Herd) -> None:
    await herd.add_node(FakeNode("j1", slots=1, script=Script(tokens=1)), static=False)
    await herd.start()
    alice = await herd.account("alice", 100_000)
    assert (await herd.join("j1")).status_code == 201
    first = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    await herd.stop_node("j1")
    await herd.wait_state("j1", "down", within=2)
    # A new process on the same address, with two slots now, joins again: same node, not a second one.
    await herd.restart_node("j1", FakeNode("j1", slots=2, script=Script(tokens=1)))
    assert (await herd.join("j1")).status_code == 201
    nodes = (await herd.admin.get("/admin/nodes")).json()["data"]  # type: ignore[union-attr]
    assert [(n["name"], n["state"], n["slots"]) for n in nodes] == [("j1", "ready", 2)]
    second = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert second.status_code == 200 and herd.nodes["j1"].received
    per_node, by_node = await fees_per_node(herd)
    total = int(first.headers["X-Llamakit-Cost-Credits"]) + int(second.headers["X-Llamakit-Cost-Credits"])
    assert per_node == by_node == {"j1": total}
