"""A router of a cluster killed under a stream: once its lease runs out, another router closes the stream's hold,
charging what the stream had delivered by its last checkpoint, and the books balance throughout."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg

from llamakit.router.ledger import ledger_at
from tests.scaleout.conftest import Routers
from tests.support.crashes import CHECKPOINT_TOKENS, PROMPT_TOKENS, STALL, stream_until_killed
from tests.support.fake_node import FakeNode, Script

LEASE = 1.5


async def test_a_killed_routers_stream_is_charged_what_it_delivered_by_the_router_that_outlives_it(
    routers: Routers,
) -> None:
    await routers.add_node(FakeNode("n1", slots=2, script=Script(tokens=64, token_delay=0.01, stall_after=STALL)))
    keeper = await routers.start_router(lease=LEASE)
    victim_url, victim = await routers.spawn_router(lease=LEASE, checkpoint_tokens=CHECKPOINT_TOKENS,
                                                    checkpoint_ms=60000)  # fmt: skip
    await routers.join(keeper, "n1")
    for url in (keeper, victim_url):
        await routers.wait_nodes(url, {"n1": "ready"})
    key = await routers.account("alice", 10_000)

    async def kill() -> None:
        victim.send_signal(signal.SIGKILL)
        victim.wait()

    request_id, delivered = await asyncio.wait_for(stream_until_killed(victim_url, key, routers.db, kill), 60)
    killed = time.monotonic()
    routers.urls.remove(victim_url)
    assert delivered == STALL
    conn = await asyncpg.connect(routers.db)
    try:
        # Until the victim's lease runs out its hold stays open, and the books balance with it.
        assert (await routers.books())["balanced"]
        while await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open'"):
            assert time.monotonic() - killed < LEASE * 1.5 + 2, "the dead router's hold is still open"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    async with ledger_at(routers.db) as ledger:
        record = await ledger.find_usage(request_id)
    assert record is not None and (record.status, record.node, record.model) == ("router_lost", "n1", "fake-model")
    assert delivered - CHECKPOINT_TOKENS < record.completion_tokens <= delivered
    assert record.prompt_tokens == PROMPT_TOKENS
    assert record.cost == 10 + PROMPT_TOKENS + 2 * record.completion_tokens < record.held
    books = await routers.books()
    assert books["balanced"] and books["holds"] == 0 and books["charges"] == record.cost
