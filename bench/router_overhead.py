"""What the llamakit router costs per request, against the thinnest possible aiohttp proxy and no proxy at all.

Every paid request goes through the router: it authenticates the key, prices the request, holds credits in the
SQLite ledger, picks a node, forwards, settles and records usage. On a real model that is dwarfed by
generation, but the router is one process in front of a whole herd: its per-request cost bounds how many
requests per second the herd can sell, and adds to every client's latency. To see that cost alone, this
script puts a fake node that answers at once (a fixed OpenAI-shaped completion with usage, 256 slots so it
never limits) behind three contenders and loads each from one client process:

* ``direct``: the load generator → the fake node. The floor of the machine: client, HTTP, loopback.
* ``floor``: → an aiohttp app with one handler that reads the body, POSTs it to the node through a shared
  ``aiohttp.ClientSession`` and returns the node's bytes → the node. What any aiohttp router must cost:
  one more process, one more server-side and one more client-side HTTP exchange.
* ``router``: → ``python -m llamakit.router`` with its ledger on (``--db sqlite``: a SQLite file in a temp dir,
  WAL; ``--db postgresql://…``: a fresh schema in that database, dropped afterwards), an account made through
  the admin API with a large deposit, requests sent with its API key → the node.

* ``ckpt-off``, ``ckpt-K``: the same router started with ``--checkpoint-tokens 0`` (a running stream never notes
  what it delivered: a crash refunds it in full) and ``--checkpoint-tokens K`` (a checkpoint every K tokens), each
  on a ledger of its own (``--checkpoint-tokens 0 1`` by default: none, and one at every flush, the most a stream
  can make; none with ``--checkpoint-tokens`` alone). The
  ``router`` contender runs the router's defaults (every 32 tokens or 1000 ms, whichever first: never within this
  workload's 16-token streams, so it pays only the test for one). What checkpoints cost is ``ckpt-K`` against
  ``ckpt-off``: the router's CPU per request (its ledger's thread included; on PostgreSQL the server's work is
  not in it), SSE chunks per second and p50, and the checkpoints each stream made (the rise of the routers' own
  counter, ``llamakit_router_stream_checkpoints_total``, over each cell), hence the CPU per checkpoint.

Three workloads (``--workload``, all by default): ``whole`` posts a completion and reads the whole answer;
``stream`` asks for a stream (``"stream": true`` with ``include_usage``) and counts the SSE chunks it reads:
the node sends 16 token chunks, a finish chunk and a usage chunk per request, each its own write, and the
floor streams them through as they come (``iter_any``). For streams the headline is chunks per second. ``paced``
is ``stream`` with the node waiting 1 ms after each token chunk, so that each reaches the router in a read of its
own and goes to the client in a flush of its own, as a real node's tokens do (the router checkpoints a stream only
at a flush: ``stream``'s chunks arrive together and make few); the checkpoints' cost is measured on it.

The floor and the router run on the same event loop (``--loop``: uvloop, the router's default, or asyncio's
own), so that the ratio is what llamakit's work costs, not what a faster loop saves. Each server is its own
process (the node and the proxy are modes of this file), as deployed; the load
generator is one process with an aiohttp client and a pool of ``concurrency`` connections, run at
concurrency 1, 16 and 64 for a fixed number of seconds per cell after a short warm-up. The machine is small
and noisy, so the contenders are interleaved per concurrency level in an order that rotates every round, and
the median over rounds is reported: requests per second, latency p50 and p99, and what each adds over
``direct``. The headline is the router against the floor: its ratio in requests per second (aim ≥ 0.6 and
≥ 1,000 rps at the highest concurrency) and its added p50 latency at concurrency 1 (aim ≤ 1 ms).

The router must have done the real work: after the run, ``GET /admin/books`` must balance, and the ledger must
hold exactly one charge of the expected amount per request sent to the router (warm-ups included).

Run: ``.venv/bin/python bench/router_overhead.py [--db sqlite|postgresql://…] [--workload whole stream]
[--rounds 3] [--seconds 2] [--concurrency 1 16 64] [--checkpoint-tokens 0 4]``; results go to stdout and to
``bench/results/router_overhead[_postgres].json``. ``--profile-router FILE`` attaches ``py-spy record``
(``pip install py-spy``) to the router for the whole run and writes a flame graph (``.svg``), a speedscope
file (``.json``) or collapsed stacks (``.txt``) of its CPU time (``--profile-idle``: waits too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import httpx
from _processes import free_port, stop
from aiohttp import web

from llamakit.router.__main__ import new_event_loop
from llamakit.wire.headers import OVERHEAD_HEADER
from llamakit.wire.node import TokenCounts, with_counts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONTENDERS = ("direct", "floor", "router")
LOOPS = ("uvloop", "asyncio")
WORKLOADS = ("whole", "stream", "paced")
# A paced stream's node waits this long after each token chunk, so that each reaches the router in a read (and a
# flush to the client) of its own, as a real node's tokens do.
PACE_S = 0.001
PACED_PROMPT = "Say hello, one token at a time"
MODEL = "fake-model"
NODE_SLOTS = 256
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0

# The fees the router is started with, and the usage the fake node reports: every request costs the same.
BASE_FEE, PROMPT_TOKEN_FEE, COMPLETION_TOKEN_FEE = 10, 1, 2
PROMPT_TOKENS, COMPLETION_TOKENS = 3, 16
EXPECTED_CHARGE = BASE_FEE + PROMPT_TOKEN_FEE * PROMPT_TOKENS + COMPLETION_TOKEN_FEE * COMPLETION_TOKENS
DEPOSIT = 10**12

REQUEST_BODY = json.dumps({"model": MODEL, "prompt": "Say hello", "max_tokens": COMPLETION_TOKENS}).encode()
STREAM_BODY = json.dumps(
    {
        "model": MODEL,
        "prompt": "Say hello",
        "max_tokens": COMPLETION_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
).encode()
PACED_BODY = STREAM_BODY.replace(b'"Say hello"', json.dumps(PACED_PROMPT).encode())
BODIES = {"whole": REQUEST_BODY, "stream": STREAM_BODY, "paced": PACED_BODY}
# Bodies as a real node writes them (`llamakit.wire.completions`'s shapes, keys in its order), under the id a router
# gives the request (X-Llamakit-Request-Id; a fixed one for a direct client): ANSWER_ID is replaced by it.
ANSWER_ID = b"@answer-id@"
USAGE = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
}
COMPLETION_BODY = json.dumps(
    {
        "id": ANSWER_ID.decode(),
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": " hello" * COMPLETION_TOKENS, "logprobs": None, "finish_reason": "length"}],
        "usage": USAGE,
    },
    separators=(",", ":"),
).encode()


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": ANSWER_ID.decode(),
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": choices,
        "usage": usage,
    }


# The node's stream, as a real node sends it: token chunks with running counts (`llamakit`, last), a finish
# chunk, the usage chunk (asked for with include_usage), [DONE]. Each is one write.
STREAM_EVENTS = [
    *(
        _event(
            with_counts(
                _chunk([{"index": 0, "text": " hello", "logprobs": None, "finish_reason": None}]),
                TokenCounts(PROMPT_TOKENS, i),
            )
        )
        for i in range(1, COMPLETION_TOKENS + 1)
    ),
    _event(_chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}])),
    _event(_chunk([], USAGE)),
    b"data: [DONE]\n\n",
]
# What a client counts per stream: every data event but [DONE].
STREAM_CHUNKS = len(STREAM_EVENTS) - 1


# --- the servers: modes of this file, each run in its own process ----------------------------------------


def node_app(name: str, slots: int) -> web.Application:
    """A node that answers every completion at once with the same body, and says it is ready."""
    health = json.dumps({"status": "ready", "name": name, "models": [MODEL], "slots": slots, "busy": 0}).encode()

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer_id = request.headers.get("X-Llamakit-Request-Id", "cmpl-bench").encode()
        if b'"stream":true' not in body.replace(b" ", b""):
            return web.Response(body=COMPLETION_BODY.replace(ANSWER_ID, answer_id), content_type="application/json")
        paced = PACED_PROMPT.encode() in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, event in enumerate(STREAM_EVENTS):
            await resp.write(event.replace(ANSWER_ID, answer_id))
            if paced and i < COMPLETION_TOKENS:
                await asyncio.sleep(PACE_S)
        await resp.write_eof()
        return resp

    async def get_health(request: web.Request) -> web.Response:
        return web.Response(body=health, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/health", get_health)
    return app


def proxy_app(upstream: str) -> web.Application:
    """The thinnest aiohttp proxy: read the body, POST it to the node on a shared session, return its bytes.

    A stream (an event-stream answer) is passed on as its bytes arrive.
    """
    session_key = web.AppKey("session", aiohttp.ClientSession)
    target = upstream.rstrip("/") + "/v1/completions"

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[session_key]
        async with session.post(target, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.content_type != "text/event-stream":
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for piece in resp.content.iter_any():
                await out.write(piece)
            await out.write_eof()
            return out

    async def client(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[session_key] = session
            yield

    app = web.Application()
    app.router.add_post("/v1/completions", forward)
    app.cleanup_ctx.append(client)
    return app


# --- the processes -----------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_tail(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (Linux), to price a request in CPU as well as in time."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _clean_env() -> dict[str, str]:
    # LLAMAKIT_* variables from the caller's shell would change the router (fees, timeouts): leave them out.
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMAKIT_")}


@contextmanager
def server(name: str, command: list[str], port: int) -> Iterator[Server]:
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            yield Server(name, f"http://127.0.0.1:{port}", process, log)
        finally:
            stop(process)


def _wait(what: Server, ready: Callable[[], bool]) -> None:
    """Poll `ready()` until it returns True; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if what.process.poll() is not None:
            break
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(
        f"{what.name} did not become ready (exit code {what.process.poll()}); its log:\n{what.log_tail()}"
    )


