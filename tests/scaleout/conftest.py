"""Several routers (`--cluster`) on one fresh PostgreSQL schema, in front of scripted fake nodes.

Needs `LLAMAKIT_TEST_POSTGRES` (see tests/router/ledger/conftest.py); skipped with that reason without it.
Routers run in this process (`start_router`) or as their own processes (`spawn_router`, for SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from tests.router.ledger.conftest import postgres_schema
from tests.support.fake_node import HERD_TOKEN, FakeNode
from tests.support.ports import free_port
from tests.support.servers import RunningServer

ADMIN_KEY = "test-admin-key"
ROOT = Path(__file__).parents[2]


def _popen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@dataclass
class Routers:
    """Routers sharing the database at `db`, and fake nodes on loopback."""

    db: str
    tmp: Path
    urls: list[str] = field(default_factory=list)
    servers: list[RunningServer] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    node_servers: dict[str, RunningServer] = field(default_factory=dict)
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    async def add_node(self, node: FakeNode) -> FakeNode:
        self.node_servers[node.name] = await RunningServer(node.app()).start()
        self.nodes[node.name] = node
        return node

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "db": self.db,
            "cluster": True,
            "admin_key": ADMIN_KEY,
            "herd_token": HERD_TOKEN,
            "health_interval": 0.1,
            "lease": 1.5,
            "base_fee": 10,
            "prompt_token_fee": 1,
            "completion_token_fee": 2,
            **overrides,
        }

    async def start_router(self, **overrides: Any) -> str:
        """A router in this process; returns its URL."""
        port = free_port()
        settings = RouterSettings(port=port, **self.settings(**overrides))
        server = RunningServer(create_app(settings))
        await server.runner.setup()
        from aiohttp import web

        await web.TCPSite(server.runner, "127.0.0.1", port).start()
        server.url = f"http://127.0.0.1:{port}"
        self.servers.append(server)
        self.urls.append(server.url)
        return server.url

    async def spawn_router(self, **overrides: Any) -> tuple[str, subprocess.Popen[bytes]]:
        """A router in a process of its own (`python -m llamakit.router`); returns its URL and process."""
        port = free_port()
        settings = self.settings(**overrides)
        argv = [sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", settings["db"]]
        argv += ["--cluster", "yes", "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN]
        argv += ["--health-interval", str(settings["health_interval"]), "--lease", str(settings["lease"])]
        argv += ["--base-fee", "10", "--prompt-token-fee", "1", "--completion-token-fee", "2"]
        for flag in ("queue_timeout", "max_queue", "router_id"):
            if flag in settings:
                argv += ["--" + flag.replace("_", "-"), str(settings[flag])]
        process = _popen(argv, self.tmp / f"router-{port}.log")
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(url + "/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise AssertionError(f"router exited: {(self.tmp / f'router-{port}.log').read_text()}")
                await asyncio.sleep(0.05)
        self.urls.append(url)
        return url, process

    def admin(self, url: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        self.clients.append(client)
        return client

    async def join(self, url: str, name: str) -> None:
        node = self.nodes[name]
        body = {"url": self.node_servers[name].url, "name": name, "models": [node.model], "slots": node.slots}
        async with httpx.AsyncClient(base_url=url) as client:
            resp = await client.post("/herd/join", json=body, headers={"Authorization": f"Bearer {HERD_TOKEN}"})
            assert resp.status_code == 201, resp.text

    async def wait_nodes(self, url: str, want: dict[str, str], *, within: float = 10.0) -> None:
        """Poll the router at `url` until its /admin/nodes shows each named node in the given state."""
        admin = self.admin(url)
        deadline = asyncio.get_running_loop().time() + within
        while True:
            states = {n["name"]: n["state"] for n in (await admin.get("/admin/nodes")).json()["data"]}
            if all(states.get(k) == v for k, v in want.items()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"router {url}: nodes {states}, wanted {want}")
            await asyncio.sleep(0.05)

    async def account(self, name: str, deposit: int) -> str:
        """A new account with `deposit` credits; returns its API key."""
        resp = await self.admin(self.urls[0]).post("/admin/accounts", json={"name": name, "deposit": deposit})
        assert resp.status_code == 201, resp.text
        key: str = resp.json()["api_key"]
        return key

    def client(self, url: str, key: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.clients.append(client)
        return client

    async def books(self) -> dict[str, Any]:
        books: dict[str, Any] = (await self.admin(self.urls[-1]).get("/admin/books")).json()
        return books

    async def stop(self) -> None:
        for client in self.clients:
            await client.aclose()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        for server in self.servers:
            await server.stop()
        for server in self.node_servers.values():
            await server.stop()


@pytest.fixture
async def routers(tmp_path: Path) -> AsyncIterator[Routers]:
    if not os.environ.get("LLAMAKIT_TEST_POSTGRES"):
        pytest.skip("LLAMAKIT_TEST_POSTGRES is not set: several routers need a PostgreSQL database")
    async with postgres_schema() as url:
        group = Routers(url, tmp_path)
        try:
            yield group
            if group.urls:
                books = await group.books()
                assert books["balanced"], f"the books do not balance: {books}"
                assert books["holds"] == 0, f"holds left open after the test: {books}"
        finally:
            await group.stop()
