"""Shared fixtures: real servers on loopback sockets (tests/support/servers.py), started in the test's event loop."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.support.servers import RunningServer

__all__ = ["HAS_LLAMA", "RunningServer", "serve"]

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_LLAMA:
        return
    skip = pytest.mark.skip(reason="llama-cpp-python is not installed (pip install 'llamakit[node]')")
    for item in items:
        if "model" in item.keywords:
            item.add_marker(skip)


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