@dataclass
class Variant:
    """One more router, started with `--checkpoint-tokens checkpoint_tokens`, on a ledger of its own (`db`)."""

    server: Server
    api_key: str
    db: str
    checkpoint_tokens: int


def variant_name(checkpoint_tokens: int) -> str:
    return "ckpt-off" if checkpoint_tokens == 0 else f"ckpt-{checkpoint_tokens}"


@dataclass
class Setup:
    """The running servers, what to call for each contender, and the router's secrets."""

    node: Server
    proxy: Server
    router: Server
    admin_key: str
    api_key: str
    db: str
    targets: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)  # by contender name (variant_name)

    @property
    def contenders(self) -> list[str]:
        return [*CONTENDERS, *self.variants]

    def middle(self, contender: str) -> Server | None:
        """The process between the load generator and the node for `contender` (None for `direct`)."""
        if contender in self.variants:
            return self.variants[contender].server
        return {"direct": None, "floor": self.proxy, "router": self.router}[contender]


@contextmanager
def ledger_database(choice: str, tmp: Path) -> Iterator[str]:
    """The router's --db: a SQLite file in `tmp`, or a fresh schema in the PostgreSQL database `choice` names."""
    if choice == "sqlite":
        yield str(tmp / "ledger.db")
        return
    import asyncpg

    schema = f"bench_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(choice)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{choice}{'&' if '?' in choice else '?'}search_path={schema}"
    finally:
        asyncio.run(execute(f"DROP SCHEMA {schema} CASCADE"))


