"""A real router on a real SQLite file in front of scripted fake nodes, all on loopback (`Herd`), and the `herd`
fixture that gives a test one and checks at its end that the books balance with no hold left open. tests/router
and tests/tui take the fixture through their conftests; benches and scripts use `Herd` directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from tests.support.fake_node import HERD_TOKEN, FakeNode
from tests.support.servers import PinnedServer, RunningServer

__all__ = ["ADMIN_KEY", "Herd", "herd"]

ADMIN_KEY = "test-admin-key"


@dataclass
class Herd:
    """A real router on a real SQLite file, in front of scripted fake nodes, all on loopback."""

    tmp: Path
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    node_servers: dict[str, RunningServer] = field(default_factory=dict)
    router: RunningServer | None = None
    admin: httpx.AsyncClient | None = None
    # Nodes the router is told about at start (`--node`); the others join over /herd/join themselves.
    static: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)

    async def add_node(self, node: FakeNode, *, static: bool = True) -> FakeNode:
        server = await RunningServer(node.app()).start()
        self.nodes[node.name], self.node_servers[node.name] = node, server
        if static:
            self.static.add(node.name)
        return node

    def node_url(self, name: str) -> str:
        return self.node_servers[name].url

    async def stop_node(self, name: str) -> None:
        """Kill a node's server: its port stops answering, as when the machine goes away."""
        await self.node_servers[name].stop()
        self.stopped.add(name)

    async def restart_node(self, name: str, node: FakeNode | None = None) -> FakeNode:
        """Bring a stopped node back on the same port (the same FakeNode unless another is given)."""
        node = node or self.nodes[name]
        port = int(self.node_servers[name].url.rsplit(":", 1)[1])
        self.node_servers[name] = await PinnedServer(node.app(), port).start()
        self.nodes[name] = node
        self.stopped.discard(name)
        return node

    async def join(self, name: str, **fields: Any) -> httpx.Response:
        """POST /herd/join for a node started with `add_node(..., static=False)`, with the herd token."""
        assert self.router is not None
        node = self.nodes[name]
        body = {"url": self.node_url(name), "name": name, "models": [node.model], "slots": node.slots, **fields}
        async with httpx.AsyncClient(base_url=self.router.url) as client:
            return await client.post("/herd/join", json=body, headers={"Authorization": f"Bearer {HERD_TOKEN}"})

    async def node_states(self) -> dict[str, str]:
        assert self.admin is not None
        return {n["name"]: n["state"] for n in (await self.admin.get("/admin/nodes")).json()["data"]}

    async def wait_state(self, name: str, state: str, *, within: float = 5.0) -> None:
        """Poll /admin/nodes until the node named `name` is in `state`."""
        deadline = asyncio.get_running_loop().time() + within
        while (states := await self.node_states()).get(name) != state:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"node {name!r} is not {state!r} after {within}s: {states}")
            await asyncio.sleep(0.02)

    async def start(self, **overrides: Any) -> RunningServer:
        tracing = overrides.pop("tracing", None)  # a llamakit.telemetry.Tracing for the router's spans
        settings = RouterSettings(
            db=overrides.pop("db", self.tmp / "ledger.db"),
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=[s.url for name, s in self.node_servers.items() if name in self.static],
            health_interval=0.1,
            base_fee=10,
            prompt_token_fee=1,
            completion_token_fee=2,
            **overrides,
        )
        self.router = await RunningServer(create_app(settings, tracing=tracing)).start()
        self.admin = httpx.AsyncClient(
            base_url=self.router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )
        await self.wait_ready(len(self.static))
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
        books.pop("audit")  # what the last audit found (see test_books_audit.py)
        return books

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.aclose()
        if self.router is not None:
            await self.router.stop()
        for name, server in self.node_servers.items():
            if name not in self.stopped:
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
