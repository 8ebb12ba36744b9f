from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.servers import RunningServer

HERD_TOKEN = "integration-herd-token"
ADMIN_KEY = "integration-admin-key"


@dataclass
class LiveHerd:
    router: RunningServer
    node: RunningServer
    api_key: str
    admin: httpx.AsyncClient


@pytest.fixture(scope="module")
async def live_herd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveHerd]:
    """A real router in front of a real node with the default model, and a funded account."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("herd")
    node = await RunningServer(
        create_node(NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name="real-node", threads=2))
    ).start()
    router = await RunningServer(
        create_router(
            RouterSettings(
                db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url], health_interval=0.2
            )
        )
    ).start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    for _ in range(600):
        if (await admin.get("/health")).json()["ready"] == 1:
            break
        await asyncio.sleep(0.1)
    created = await admin.post("/admin/accounts", json={"name": "integration", "deposit": 1_000_000})
    yield LiveHerd(router, node, created.json()["api_key"], admin)
    books = (await admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0, books
    await admin.aclose()
    await router.stop()
    await node.stop()