@contextmanager
def running(
    tmp: Path,
    profile: Path | None,
    db_choice: str,
    *,
    profile_idle: bool = False,
    loop: str = "uvloop",
    checkpoints: Sequence[int] = (),
) -> Iterator[Setup]:
    """The node, the floor and the router running (and a router per `checkpoints`: `Setup.variants`)."""
    node_port, proxy_port, router_port = free_port(), free_port(), free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    admin_key, herd_token = "bench-admin-key", "bench-herd-token"
    router_command = [
        sys.executable, "-m", "llamakit.router",
        "--host", "127.0.0.1",
        "--port", str(router_port),
        "--db", "",  # set below, once the database is made
        "--admin-key", admin_key,
        "--herd-token", herd_token,
        "--node", f"http://127.0.0.1:{node_port}",
        "--base-fee", str(BASE_FEE),
        "--prompt-token-fee", str(PROMPT_TOKEN_FEE),
        "--completion-token-fee", str(COMPLETION_TOKEN_FEE),
        "--loop", loop,
    ]  # fmt: skip
    with ExitStack() as stack:
        db = stack.enter_context(ledger_database(db_choice, tmp))
        router_command[router_command.index("--db") + 1] = db
        node = stack.enter_context(
            server("node", [*me, "node", "--port", str(node_port), "--slots", str(NODE_SLOTS)], node_port)
        )
        proxy = stack.enter_context(
            server(
                "proxy", [*me, "proxy", "--port", str(proxy_port), "--upstream", node.url, "--loop", loop], proxy_port
            )
        )
        router = stack.enter_context(server("router", router_command, router_port))
        variants: dict[str, tuple[Server, str, int]] = {}
        for k in checkpoints:
            port, name = free_port(), variant_name(k)
            (tmp / name).mkdir()
            command = list(router_command)
            command[command.index("--port") + 1] = str(port)
            command[command.index("--db") + 1] = stack.enter_context(ledger_database(db_choice, tmp / name))
            command += ["--checkpoint-tokens", str(k)]
            variants[name] = (stack.enter_context(server(name, command, port)), command[command.index("--db") + 1], k)
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            _wait(node, lambda: http.get(f"{node.url}/health").json()["status"] == "ready")
            _wait(proxy, lambda: http.post(f"{proxy.url}/v1/completions", content=REQUEST_BODY).status_code == 200)
            admin = {"Authorization": f"Bearer {admin_key}"}

            def node_ready(at: Server) -> bool:
                nodes = http.get(f"{at.url}/admin/nodes", headers=admin).json()["data"]
                return any(n["state"] == "ready" and MODEL in n["models"] for n in nodes)

            def account(at: Server) -> str:
                _wait(at, lambda: node_ready(at))
                made = http.post(f"{at.url}/admin/accounts", headers=admin, json={"name": "bench", "deposit": DEPOSIT})
                made.raise_for_status()
                key: str = made.json()["api_key"]
                return key

            api_key = account(router)
            variant_keys = {name: account(at) for name, (at, _, _) in variants.items()}
        if profile is not None:
            stack.enter_context(profiling(router.process.pid, profile, idle=profile_idle))
        setup = Setup(node, proxy, router, admin_key, api_key, db)
        setup.variants = {name: Variant(at, variant_keys[name], where, k) for name, (at, where, k) in variants.items()}
        json_headers = {"Content-Type": "application/json"}
        setup.targets = {
            "direct": (f"{node.url}/v1/completions", json_headers),
            "floor": (f"{proxy.url}/v1/completions", json_headers),
            "router": (f"{router.url}/v1/completions", {**json_headers, "Authorization": f"Bearer {api_key}"}),
        }
        for name, v in setup.variants.items():
            authorized = {**json_headers, "Authorization": f"Bearer {v.api_key}"}
            setup.targets[name] = (f"{v.server.url}/v1/completions", authorized)
        yield setup


