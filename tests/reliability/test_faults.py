"""Faults with real processes on loopback and the real model: a node, then the router, killed under load.

A router process and two node processes (SmolLM2, `--engine batched --slots 2 --ctx-size 1024`; `node-a`
joins with `--router`, `node-b` is a static `--node` of the router) are started once for the module. The
scenarios and their checks are `bench/chaos.py`'s, so that the script an operator runs and this test cannot
drift apart; here every check must pass, and each one listed below must have run. The chaos script also runs
a node that hangs (SIGSTOP), which needs a short `--node-timeout` and a rest to wait out, too slow for here.

The node-kill scenario found that a request which failed over went to the back of the queue, behind
requests that arrived after it; the last test pins the scheduler's fix (it needs no process).

Waits have generous deadlines; no assertion bounds a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal

import pytest

from bench.chaos import Cluster, Report, Stuck, node_kill, router_kill
from llamakit.router.dispatch.scheduler import Scheduler
from llamakit.router.herd import Herd, HerdNode

pytestmark = pytest.mark.model

# What each scenario must have checked (a phrase of each check's name), besides the books and the account.
NODE_KILL = [
    # SIGKILL lands while node-a streams one request and holds another that has no token yet, 2 more queued
    "at the kill, node-a holds a stream under way and a request with no token",
    "node-a marked down in /admin/nodes",
    "the started stream on the killed node ends with a node_failed error event",
    # usage status `broken`, completion_tokens = the text events the client received, cost = their price
    "the broken stream is charged only for what was delivered",
    "the request that had no token fails over and completes on the other node",
    "the request that failed over keeps its place in the queue (FIFO among equal bids)",
    "every other request completes on node-b",
    "one usage record per request; each completed one costs what its client was told",
    "node-a restarted on the same port comes back ready",
    "node-a takes work again",
]
ROUTER_KILL = [
    "router killed under load",
    "the nodes stop the generations nobody waits for",
    "restarted on the same ledger, both nodes back",
    "every answer a client received is charged exactly what it was told",
    "the holds of the streams cut by the kill are released at restart (status recovered, cost 0)",
    "the restarted router released as many holds as there are recovered records",
    "every other record is a released hold or an answer the router settled before it died",
    "each cut request sent again with its Idempotency-Key is answered once and paid once",
    "the usage log agrees with the ledger, line for line",
]
ALWAYS = ["account: nothing held, deposits = balance + charges", "books balanced, no hold open"]


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    herd = Cluster(tmp_path_factory.mktemp("faults"))
    try:
        herd.start()
        await herd.wait_ready()
        yield herd
    finally:
        await herd.close()


async def run(scenario: Callable[[Cluster, Report], Awaitable[None]], cluster: Cluster, expected: list[str]) -> Report:
    report = Report(say=print)
    try:
        await scenario(cluster, report)
    except Stuck as exc:
        pytest.fail(f"{exc}\nchecks so far:\n{report.summary()}\nlogs in {cluster.workdir}")
    assert not report.failed, f"{report.summary()}\nlogs in {cluster.workdir}"
    missing = [want for want in expected + ALWAYS if not any(want in c.name for c in report.checks)]
    assert not missing, f"these checks did not run: {missing}"
    return report


async def test_a_node_killed_mid_stream_under_load(cluster: Cluster) -> None:
    await run(node_kill, cluster, NODE_KILL)


async def test_the_router_killed_under_load_restarts_with_its_books_whole(cluster: Cluster) -> None:
    await run(router_kill, cluster, ROUTER_KILL)
    books = await cluster.books()
    assert books["balanced"] and books["holds"] == 0
    assert books["deposits"] == books["balances"] + books["holds"] + books["charges"]


async def first_done(*waiting: asyncio.Future[HerdNode]) -> asyncio.Future[HerdNode] | None:
    """The one of the waiting requests that got a node (None if none or several did)."""
    done, _ = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    return done.pop() if len(done) == 1 else None


async def test_a_request_that_failed_over_keeps_its_place_and_holds_up_no_one() -> None:
    herd = Herd()
    a = herd.join(url="http://a", name="a", models=["m"], slots=1)
    b = herd.join(url="http://b", name="b", models=["m"], slots=1)
    scheduler = Scheduler(herd, max_queue=10)
    one = Decimal(1)
    taken = [await scheduler.acquire("m", one, max_wait=1) for _ in range(2)]
    assert sorted(n.name for n in taken) == ["a", "b"]
    # x arrived at t=2 and waits; r arrived at t=1, was dispatched to a, which failed it: r waits again, for b only.
    x = asyncio.ensure_future(scheduler.acquire("m", one, max_wait=30, arrived=2.0))
    r = asyncio.ensure_future(scheduler.acquire("m", one, max_wait=30, exclude=frozenset({"a"}), arrived=1.0))
    await asyncio.sleep(0.01)
    scheduler.free(b)
    assert await first_done(x, r) is r, "the request that failed over lost its place to one that came after it"
    assert r.result() is b
    # r2 (arrived first of all, must avoid a) heads the queue, and only a frees: x takes it, r2 keeps waiting.
    r2 = asyncio.ensure_future(scheduler.acquire("m", one, max_wait=30, exclude=frozenset({"a"}), arrived=0.5))
    await asyncio.sleep(0.01)
    scheduler.free(a)
    assert await first_done(x, r2) is x, "a request that must avoid a node held up the queue behind it"
    assert x.result() is a and scheduler.queue_length("m") == 1
    # A newcomer while r2 is passed over and a has a free slot: served at once, not at the next release.
    scheduler.free(a)
    assert await asyncio.wait_for(scheduler.acquire("m", one, max_wait=30), 10) is a
    assert not r2.done()
    scheduler.free(b)
    assert await r2 is b
