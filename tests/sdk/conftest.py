"""Fixtures for the SDK: a real router (and scripted or real nodes) served from a background event loop.

The router tests serve their apps in the test's own loop, which a synchronous SDK call would block; here
the servers run on a loop in another thread, so sync calls, async calls and calls made inside a running
loop all reach them over real sockets.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from llamakit.sdk import Client, _default
from tests.support.fake_node import HERD_TOKEN, FakeNode
from tests.support.servers import RunningServer

ADMIN_KEY = "sdk-test-admin-key"
MODEL = "fake-model"

_T = TypeVar("_T")


class LoopThread:
    """An asyncio loop running forever in a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sdk-test-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    runner = LoopThread()
    yield runner
    runner.stop()


@pytest.fixture(autouse=True)
def isolated_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's environment or `llamakit up` profile, or another test's default client."""
    for name in ("LLAMAKIT_URL", "LLAMAKIT_API_KEY", "LLAMAKIT_USAGE_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLAMAKIT_PROFILE", str(tmp_path / "no-profile.json"))
    monkeypatch.setattr(_default, "_defaults", _default._Defaults())


def fees(prompt: int, completion: int, bid: float = 1.0) -> int:
    """The price of a call on the test router (base 10, 1 per prompt token, 2 per completion token)."""
    return math.ceil(bid * (10 + prompt + 2 * completion))


@dataclass
class ThreadedHerd:
    """A real router on a real SQLite ledger in front of scripted fake nodes, all served from `loop`."""

    loop: LoopThread
    tmp: Path
    nodes: dict[str, FakeNode] = field(default_factory=dict)
    servers: list[RunningServer] = field(default_factory=list)
    router: RunningServer | None = None
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.router is not None, "start() the herd first"
        return self.router.url

    def add_node(self, node: FakeNode) -> FakeNode:
        server = self.loop.run(RunningServer(node.app()).start())
        self.servers.append(server)
        self.nodes[node.name] = node
        return node

    def start(self, **overrides: Any) -> str:
        settings = RouterSettings(
            db=self.tmp / "ledger.db",
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=[s.url for s in self.servers],
            health_interval=0.1,
            base_fee=10,
            prompt_token_fee=1,
            completion_token_fee=2,
            **overrides,
        )
        self.router = self.loop.run(RunningServer(create_app(settings)).start())
        for _ in range(200):
            if self.admin("GET", "/health")["ready"] == len(self.nodes):
                return self.url
            time.sleep(0.02)
        raise AssertionError("the fake nodes did not become ready")

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        resp = httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)
        assert resp.is_success, resp.text
        return resp.json()

    def account(self, name: str, deposit: int) -> str:
        """A new funded account; returns its API key."""
        key: str = self.admin("POST", "/admin/accounts", json={"name": name, "deposit": deposit})["api_key"]
        return key

    def client(self, *, deposit: int = 100_000, name: str | None = None, **kwargs: Any) -> Client:
        key = self.account(name or f"acct-{len(self.clients)}", deposit)
        kwargs.setdefault("usage_log", None)
        client = Client(url=self.url, api_key=key, **kwargs)
        self.clients.append(client)
        return client

    def as_account(self, api_key: str, path: str) -> Any:
        resp = httpx.get(self.url + path, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
        assert resp.is_success, resp.text
        return resp.json()

    def spent(self, client: Client) -> int:
        spent: int = self.as_account(_key(client), "/v1/account")["spent"]
        return spent

    def router_usage(self, client: Client) -> list[dict[str, Any]]:
        """The router's usage records for the client's account, oldest first."""
        data: list[dict[str, Any]] = self.as_account(_key(client), "/v1/account/usage?limit=1000")["data"]
        return sorted(data, key=lambda r: r["id"])

    def wait_settled(self, timeout: float = 5.0) -> dict[str, Any]:
        """The books once no hold is open (a cut stream is settled a moment after the client leaves)."""
        deadline = time.monotonic() + timeout
        while True:
            books: dict[str, Any] = self.admin("GET", "/admin/books")
            if books["holds"] == 0 or time.monotonic() > deadline:
                return books
            time.sleep(0.02)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.router is not None:
            self.loop.run(self.router.stop())
        for server in self.servers:
            self.loop.run(server.stop())


def _key(client: Client) -> str:
    key = client._config.api_key
    assert key is not None
    return key


@pytest.fixture
def herd(loop_thread: LoopThread, tmp_path: Path) -> Iterator[ThreadedHerd]:
    h = ThreadedHerd(loop_thread, tmp_path)
    yield h
    try:
        if h.router is not None:
            books = h.wait_settled()
            assert books["balanced"], f"the books do not balance: {books}"
            assert books["holds"] == 0, f"holds left open after the test: {books}"
    finally:
        h.stop()


@dataclass
class LiveRouter:
    url: str
    api_key: str
    model: str


@pytest.fixture(scope="module")
def live_router(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    """A real router in front of a real node with the default model (as `tests/integration`), off-thread."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node

    tmp = tmp_path_factory.mktemp("live")
    node = loop_thread.run(
        RunningServer(
            create_node(NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name="real-node", threads=2))
        ).start(),
        timeout=120,
    )
    settings = RouterSettings(
        db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url], health_interval=0.2
    )
    router = loop_thread.run(RunningServer(create_app(settings)).start())
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with httpx.Client(base_url=router.url, headers=headers, timeout=30) as admin:
            for _ in range(1200):
                health = admin.get("/health").json()
                if health["ready"] == 1:
                    break
                time.sleep(0.1)
            created = admin.post("/admin/accounts", json={"name": "sdk-live", "deposit": 1_000_000}).json()
            yield LiveRouter(router.url, created["api_key"], health["models"][0])
            books = admin.get("/admin/books").json()
            assert books["balanced"] and books["holds"] == 0, books
    finally:
        loop_thread.run(router.stop())
        loop_thread.run(node.stop())