@contextmanager
def profiling(pid: int, output: Path, *, idle: bool) -> Iterator[None]:
    """py-spy attached to the router while the benchmark runs; SIGINT makes it stop and write `output`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".json": "speedscope", ".txt": "raw"}.get(output.suffix, "flamegraph")
    command = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", fmt, "-o", str(output)]
    if idle:  # a call that blocks the event loop (a lock, a disk write) costs latency even when it costs no CPU
        command.insert(4, "--idle")
    with tempfile.TemporaryFile() as log:
        spy = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            if not output.exists():
                log.seek(0)
                print(f"py-spy wrote no profile: {log.read().decode(errors='replace')[-2000:]}", file=sys.stderr)


# --- the load generator -----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One contender at one concurrency in one round of one workload."""

    workload: str
    contender: str
    concurrency: int
    round: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    # CPU microseconds per request of each process on the path (load generator, proxy or router, node).
    cpu_us: dict[str, float]
    chunks: int = 0  # SSE data events read (streams), [DONE] not counted
    # The router's own X-Llamakit-Overhead-Ms on its answers (median and p99 of the cell's; None elsewhere).
    overhead_p50_ms: float | None = None
    overhead_p99_ms: float | None = None
    checkpoints: int | None = None  # stream checkpoints a router made in the measured part (its counter's rise)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _load(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    concurrency: int,
    seconds: float,
    workload: str,
    overheads: list[float] | None = None,
) -> tuple[list[float], int, int, float, int]:
    """`concurrency` workers posting back to back for `seconds`: latencies, requests, errors, wall seconds and
    SSE chunks read. A stream that does not bring all its chunks counts as an error. The router's
    X-Llamakit-Overhead-Ms of each answer goes to `overheads`."""
    latencies: list[float] = []
    counts = [0, 0, 0]  # requests, errors, chunks
    body = BODIES[workload]

    async def worker(deadline: float) -> None:
        clock = time.perf_counter
        while (started := clock()) < deadline:
            async with session.post(url, data=body, headers=headers) as resp:
                if overheads is not None and OVERHEAD_HEADER in resp.headers:
                    overheads.append(float(resp.headers[OVERHEAD_HEADER]))
                if workload != "whole":
                    chunks = 0
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            chunks += 1
                    counts[2] += chunks
                    ok = resp.status == 200 and chunks == STREAM_CHUNKS
                else:
                    await resp.read()
                    ok = resp.status == 200
            latencies.append(clock() - started)
            counts[0] += 1
            if not ok:
                counts[1] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
    return latencies, counts[0], counts[1], time.perf_counter() - started, counts[2]


async def measure_cell(
    setup: Setup, workload: str, contender: str, concurrency: int, round_: int, seconds: float, warmup: float
) -> tuple[Cell, int]:
    """Warm a fresh connection pool up, then measure; returns the cell and every request sent (warm-up too)."""
    url, headers = setup.targets[contender]
    middle = setup.middle(contender)
    processes = {"node": setup.node} | ({contender: middle} if middle is not None else {})
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as s:
        _, warm_requests, warm_errors, _, _ = await _load(s, url, headers, concurrency, warmup, workload)
        routed = contender not in ("direct", "floor") and middle is not None
        checkpoints_before = await _checkpoints_so_far(s, middle) if routed and middle is not None else 0
        before = {name: p.cpu_seconds() for name, p in processes.items()}
        me_before = time.process_time()
        overheads: list[float] = []
        latencies, requests, errors, wall, chunks = await _load(
            s, url, headers, concurrency, seconds, workload, overheads
        )
        me_cpu = time.process_time() - me_before
        after = {name: p.cpu_seconds() for name, p in processes.items()}
        checkpoints = await _checkpoints_so_far(s, middle) - checkpoints_before if routed and middle else None
    cpu_us = {"loadgen": me_cpu / requests * 1e6}
    for name in processes:
        b, a = before[name], after[name]
        if a is not None and b is not None:
            cpu_us[name] = (a - b) / requests * 1e6
    ordered = sorted(latencies)
    told = sorted(overheads)
    cell = Cell(
        workload=workload,
        contender=contender,
        concurrency=concurrency,
        round=round_,
        requests=requests,
        errors=errors + warm_errors,
        seconds=wall,
        p50_ms=_percentile(ordered, 0.50) * 1000,
        p99_ms=_percentile(ordered, 0.99) * 1000,
        mean_ms=statistics.fmean(ordered) * 1000,
        cpu_us=cpu_us,
        chunks=chunks,
        overhead_p50_ms=_percentile(told, 0.50) if told else None,
        overhead_p99_ms=_percentile(told, 0.99) if told else None,
        checkpoints=checkpoints,
    )
    return cell, warm_requests + requests


