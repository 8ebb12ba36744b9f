"""Three routers on one PostgreSQL database share one herd: its slots, one bid order, membership, draining,
idempotency keys and herd-wide figures."""

from __future__ import annotations

import asyncio
import time

import httpx

from llamakit.router.dispatch.cluster import Cluster
from llamakit.router.ledger import Remembered
from llamakit.router.state import STATE
from llamakit.wire.headers import OVERHEAD_HEADER, REPLAYED_HEADER
from tests.scaleout.conftest import Routers
from tests.support.fake_node import FakeNode, Script

PROMPT = "one two three"


async def _three(routers: Routers, *nodes: FakeNode) -> list[str]:
    for node in nodes:
        await routers.add_node(node)
    urls = [await routers.start_router() for _ in range(3)]
    for node in nodes:
        await routers.join(urls[0], node.name)
    for url in urls:
        await routers.wait_nodes(url, {n.name: "ready" for n in nodes})
    return urls


async def test_a_node_never_runs_more_requests_than_its_slots_whichever_router_sent_them(routers: Routers) -> None:
    node = FakeNode("n1", slots=1, script=Script(tokens=3, token_delay=0.02))
    urls = await _three(routers, node)
    key = await routers.account("alice", 1_000_000)
    clients = [routers.client(url, key) for url in urls]
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 3}
    answers = await asyncio.gather(*(clients[i % 3].post("/v1/completions", json=body) for i in range(12)))
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers if a.status_code != 200]
    assert node.max_active == 1  # a full node is not a failed node: each request waited its turn
    assert len(node.received) == 12


async def test_a_higher_bid_at_another_router_goes_first(routers: Routers) -> None:
    gate = asyncio.Event()
    node = FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate))
    a, b, _c = await _three(routers, node)
    key = await routers.account("alice", 1_000_000)
    other = await routers.account("bob", 1_000_000)
    at_a, at_b = routers.client(a, key), routers.client(b, other)

    def ask(client: object, bid: float, tag: str) -> asyncio.Task[object]:
        body = {"model": "fake-model", "prompt": tag, "max_tokens": 1, "bid": bid}
        return asyncio.ensure_future(client.post("/v1/completions", json=body))  # type: ignore[attr-defined]

    first = ask(at_a, 1, "busy")
    while not node.received:
        await asyncio.sleep(0.01)
    low = []
    for i in range(3):  # one after another, so that their order of arrival is known
        low.append(ask(at_a, 1, f"low{i}"))
        await asyncio.sleep(0.15)
    high = ask(at_b, 3, "high")
    await asyncio.sleep(0.3)
    gate.set()
    answers = await asyncio.gather(first, *low, high)
    assert all(a.status_code == 200 for a in answers)  # type: ignore[attr-defined]
    assert [r["prompt"] for r in node.received] == ["busy", "high", "low0", "low1", "low2"]


async def test_a_node_joins_once_and_draining_at_one_router_drains_it_everywhere(routers: Routers) -> None:
    urls = await _three(routers, FakeNode("n1", slots=2))
    await routers.admin(urls[1]).post("/admin/nodes/n1/drain")
    for url in urls:
        await routers.wait_nodes(url, {"n1": "draining"})
    await routers.admin(urls[2]).post("/admin/nodes/n1/undrain")
    for url in urls:
        await routers.wait_nodes(url, {"n1": "ready"})


async def test_an_idempotent_retry_at_another_router_gets_the_stored_answer(routers: Routers) -> None:
    node = FakeNode("n1", slots=2, script=Script(tokens=3, token_delay=0.1))
    a, b, c = await _three(routers, node)
    key = await routers.account("alice", 1_000_000)
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 3}
    headers = {"Idempotency-Key": "k-1"}
    first = await routers.client(a, key).post("/v1/completions", json=body, headers=headers)
    assert first.status_code == 200
    later = await routers.client(b, key).post("/v1/completions", json=body, headers=headers)
    assert later.status_code == 200 and later.headers["Idempotent-Replayed"] == "true"
    assert later.json()["id"] == first.json()["id"]
    assert float(later.headers[OVERHEAD_HEADER]) >= 0  # the replay's own time
    # Two at once at two routers: one runs, the other waits for it and gets the same answer.
    asked = time.monotonic()
    both = await asyncio.gather(
        routers.client(b, key).post("/v1/completions", json=body, headers={"Idempotency-Key": "k-2"}),
        routers.client(c, key).post("/v1/completions", json=body, headers={"Idempotency-Key": "k-2"}),
    )
    took_ms = (time.monotonic() - asked) * 1000
    assert [r.status_code for r in both] == [200, 200]
    assert both[0].json()["id"] == both[1].json()["id"]
    (replayed,) = [r for r in both if r.headers.get(REPLAYED_HEADER) == "true"]
    assert float(replayed.headers[OVERHEAD_HEADER]) < took_ms / 2  # its wait for the first is not its overhead
    assert len(node.received) == 2  # one generation per key


