"""Fixtures for the dashboard tests: a fixed time zone, a real router with fake nodes, and one that can restart."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from llamakit.router import RouterSettings, create_app
from tests.router.conftest import ADMIN_KEY, Herd
from tests.router.fake_node import HERD_TOKEN

__all__ = ["ADMIN_KEY", "RestartableRouter"]


@pytest.fixture
def utc() -> Iterator[None]:
    """Clock times on screen in UTC, so what the layout tests see does not depend on the machine's zone."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
async def herd(tmp_path: Path) -> AsyncIterator[Herd]:
    """A real router on SQLite in front of fake nodes (see tests/router); the books must balance at the end."""
    h = Herd(tmp_path)
    yield h
    if h.admin is not None:
        books = await h.books()
        assert books["balanced"], f"the books do not balance: {books}"
        assert books["holds"] == 0, f"holds left open after the test: {books}"
    await h.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RestartableRouter:
    """A real router on a fixed port and SQLite file that can be stopped and started again, as after a crash.

    Stopping waits at most `shutdown_timeout` for open requests: the dashboard's stats stream never ends
    by itself, and aiohttp would otherwise wait a minute for it.
    """

    def __init__(self, db: Path, nodes: list[str]) -> None:
        self.db, self.nodes = db, nodes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        settings = RouterSettings(
            port=self.port,
            db=self.db,
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=self.nodes,
            health_interval=0.1,
        )
        self.runner = web.AppRunner(create_app(settings), shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