async def _checkpoints_so_far(session: aiohttp.ClientSession, router: Server) -> int:
    """The stream checkpoints `router` has made, by its counter (read outside the CPU window of a cell)."""
    async with session.get(f"{router.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("llamakit_router_stream_checkpoints_total "):
            return round(float(line.split()[1]))
    return 0


async def measure(
    setup: Setup,
    workloads: Sequence[str],
    levels: Sequence[int],
    rounds: int,
    seconds: float,
    warmup: float,
    pause: float,
) -> tuple[list[Cell], dict[tuple[str, str], int]]:
    """Rounds × workloads × levels × contenders, the contenders' order rotating by one per round and level; and
    the requests sent to each router contender, warm-ups included, by (contender, workload)."""
    cells: list[Cell] = []
    sent_to: dict[tuple[str, str], int] = {}
    names = setup.contenders
    for r in range(rounds):
        for workload in workloads:
            for i, level in enumerate(levels):
                shift = (r + i) % len(names)
                line = []
                for name in names[shift:] + names[:shift]:
                    cell, sent = await measure_cell(setup, workload, name, level, r, seconds, warmup)
                    cells.append(cell)
                    if name not in ("direct", "floor"):
                        sent_to[name, workload] = sent_to.get((name, workload), 0) + sent
                    rate = f"{cell.chunks_per_s:7.0f} chunks/s" if workload != "whole" else f"{cell.rps:7.0f} rps"
                    line.append(f"{name} {rate} p50 {cell.p50_ms:6.2f} ms")
                    await asyncio.sleep(pause)
                print(f"  round {r + 1}/{rounds}  {workload:<6} c={level:<3}  " + "  ".join(line), flush=True)
    return cells, sent_to


# --- checks and the report --------------------------------------------------------------------------------


def _ledger_counts(db: str) -> tuple[int, int, dict[str, int]]:
    """Charges, credits charged and usage records by status, read from the ledger's database itself."""
    if not db.startswith("postgres"):
        # WAL lets a reader look while the router writes.
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            charges, credits = conn.execute("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM charges").fetchone()
            statuses = dict(conn.execute("SELECT status, COUNT(*) FROM usage GROUP BY status").fetchall())
        return charges, credits, statuses
    import asyncpg

    async def read() -> tuple[int, int, dict[str, int]]:
        conn = await asyncpg.connect(db)
        try:
            row = await conn.fetchrow("SELECT COUNT(*) AS n, COALESCE(SUM(amount), 0)::bigint AS c FROM charges")
            rows = await conn.fetch("SELECT status, COUNT(*) AS n FROM usage GROUP BY status")
        finally:
            await conn.close()
        return row["n"], row["c"], {r["status"]: r["n"] for r in rows}

    return asyncio.run(read())


def verify_books(setup: Setup, sent: int, contender: str = "router") -> dict[str, Any]:
    """The router really priced, held and settled every request: balanced books, one charge per request."""
    at, db = (setup.router, setup.db) if contender == "router" else (setup.variants[contender].server,
                                                                      setup.variants[contender].db)  # fmt: skip
    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
        resp = http.get(f"{at.url}/admin/books", headers={"Authorization": f"Bearer {setup.admin_key}"})
        resp.raise_for_status()
        books: dict[str, Any] = resp.json()
    # The ledger is the authority on what was charged.
    charges, credits, statuses = _ledger_counts(db)
    problems = []
    if not books.get("balanced"):
        problems.append(f"the books do not balance: {books}")
    if books.get("holds") != 0:
        problems.append(f"holds left open: {books['holds']} credits")
    if charges != sent:
        problems.append(f"{charges} charges for {sent} requests sent to the router (usage by status: {statuses})")
    if credits != sent * EXPECTED_CHARGE:
        problems.append(f"{credits} credits charged, expected {sent} × {EXPECTED_CHARGE} = {sent * EXPECTED_CHARGE}")
    return {
        "books": books,
        "charges": charges,
        "charged_credits": credits,
        "requests_sent": sent,
        "usage_by_status": statuses,
        "ok": not problems,
        "problems": problems,
    }


Table = dict[str, dict[str, dict[str, dict[str, Any]]]]  # workload → concurrency → contender → figures


def summarise(cells: list[Cell], workloads: Sequence[str], levels: Sequence[int]) -> Table:
    """Per workload, concurrency level and contender: medians over rounds, and what each adds over `direct`."""
    contenders = list(dict.fromkeys(c.contender for c in cells))
    table: Table = {}
    for workload in workloads:
        table[workload] = {}
        for level in levels:
            row: dict[str, dict[str, Any]] = {}
            for name in contenders:
                mine = [c for c in cells if (c.workload, c.contender, c.concurrency) == (workload, name, level)]
                cpu_names = sorted({k for c in mine for k in c.cpu_us})
                row[name] = {
                    "rps": statistics.median(c.rps for c in mine),
                    "chunks_per_s": statistics.median(c.chunks_per_s for c in mine),
                    "p50_ms": statistics.median(c.p50_ms for c in mine),
                    "p99_ms": statistics.median(c.p99_ms for c in mine),
                    "cpu_us_per_request": {
                        k: statistics.median(c.cpu_us[k] for c in mine if k in c.cpu_us) for k in cpu_names
                    },
                    "rounds_rps": [c.rps for c in mine],
                    "rounds_p50_ms": [c.p50_ms for c in mine],
                    "rounds_p99_ms": [c.p99_ms for c in mine],
                    "requests": sum(c.requests for c in mine),
                    "errors": sum(c.errors for c in mine),
                }
                told = [c for c in mine if c.overhead_p50_ms is not None and c.overhead_p99_ms is not None]
                if told:  # the router's own figure of what it costs (X-Llamakit-Overhead-Ms)
                    row[name]["overhead_header_p50_ms"] = statistics.median(c.overhead_p50_ms or 0 for c in told)
                    row[name]["overhead_header_p99_ms"] = statistics.median(c.overhead_p99_ms or 0 for c in told)
            for name in contenders:
                row[name]["added_p50_ms_vs_direct"] = row[name]["p50_ms"] - row["direct"]["p50_ms"]
                row[name]["added_p99_ms_vs_direct"] = row[name]["p99_ms"] - row["direct"]["p99_ms"]
            table[workload][str(level)] = row
    return table


def _paired(
    cells: list[Cell],
    workload: str,
    level: int,
    value: str | Callable[[Cell], float],
    combine: Callable[[float, float], float],
    pair: tuple[str, str] = ("router", "floor"),
) -> float:
    """The median over rounds of combine(router, floor) (or of another `pair` of contenders) within the same round:
    robust to drifts in load. `value` is a Cell attribute, or a function of a Cell."""
    get = (lambda c: float(getattr(c, value))) if isinstance(value, str) else value
    by_round: dict[int, dict[str, Cell]] = {}
    for c in cells:
        if c.concurrency == level and c.workload == workload:
            by_round.setdefault(c.round, {})[c.contender] = c
    pairs = [combine(get(r[pair[0]]), get(r[pair[1]])) for r in by_round.values()]
    return statistics.median(pairs)


def checkpoint_costs(
    cells: list[Cell], levels: Sequence[int], variants: Sequence[str], workload: str
) -> dict[str, Any]:
    """What checkpoints cost a stream of `workload`: every checkpointing contender against `ckpt-off`, per
    concurrency (medians of per-round differences and ratios): router CPU µs per stream added, checkpoints per
    stream (its counter's rise over the cell's streams), CPU µs per checkpoint, SSE chunks per second, p50 added."""
    if "ckpt-off" not in variants:
        return {}
    out: dict[str, Any] = {}
    for name in variants:
        if name == "ckpt-off":
            continue
        pair = (name, "ckpt-off")
        figures: dict[str, Any] = {"workload": workload}
        for level in levels:
            mine = [c for c in cells if (c.workload, c.contender, c.concurrency) == (workload, name, level)]
            per_stream = statistics.median((c.checkpoints or 0) / c.requests for c in mine if c.requests)
            cpu = _paired(cells, workload, level, lambda c: c.cpu_us.get(c.contender, 0.0), lambda a, b: a - b, pair)
            figures[str(level)] = {
                "checkpoints_per_stream": per_stream,
                "router_cpu_us_per_stream_added": cpu,
                "router_cpu_us_per_checkpoint": cpu / per_stream if per_stream else None,
                "chunks_per_s_ratio": _paired(cells, workload, level, "chunks_per_s", lambda a, b: a / b, pair),
                "p50_ms_added": _paired(cells, workload, level, "p50_ms", lambda a, b: a - b, pair),
            }
        out[name] = figures
    return out


# The aims on SQLite: router / floor requests per second at concurrency 16 and 64, added p50 at
# concurrency 1, router / floor SSE chunks per second.
AIM_RPS_RATIO, AIM_ADDED_P50_MS, AIM_CHUNKS_RATIO = 0.65, 1.0, 0.7


def headline(cells: list[Cell], table: Table, levels: Sequence[int]) -> dict[str, Any]:
    head: dict[str, Any] = {}
    low = min(levels)
    chunks = ("chunks_per_s", "router_over_floor_chunks_per_s")
    ratio = {"whole": ("rps", "router_over_floor_rps"), "stream": chunks, "paced": chunks}
    for workload, rows in table.items():
        value, name = ratio[workload]
        head[workload] = {
            name: {n: rows[n]["router"][value] / rows[n]["floor"][value] for n in rows},
            "paired_" + name: {str(n): _paired(cells, workload, n, value, lambda a, b: a / b) for n in levels},
            "router_added_p50_ms_vs_floor": {n: rows[n]["router"]["p50_ms"] - rows[n]["floor"]["p50_ms"] for n in rows},
            "paired_router_added_p50_ms_vs_floor": {
                str(n): _paired(cells, workload, n, "p50_ms", lambda a, b: a - b) for n in levels
            },
        }
    if "whole" in head:
        ratios = head["whole"]["paired_router_over_floor_rps"]
        high = [n for n in levels if n >= 16]
        head["aims"] = {
            "rps_ratio_at_16_and_64": {
                "values": {str(n): ratios[str(n)] for n in high},
                "met": all(ratios[str(n)] >= AIM_RPS_RATIO for n in high),
            },
            "added_p50_ms_at_1": {
                "value": head["whole"]["paired_router_added_p50_ms_vs_floor"][str(low)],
                "met": head["whole"]["paired_router_added_p50_ms_vs_floor"][str(low)] <= AIM_ADDED_P50_MS,
            },
        }
    if "stream" in head:
        chunk_ratios = head["stream"]["paired_router_over_floor_chunks_per_s"]
        head.setdefault("aims", {})["chunks_ratio"] = {
            "values": chunk_ratios,
            "met": all(v >= AIM_CHUNKS_RATIO for v in chunk_ratios.values()),
        }
    return head


def report(table: Table, head: dict[str, Any], books: dict[str, Any], db: str) -> None:
    for workload, rows in table.items():
        rate = "chunks/s" if workload != "whole" else "rps"
        print()
        print(
            f"{workload:<6} {'conc':>4}  {'contender':<9} {rate:>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
            f"{'+p99 ms':>8}  {'CPU µs/req: loadgen, middle, node':<34}"
        )
        for level, row in rows.items():
            for name, r in row.items():
                cpu = r["cpu_us_per_request"]
                middle = "-" if name == "direct" else f"{cpu.get(name, 0):.0f}"
                cpu_text = f"{cpu.get('loadgen', 0):7.0f} {middle:>7} {cpu.get('node', 0):7.0f}"
                added = (
                    "" if name == "direct" else f"{r['added_p50_ms_vs_direct']:.3f} {r['added_p99_ms_vs_direct']:>8.3f}"
                )
                shown = r["chunks_per_s"] if workload != "whole" else r["rps"]
                figures = f"{shown:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {added:>17}"
                print(f"{'':<6} {level:>4}  {name:<9} {figures}  {cpu_text}")
            print()
    print(
        "(+p50/+p99: added over direct; CPU: median per request of the load generator, the proxy or router, the node)"
    )
    print()
    print(f"ledger: {db}")
    if "whole" in head:
        w = head["whole"]
        paired = ", ".join(f"c={n} {v:.2f}" for n, v in w["paired_router_over_floor_rps"].items())
        added = ", ".join(f"c={n} {v:+.3f}" for n, v in w["paired_router_added_p50_ms_vs_floor"].items())
        print(f"router / floor requests per second (median of per-round ratios): {paired}")
        print(f"router p50 − floor p50 (ms): {added}")
    if "stream" in head:
        st = head["stream"]
        paired = ", ".join(f"c={n} {v:.2f}" for n, v in st["paired_router_over_floor_chunks_per_s"].items())
        added = ", ".join(f"c={n} {v:+.3f}" for n, v in st["paired_router_added_p50_ms_vs_floor"].items())
        print(f"router / streaming floor SSE chunks per second: {paired}")
        print(f"router p50 − floor p50 for a whole stream (ms): {added}")
    aims = head.get("aims", {})
    if "rps_ratio_at_16_and_64" in aims:
        rps_met = "met" if aims["rps_ratio_at_16_and_64"]["met"] else "NOT met"
        p50_met = "met" if aims["added_p50_ms_at_1"]["met"] else "NOT met"
        print(f"aim ≥ {AIM_RPS_RATIO} × floor rps at c ≥ 16: {rps_met}; aim ≤ +{AIM_ADDED_P50_MS:g} ms p50: {p50_met}")
    if "chunks_ratio" in aims:
        print(f"aim ≥ {AIM_CHUNKS_RATIO} × floor chunks/s: {'met' if aims['chunks_ratio']['met'] else 'NOT met'}")
    b = books["books"]
    print(
        f"ledger check: {books['charges']} charges ({books['charged_credits']} credits) for {books['requests_sent']} "
        f"requests sent to the router; books balanced={b.get('balanced')}, open holds={b.get('holds')}: "
        f"{'ok' if books['ok'] else 'FAILED'}"
    )
    for workload, rows in table.items():
        told = [
            f"c={level} p50 {r['overhead_header_p50_ms']:.3f} p99 {r['overhead_header_p99_ms']:.3f}"
            for level, r in ((level, row["router"]) for level, row in rows.items())
            if "overhead_header_p50_ms" in r
        ]
        if told:
            scope = "up to the first byte" if workload != "whole" else "up to its settlement"
            print(f"router's X-Llamakit-Overhead-Ms ({workload}, {scope}; ms): {'; '.join(told)}")
    for name, figures in head.get("checkpoints", {}).items():
        print(
            f"checkpoints, {name} against ckpt-off, {figures['workload']} streams of {COMPLETION_TOKENS} tokens: "
            + "; ".join(
                f"c={level} {f['checkpoints_per_stream']:.1f} checkpoints/stream, router CPU "
                f"{f['router_cpu_us_per_stream_added']:+.0f} µs/stream"
                + (f" ({f['router_cpu_us_per_checkpoint']:+.0f} µs/checkpoint)" if f["router_cpu_us_per_checkpoint"]
                   is not None else "")
                + f", chunks/s ×{f['chunks_per_s_ratio']:.3f}, p50 {f['p50_ms_added']:+.3f} ms"
                for level, f in figures.items() if isinstance(f, dict)
            )
        )  # fmt: skip
    for problem in books["problems"]:
        print(f"ERROR: {problem}", file=sys.stderr)
    for workload, rows in table.items():
        for level, row in rows.items():
            for name, r in row.items():
                if r["errors"]:
                    print(
                        f"WARNING: {name} ({workload}) at c={level} answered {r['errors']} request(s) with an error",
                        file=sys.stderr,
                    )


# --- entry points -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--db",
        default="sqlite",
        help="the router's ledger: 'sqlite' (a file in a temp dir, the default) or a postgresql:// URL of a "
        "database in which a fresh schema is made for the run and dropped after it",
    )
    parser.add_argument(
        "--workload", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="whole, stream, paced (all three)"
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="uvloop",
        help="the event loop of the floor and the router alike (uvloop, the router's default, or asyncio)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell; the median is reported (3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell (2)")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per cell first (0.3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="levels (1 16 64)")
    parser.add_argument("--pause", type=float, default=0.2, help="idle seconds between cells (0.2)")
    parser.add_argument(
        "--checkpoint-tokens",
        type=int,
        nargs="*",
        default=[0, 1],
        metavar="K",
        help="one more router per K, started with --checkpoint-tokens K (0: none), for what stream checkpoints "
        "cost (0 1: none, and one at every flush, the most a stream can make; none when given alone)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the JSON results (bench/results/router_overhead*.json)",
    )
    parser.add_argument(
        "--profile-router",
        type=Path,
        default=None,
        metavar="FILE",
        help="py-spy the router: .svg, .json (speedscope) or .txt (collapsed stacks); CPU time only",
    )
    parser.add_argument(
        "--profile-idle",
        action="store_true",
        help="profile waits too (py-spy --idle): calls that block the event loop without using the CPU",
    )
    modes = parser.add_subparsers(dest="mode", help="internal: run one of the servers in this process")
    node = modes.add_parser("node", help="the fake node")
    node.add_argument("--port", type=int, required=True)
    node.add_argument("--slots", type=int, default=NODE_SLOTS)
    node.add_argument("--name", default="fake-node")
    proxy = modes.add_parser("proxy", help="the floor: the thinnest aiohttp proxy")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream", required=True)
    proxy.add_argument("--loop", choices=LOOPS, default="uvloop")
    args = parser.parse_args(argv)
    if args.mode is None and (args.rounds < 1 or args.seconds <= 0 or min(args.concurrency) < 1):
        parser.error("--rounds and --concurrency must be at least 1, --seconds positive")
    if args.mode is None and args.db != "sqlite" and not args.db.startswith(("postgresql://", "postgres://")):
        parser.error("--db must be 'sqlite' or a postgresql:// URL")
    return args


