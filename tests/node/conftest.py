from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.servers import RunningServer

HERD_TOKEN = "test-herd-token-123"


@pytest.fixture(scope="session")
async def node() -> AsyncIterator[RunningServer]:
    """One real node with the default model and two slots, shared by the node tests."""
    from llamakit.node import NodeSettings, create_app

    settings = NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name="test-node", threads=2)
    server = await RunningServer(create_app(settings)).start()
    async with httpx.AsyncClient(base_url=server.url) as client:
        for _ in range(600):
            status = (await client.get("/health")).json()["status"]
            if status != "loading":
                break
            import asyncio

            await asyncio.sleep(0.1)
    assert status == "ready"
    yield server
    await server.stop()


@pytest.fixture
async def client(node: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=node.url, headers={"Authorization": f"Bearer {HERD_TOKEN}"}, timeout=120
    ) as c:
        yield c
