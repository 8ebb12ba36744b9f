"""llama.cpp's own llama-server for tests: where its binary is, and one running on a loopback port.

The binary is `$LLAMAKIT_TEST_LLAMA_SERVER`, else the one `bench/build_llama_server.py` keeps in its cache for the
installed llama-cpp-python. Without it the tests that need it skip, saying why; with
`LLAMAKIT_REQUIRE_LLAMA_SERVER=1` (CI, which builds it) they fail instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port

BINARY_ENV = "LLAMAKIT_TEST_LLAMA_SERVER"
REQUIRE_ENV = "LLAMAKIT_REQUIRE_LLAMA_SERVER"
ROOT = Path(__file__).resolve().parents[2]


def find_llama_server() -> tuple[str | None, str]:
    """The llama-server binary to test with, or None and why there is none."""
    given = os.environ.get(BINARY_ENV)
    if given:
        if os.access(given, os.X_OK):
            return given, ""
        return None, f"${BINARY_ENV} is {given!r}, which is not an executable file"
    spec = importlib.util.spec_from_file_location("build_llama_server", ROOT / "bench" / "build_llama_server.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        version = build.installed_version()
    except SystemExit as exc:
        return None, str(exc)
    binary = build.cache_dir(version, []) / "bin" / "llama-server"
    if os.access(binary, os.X_OK):
        return str(binary), ""
    return None, (
        f"no llama-server at {binary}: build it with `python bench/build_llama_server.py` (6-8 minutes on two "
        f"cores) or point ${BINARY_ENV} at one"
    )


def llama_server_or_skip() -> str:
    """The binary; the test skips without it, or fails when $LLAMAKIT_REQUIRE_LLAMA_SERVER is 1."""
    binary, why = find_llama_server()
    if binary is not None:
        return binary
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"llama-server is required here (${REQUIRE_ENV}=1) but missing: {why}")
    pytest.skip(why)


def model_path() -> str:
    from llamakit.catalog import DEFAULT_MODEL, resolve_model

    return str(resolve_model(DEFAULT_MODEL).path)


@dataclass
class LlamaServer:
    """A llama-server process on 127.0.0.1 and a client of it (with its API key)."""

    process: subprocess.Popen[bytes]
    url: str
    api_key: str
    log: Any

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def output(self) -> str:
        self.log.seek(0)
        text: str = self.log.read().decode(errors="replace")
        return text[-3000:]


@contextmanager
def running_llama_server(
    binary: str, *, slots: int = 2, n_ctx: int = 1024, extra: tuple[str, ...] = ()
) -> Iterator[LlamaServer]:
    """llama-server serving the default model with `slots` slots of `n_ctx` tokens on one thread, as docs/node.md
    says to run one behind a node (an API key, a loopback address, no RAM prompt cache), and `extra` flags;
    stopped at the end."""
    from llamakit.catalog import DEFAULT_MODEL

    port, key = free_port(), "test-llama-server-key"
    command = [
        binary, "--model", model_path(), "--alias", DEFAULT_MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
        "--parallel", str(slots), "--ctx-size", str(n_ctx * slots), "--threads", "1", "--threads-batch", "1",
        "--cache-ram", "0", "--no-prefill-assistant", "--no-webui", *extra,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        server = LlamaServer(process, f"http://127.0.0.1:{port}", key, log)
        try:
            for _ in range(1200):  # it loads the 135M model in about a second
                if process.poll() is not None:
                    break
                try:
                    if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            else:
                raise RuntimeError(f"llama-server did not become ready; its log ends:\n{server.output()}")
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({process.returncode}); its log ends:\n{server.output()}")
            yield server
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@asynccontextmanager
async def spying(node: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """Every event llama-server sends the node meanwhile, as it came over the wire."""
    from llamakit.node.llama_server import LlamaServerClient
    from llamakit.node.llama_server_app import FRONTED

    client: LlamaServerClient = node.app[FRONTED].client
    seen: list[dict[str, Any]] = []
    real = client.stream

    @asynccontextmanager
    async def stream(path: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        async with real(path, body) as events:
            yield _Recorded(events, seen)

    client.stream = stream  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        client.stream = real  # type: ignore[method-assign]


class _Recorded:
    def __init__(self, events: Any, seen: list[dict[str, Any]]) -> None:
        self.events, self.seen = events, seen

    def __aiter__(self) -> _Recorded:
        return self

    async def __anext__(self) -> dict[str, Any]:
        event: dict[str, Any] = await self.events.__anext__()
        self.seen.append(event)
        return event


def reported_usage(seen: list[dict[str, Any]]) -> dict[str, Any]:
    """llama-server's `usage` of one generation, as a node in front of it reports it: its completion tokens less
    the end-of-generation token when it ended on one (`__verbose.stop_type` "eos"), which the other kind of node
    does not count (docs/node.md#exact-usage)."""
    usages = [e["usage"] for e in seen if e.get("usage")]
    assert len(usages) == 1, seen[-3:]
    usage = dict(usages[0])
    if ended_on_eog(seen):
        usage["completion_tokens"] -= 1
    return usage


def ended_on_eog(seen: list[dict[str, Any]]) -> bool:
    """Whether llama-server said the generation ended on an end-of-generation token."""
    return any((e.get("__verbose") or {}).get("stop_type") == "eos" for e in seen)


async def processing(upstream: LlamaServer) -> list[int]:
    async with upstream.client() as c:
        return [s["id"] for s in (await c.get("/slots")).json() if s["is_processing"]]


async def until_processing(upstream: LlamaServer) -> None:
    for _ in range(2000):
        if await processing(upstream):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("llama-server never started generating")


async def until_idle(upstream: LlamaServer) -> list[int]:
    for _ in range(500):
        busy = await processing(upstream)
        if not busy:
            return busy
        await asyncio.sleep(0.02)
    return busy