def main() -> None:
    args = parse_args()
    if args.mode == "node":
        web.run_app(node_app(args.name, args.slots), host="127.0.0.1", port=args.port, print=None, access_log=None)
        return
    if args.mode == "proxy":
        web.run_app(
            proxy_app(args.upstream),
            host="127.0.0.1",
            port=args.port,
            print=None,
            access_log=None,
            loop=new_event_loop(args.loop),
        )
        return

    levels = sorted(set(args.concurrency))
    workloads = [w for w in WORKLOADS if w in args.workload]
    backend = "sqlite" if args.db == "sqlite" else "postgres"
    output = args.output or RESULTS / (
        "router_overhead.json" if backend == "sqlite" else "router_overhead_postgres.json"
    )
    load_before = os.getloadavg()[0]
    print(
        f"router overhead ({backend} ledger): {args.rounds} rounds × {'/'.join(workloads)} × concurrency {levels} × "
        f"{len(CONTENDERS) + len(args.checkpoint_tokens)} contenders, {args.seconds:g} s per cell after "
        f"{args.warmup:g} s of warm-up; "
        f"{os.cpu_count()} CPUs, load average {load_before:.2f}; floor and router on the {args.loop} event loop",
        flush=True,
    )
    if load_before > 0.5:
        print(
            f"WARNING: the machine is not idle (load average {load_before:.2f}); expect noisy figures", file=sys.stderr
        )
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp,
        running(
            Path(tmp), args.profile_router, args.db, profile_idle=args.profile_idle, loop=args.loop,
            checkpoints=args.checkpoint_tokens,
        ) as setup,
    ):  # fmt: skip
        cells, sent = asyncio.run(measure(setup, workloads, levels, args.rounds, args.seconds, args.warmup, args.pause))
        routers = [name for name in setup.contenders if name not in ("direct", "floor")]
        checked = {name: verify_books(setup, sum(n for (c, _), n in sent.items() if c == name), name)
                   for name in routers}  # fmt: skip
        books = checked["router"]
        for name, check in checked.items():
            if name != "router" and not check["ok"]:
                books["ok"] = False
                books["problems"] += [f"{name}: {problem}" for problem in check["problems"]]
        router_log = setup.router.log_tail()
    table = summarise(cells, workloads, levels)
    head = headline(cells, table, levels)
    streamed = [w for w in ("paced", "stream") if w in workloads]
    if streamed:
        head["checkpoints"] = checkpoint_costs(cells, levels, list(setup.variants), streamed[0])
    report(table, head, books, backend)
    if args.profile_router is not None:
        print(f"\nrouter profile: {args.profile_router}")

    results = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "db": backend,
            "loop": args.loop,
            "workloads": workloads,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": levels,
            "pause": args.pause,
            "node_slots": NODE_SLOTS,
            "stream_chunks": STREAM_CHUNKS,
            "checkpoint_tokens": args.checkpoint_tokens,
            "profiled": args.profile_router is not None,
        },
        "environment": {
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            # Other work on the machine shows here first: the figures are only as good as the machine was idle.
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "table": table,
        "headline": head,
        "ledger_check": books,
        "cells": [{**asdict(c), "rps": c.rps, "chunks_per_s": c.chunks_per_s} for c in cells],
        "router_log_tail": router_log[-1000:] if not books["ok"] else "",
        "total_seconds": time.perf_counter() - started,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output} ({results['total_seconds']:.0f} s)")
    if not books["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
