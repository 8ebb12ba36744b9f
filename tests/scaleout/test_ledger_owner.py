"""On PostgreSQL, routers share a ledger only as a cluster: a router without --cluster has it to itself (its
start releases every hold it finds open), so it is refused beside any other router, and they beside it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from llamakit.router.ledger import LedgerError
from tests.scaleout.conftest import ADMIN_KEY, Routers, _popen
from tests.support.fake_node import HERD_TOKEN
from tests.support.ports import free_port


async def test_a_router_without_a_cluster_has_the_ledger_to_itself(routers: Routers) -> None:
    await routers.start_router(cluster=False)
    with pytest.raises(LedgerError, match="another router is running on the ledger"):
        await routers.start_router(cluster=False)
    with pytest.raises(LedgerError, match="a router without --cluster is running on the ledger"):
        await routers.start_router(cluster=True)


async def test_routers_of_a_cluster_share_it_and_keep_a_router_without_one_out(routers: Routers) -> None:
    await routers.start_router(router_id="r1")
    await routers.start_router(router_id="r2")
    with pytest.raises(LedgerError, match="another router is running on the ledger"):
        await routers.start_router(cluster=False)
    for server in routers.servers:  # all gone: the ledger is free for a router of either kind
        await server.stop()
    routers.servers.clear()
    routers.urls.clear()
    await routers.start_router(cluster=False)


async def _router_process(routers: Routers) -> tuple[subprocess.Popen[bytes], Path]:
    """A router without --cluster in a process of its own, ready; its log file."""
    port = free_port()
    log = routers.tmp / f"router-{port}.log"
    argv = [sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", routers.db,
            "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN]  # fmt: skip
    process = _popen(argv, log)
    routers.processes.append(process)
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return process, log
            assert process.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
    raise AssertionError(f"the router did not start: {log.read_text()}")


_OWNER = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND granted"


async def test_a_router_that_loses_its_locks_connection_takes_the_lock_again(routers: Routers) -> None:
    router, _ = await _router_process(routers)
    conn = await asyncpg.connect(routers.db)
    try:
        first = await conn.fetchval(_OWNER)
        assert first is not None
        await conn.execute("SELECT pg_terminate_backend($1)", first)  # as a restart of the database would
        for _ in range(200):
            again = await conn.fetchval(_OWNER)
            if again is not None and again != first:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the router did not take its lock again")
    finally:
        await conn.close()
    with pytest.raises(LedgerError, match="another router is running on the ledger"):
        await routers.start_router(cluster=False)
    assert router.poll() is None


async def test_a_router_whose_lock_another_took_stops(routers: Routers) -> None:
    router, log = await _router_process(routers)
    conn = await asyncpg.connect(routers.db)
    try:
        where = await conn.fetchval("SELECT current_database() || '.' || current_schema()")
        key = int.from_bytes(hashlib.sha256(f"{where}\0owner".encode()).digest()[:8], "big", signed=True)
        # Its connection gone, and the lock taken by another before it can take it again: that other one's
        # start would release its holds, so it must not go on serving.
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted")
        await conn.execute("SELECT pg_advisory_lock($1)", key)
        for _ in range(300):
            if router.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert router.poll() is not None, "the router kept serving without its lock"
        assert "another router took the ledger" in log.read_text()
    finally:
        await conn.close()
    routers.processes.remove(router)
