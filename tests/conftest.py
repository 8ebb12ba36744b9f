"""Shared fixtures: real servers on loopback sockets, started in the test's event loop."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_LLAMA:
        return
    skip = pytest.mark.skip(reason="llama-cpp-python is not installed (pip install 'llamakit[node]')")
    for item in items:
        if "model" in item.keywords:
            item.add_marker(skip)


class RunningServer:
    """An aiohttp app served on 127.0.0.1 on a free port."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self, port: int = 0) -> RunningServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def serve() -> AsyncIterator[object]:
    """Start any number of apps for one test; all are stopped at its end."""
    started: list[RunningServer] = []

    async def start(app: web.Application) -> RunningServer:
        server = await RunningServer(app).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()
