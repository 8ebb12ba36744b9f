"""Every connection the routers hold to PostgreSQL is cut while their requests run (as a database restart
does): once it answers again, no slot, queue row, idempotency claim or hold stays taken while the routers live.

Before, each was given back once, in the background: one that failed stayed taken until its router stopped
(its lease was alive, so no other router cleaned up after it), and a node's every slot could be lost that way.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from tests.scaleout.conftest import Routers
from tests.support.fake_node import FakeNode, Script

PROMPT = "one two three"


async def test_a_database_that_drops_every_connection_under_load_leaves_nothing_taken(routers: Routers) -> None:
    gate = asyncio.Event()
    node = await routers.add_node(FakeNode("n1", slots=4, script=Script(tokens=3, gate=gate)))
    conn = await asyncpg.connect(routers.db)
    try:
        began = await conn.fetchval("SELECT clock_timestamp()")
        urls = [await routers.start_router() for _ in range(2)]
        await routers.join(urls[0], "n1")
        for url in urls:
            await routers.wait_nodes(url, {"n1": "ready"})
        key = await routers.account("alice", 1_000_000)
        body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 3}
        sent = [
            asyncio.ensure_future(
                routers.client(urls[i % 2], key).post(
                    "/v1/completions", json=body, headers={"Idempotency-Key": f"blip-{i}"} if i < 2 else {}
                )
            )
            for i in range(4)
        ]
        while node.active < 4:  # every slot taken, every hold open, two keys claimed
            await asyncio.sleep(0.02)
        # Cut every connection the routers opened (this test's, none of another's), as a restart would.
        cut = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_start >= $1",
            began,
        )
        assert cut > 0
        gate.set()
        answers = await asyncio.gather(*sent)
        # Answered, or refused with 503 ledger_unavailable (their hold, or its release, met the cut): never a 500.
        assert all(
            a.status_code == 200 or (a.status_code == 503 and a.json()["error"]["code"] == "ledger_unavailable")
            for a in answers
        ), [a.text for a in answers]
        deadline = time.monotonic() + 20
        while True:
            left = {
                "queue rows": await conn.fetchval("SELECT count(*) FROM queue"),
                "slots running": await conn.fetchval("SELECT COALESCE(sum(running), 0) FROM nodes"),
                "idempotency claims": await conn.fetchval("SELECT count(*) FROM idempotency_claims"),
                "open holds": await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open'"),
            }
            if not any(left.values()):
                break
            assert time.monotonic() < deadline, f"still taken 20 s after the database answered again: {left}"
            await asyncio.sleep(0.2)
        # The herd serves again, at both routers.
        for url in urls:
            again = await routers.client(url, key).post("/v1/completions", json=body)
            assert again.status_code == 200, again.text
    finally:
        gate.set()
        await conn.close()