async def test_a_repeat_that_missed_the_answer_by_a_moment_gets_it_and_does_not_run_again(routers: Routers) -> None:
    # The repeat looked for a remembered answer just before the first request settled, and tried to claim the
    # key just after the first gave its claim up. Before, it won the claim: the request ran again, and its
    # settlement failed on the remembered answer's key (a 500, with its hold left open).
    node = FakeNode("n1", slots=2, script=Script(tokens=3))
    a, b, _c = await _three(routers, node)
    key = await routers.account("alice", 1_000_000)
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 3}
    headers = {"Idempotency-Key": "k-late"}
    first = await routers.client(a, key).post("/v1/completions", json=body, headers=headers)
    assert first.status_code == 200
    state = routers.servers[1].runner.app[STATE]
    ledger = state.idempotency.ledger
    cluster = state.dispatch
    assert isinstance(cluster, Cluster)
    real, looks = ledger.recall, []

    async def missed_once(account_id: int, idempotency_key: str) -> Remembered | None:
        looks.append(idempotency_key)
        return None if len(looks) == 1 else await real(account_id, idempotency_key)

    ledger.recall = missed_once  # type: ignore[method-assign]
    for _ in range(100):  # the first request's claim is given up in the background
        if not await cluster._db().fetchval("SELECT count(*) FROM idempotency_claims"):
            break
        await asyncio.sleep(0.05)
    later = await routers.client(b, key).post("/v1/completions", json=body, headers=headers)
    assert later.status_code == 200, later.text
    assert later.headers["Idempotent-Replayed"] == "true" and later.json()["id"] == first.json()["id"]
    assert len(node.received) == 1 and len(looks) >= 2
    books = await routers.books()
    assert books["balanced"] and books["holds"] == 0


async def test_stats_give_the_herd_wide_queue_and_say_what_is_per_router(routers: Routers) -> None:
    gate = asyncio.Event()
    node = FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate))
    a, b, c = await _three(routers, node)
    key = await routers.account("alice", 1_000_000)
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 1}
    pending = [asyncio.ensure_future(routers.client(a, key).post("/v1/completions", json=body)) for _ in range(3)]
    await asyncio.sleep(0.5)
    try:
        await _look(routers, b, c)
    finally:
        gate.set()
    assert all(r.status_code == 200 for r in await asyncio.gather(*pending))


async def _look(routers: Routers, b: str, c: str) -> None:
    stats = (await routers.admin(b).get("/admin/stats")).json()
    assert stats["queue"]["models"]["fake-model"]["depth"] == 2  # waiting at router a, seen from router b
    assert stats["nodes"][0]["busy"] == 1 and stats["nodes"][0]["busy_here"] == 0
    assert len(stats["cluster"]["routers"]) == 3
    assert "requests" in stats["cluster"]["per_router"]
    async with httpx.AsyncClient(base_url=c) as anyone:
        assert (await anyone.get("/v1/info")).json()["queue_length"] == 2  # what a client must out-bid
    metrics = (await routers.admin(c).get("/metrics")).text
    assert 'llamakit_router_queue_depth{model="fake-model"} 2.0' in metrics, metrics


async def test_a_keys_spend_cap_holds_across_routers_and_a_limit_changed_at_one_reaches_the_others(
    routers: Routers,
) -> None:
    node = FakeNode("n1", slots=4, script=Script(tokens=2))
    urls = await _three(routers, node)
    await routers.account("alice", 1_000_000)
    made = await routers.admin(urls[0]).post("/admin/accounts/alice/keys", json={"limits": {"spend_cap": 1000}})
    key = made.json()["api_key"]
    clients = [routers.client(url, key) for url in urls]
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 2}
    answers = await asyncio.gather(*(clients[i % 3].post("/v1/completions", json=body) for i in range(60)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 402} and all(
        a.json()["error"]["code"] == "spend_cap_exceeded" for a in answers if a.status_code == 402
    )
    shown = (await clients[2].get("/v1/key")).json()
    charged = sum(a.json()["usage"]["cost_credits"] for a in answers if a.status_code == 200)
    assert shown["spend"]["total"] == charged <= 1000 and shown["spend"]["held"] == 0
    books = await routers.books()
    assert books["balanced"] and books["holds"] == 0

    # Revoked at one router: refused at every router within the key cache's 5 s.
    assert (await routers.admin(urls[0]).delete(f"/admin/keys/{key[:8]}")).status_code == 200
    for client in clients:
        for _ in range(140):
            if (await client.get("/v1/account")).status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert (await client.get("/v1/account")).status_code == 401
