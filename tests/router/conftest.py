from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from tests.conftest import RunningServer
from tests.router.fake_node import HERD_TOKEN, FakeNode

ADMIN_KEY = "test-admin-key"


@dataclass
class Herd:
    """A real router on a real SQLite file, in front of scripted fake nodes, all on loopback."""

    tmp: Path
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    node_servers: dict[str, RunningServer] = field(default_factory=dict)
    router: RunningServer | None = None
    admin: httpx.AsyncClient | None = None

    async def add_node(self, node: FakeNode) -> FakeNode:
        server = await RunningServer(node.app()).start()
        self.nodes[node.name], self.node_servers[node.name] = node, server
        return node

    async def start(self, **overrides: Any) -> RunningServer:
        settings = RouterSettings(
            db=self.tmp / "ledger.db",
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=[s.url for s in self.node_servers.values()],
            health_interval=0.1,
            base_fee=10,
            prompt_token_fee=1,
            completion_token_fee=2,
            **overrides,
        )
        self.router = await RunningServer(create_app(settings)).start()
        self.admin = httpx.AsyncClient(
            base_url=self.router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )
        await self.wait_ready(len(self.nodes))
        return self.router

    async def wait_ready(self, count: int) -> None:
        assert self.admin is not None
        for _ in range(200):
            nodes = (await self.admin.get("/admin/nodes")).json()["data"]
            if sum(n["state"] == "ready" for n in nodes) == count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {count} ready nodes, have {nodes}")

    async def account(self, name: str, deposit: int) -> httpx.AsyncClient:
        assert self.admin is not None and self.router is not None
        resp = await self.admin.post("/admin/accounts", json={"name": name, "deposit": deposit})
        assert resp.status_code == 201, resp.text
        key = resp.json()["api_key"]
        return httpx.AsyncClient(base_url=self.router.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    async def books(self) -> dict[str, Any]:
        assert self.admin is not None
        books: dict[str, Any] = (await self.admin.get("/admin/books")).json()
        return books

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.aclose()
        if self.router is not None:
            await self.router.stop()
        for server in self.node_servers.values():
            await server.stop()


@pytest.fixture
async def herd(tmp_path: Path) -> AsyncIterator[Herd]:
    h = Herd(tmp_path)
    yield h
    if h.admin is not None:
        books = await h.books()
        assert books["balanced"], f"the books do not balance: {books}"
        assert books["holds"] == 0, f"holds left open after the test: {books}"
    await h.stop()
