"""Fixtures for the dashboard tests: a fixed time zone, a real router with fake nodes, and one that can restart."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from llamakit.router import RouterSettings, create_app
from tests.support.fake_node import HERD_TOKEN
from tests.support.herd import ADMIN_KEY, herd
from tests.support.ports import free_port

# `herd` is tests/support/herd.py's (tests/router's too): a router on SQLite in front of fake nodes, whose books
# must balance at the end.
__all__ = ["ADMIN_KEY", "RestartableRouter", "herd"]


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
