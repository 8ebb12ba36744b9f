"""On PostgreSQL, routers share a ledger only as a cluster: a router without --cluster has it to itself (its
start releases every hold it finds open), so it is refused beside any other router, and they beside it."""

from __future__ import annotations

import pytest

from llamakit.router.ledger import LedgerError
from tests.scaleout.conftest import Routers


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
