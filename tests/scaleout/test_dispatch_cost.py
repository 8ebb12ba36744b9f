"""A dispatch reads a few rows of `nodes`, not the herd: its cost does not grow with a herd of 1,000.

Measured by PostgreSQL's own counters of the rows each scan of `nodes` read (pg_stat_user_tables), on a herd
that has just joined, before any ANALYZE: the case where the planner once sorted the whole herd each time.
"""

from __future__ import annotations

import asyncpg

from llamakit.router.ledger import ledger_at
from tests.router.ledger.conftest import postgres_schema

HERD = 1000
ROUNDS = 40  # well past the 5 runs after which PL/pgSQL keeps a generic plan


async def _rows_read(conn: asyncpg.Connection) -> int:
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n FROM pg_stat_user_tables "
        "WHERE relid = 'nodes'::regclass"
    )
    assert row is not None
    return int(row["n"])


async def test_a_dispatch_reads_a_few_nodes_of_a_herd_of_a_thousand_without_statistics() -> None:
    async with postgres_schema() as url:
        async with ledger_at(url):  # migrated
            pass
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO nodes (id, url, name, models, slots, last_seen) SELECT 'id-' || i, "
                "'http://127.0.0.1:' || (20000 + i), 'n-' || i, ARRAY['m'], 4, 0 FROM generate_series(1, $1) i",
                HERD,
            )
            before = await _rows_read(conn)
            for i in range(ROUNDS):
                assigned = await conn.fetch(
                    "SELECT * FROM llamakit_enqueue(1, 'c', 'r', 0, $1, 'm', 1, NULL, 0, '{}', NULL, 0, 100, 100)",
                    f"req-{i}",
                )
                assert [r["assigned_request"] for r in assigned] == [f"req-{i}"]
                await conn.fetch("SELECT * FROM llamakit_finish(1, 'c', 'r', 0, $1)", f"req-{i}")
            read = await _rows_read(conn) - before
            # Each round reads the chosen node and updates it twice: a few rows, where a sort read all 1,000.
            assert read < ROUNDS * 20, f"{read} rows of nodes read in {ROUNDS} dispatches of a herd of {HERD}"
        finally:
            await conn.close()
