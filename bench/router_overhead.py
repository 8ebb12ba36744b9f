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
* ``router``: → ``python -m llamakit.router`` with its ledger on (a SQLite file in a temp dir, WAL), an account
  made through the admin API with a large deposit, requests sent with its API key → the node.

Each server is its own process (the node and the proxy are modes of this file), as deployed; the load
generator is one process with an aiohttp client and a pool of ``concurrency`` connections, run at
concurrency 1, 16 and 64 for a fixed number of seconds per cell after a short warm-up. The machine is small
and noisy, so the contenders are interleaved per concurrency level in an order that rotates every round, and
the median over rounds is reported: requests per second, latency p50 and p99, and what each adds over
``direct``. The headline is the router against the floor: its ratio in requests per second (aim ≥ 0.6 and
≥ 1,000 rps at the highest concurrency) and its added p50 latency at concurrency 1 (aim ≤ 1 ms).

The router must have done the real work: after the run, ``GET /admin/books`` must balance, and the ledger must
hold exactly one charge of the expected amount per request sent to the router (warm-ups included).

Run: ``.venv/bin/python bench/router_overhead.py [--rounds 3] [--seconds 2] [--concurrency 1 16 64]``; results
go to stdout and to ``bench/results/router_overhead.json``. ``--profile-router FILE`` attaches ``py-spy record
--idle`` (``pip install py-spy``) to the router for the whole run and writes a flame graph (``.svg``), a
speedscope file (``.json``) or collapsed stacks (``.txt``).
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "router_overhead.json"
CONTENDERS = ("direct", "floor", "router")
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
COMPLETION_BODY = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": " hello" * COMPLETION_TOKENS, "finish_reason": "length", "logprobs": None}],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    },
    separators=(",", ":"),
).encode()


# --- the servers: modes of this file, each run in its own process ----------------------------------------


def node_app(name: str, slots: int) -> web.Application:
    """A node that answers every completion at once with the same body, and says it is ready."""
    health = json.dumps({"status": "ready", "name": name, "models": [MODEL], "slots": slots, "busy": 0}).encode()

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=COMPLETION_BODY, content_type="application/json")

    async def get_health(request: web.Request) -> web.Response:
        return web.Response(body=health, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/health", get_health)
    return app


def proxy_app(upstream: str) -> web.Application:
    """The thinnest aiohttp proxy: read the body, POST it to the node on a shared session, return its bytes."""
    session_key = web.AppKey("session", aiohttp.ClientSession)
    target = upstream.rstrip("/") + "/v1/completions"

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        session = request.app[session_key]
        async with session.post(target, data=body, headers={"Content-Type": "application/json"}) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

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
class Setup:
    """The running servers, what to call for each contender, and the router's secrets."""

    node: Server
    proxy: Server
    router: Server
    admin_key: str
    api_key: str
    db: Path
    targets: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)


@contextmanager
def running(tmp: Path, profile: Path | None) -> Iterator[Setup]:
    node_port, proxy_port, router_port = free_port(), free_port(), free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    admin_key, herd_token, db = "bench-admin-key", "bench-herd-token", tmp / "ledger.db"
    router_command = [
        sys.executable, "-m", "llamakit.router",
        "--host", "127.0.0.1",
        "--port", str(router_port),
        "--db", str(db),
        "--admin-key", admin_key,
        "--herd-token", herd_token,
        "--node", f"http://127.0.0.1:{node_port}",
        "--base-fee", str(BASE_FEE),
        "--prompt-token-fee", str(PROMPT_TOKEN_FEE),
        "--completion-token-fee", str(COMPLETION_TOKEN_FEE),
    ]  # fmt: skip
    with ExitStack() as stack:
        node = stack.enter_context(
            server("node", [*me, "node", "--port", str(node_port), "--slots", str(NODE_SLOTS)], node_port)
        )
        proxy = stack.enter_context(
            server("proxy", [*me, "proxy", "--port", str(proxy_port), "--upstream", node.url], proxy_port)
        )
        router = stack.enter_context(server("router", router_command, router_port))
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            _wait(node, lambda: http.get(f"{node.url}/health").json()["status"] == "ready")
            _wait(proxy, lambda: http.post(f"{proxy.url}/v1/completions", content=REQUEST_BODY).status_code == 200)
            admin = {"Authorization": f"Bearer {admin_key}"}

            def node_ready() -> bool:
                nodes = http.get(f"{router.url}/admin/nodes", headers=admin).json()["data"]
                return any(n["state"] == "ready" and MODEL in n["models"] for n in nodes)

            _wait(router, node_ready)
            made = http.post(f"{router.url}/admin/accounts", headers=admin, json={"name": "bench", "deposit": DEPOSIT})
            made.raise_for_status()
            api_key: str = made.json()["api_key"]
        if profile is not None:
            stack.enter_context(profiling(router.process.pid, profile))
        setup = Setup(node, proxy, router, admin_key, api_key, db)
        json_headers = {"Content-Type": "application/json"}
        setup.targets = {
            "direct": (f"{node.url}/v1/completions", json_headers),
            "floor": (f"{proxy.url}/v1/completions", json_headers),
            "router": (f"{router.url}/v1/completions", {**json_headers, "Authorization": f"Bearer {api_key}"}),
        }
        yield setup


@contextmanager
def profiling(pid: int, output: Path) -> Iterator[None]:
    """py-spy attached to the router while the benchmark runs; SIGINT makes it stop and write `output`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".json": "speedscope", ".txt": "raw"}.get(output.suffix, "flamegraph")
    # --idle: a call that blocks the event loop (a lock, a disk write) costs latency even when it costs no CPU.
    command = [py_spy, "record", "--pid", str(pid), "--idle", "--rate", "250", "--format", fmt, "-o", str(output)]
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
    """One contender at one concurrency in one round."""

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def _load(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], concurrency: int, seconds: float
) -> tuple[list[float], int, int, float]:
    """`concurrency` workers posting back to back for `seconds`: latencies, requests, errors, wall seconds."""
    latencies: list[float] = []
    counts = [0, 0]  # requests, errors

    async def worker(deadline: float) -> None:
        clock = time.perf_counter
        while (started := clock()) < deadline:
            async with session.post(url, data=REQUEST_BODY, headers=headers) as resp:
                await resp.read()
                ok = resp.status == 200
            latencies.append(clock() - started)
            counts[0] += 1
            if not ok:
                counts[1] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
    return latencies, counts[0], counts[1], time.perf_counter() - started


async def measure_cell(
    setup: Setup, contender: str, concurrency: int, round_: int, seconds: float, warmup: float
) -> tuple[Cell, int]:
    """Warm a fresh connection pool up, then measure; returns the cell and every request sent (warm-up too)."""
    url, headers = setup.targets[contender]
    middle = {"direct": None, "floor": setup.proxy, "router": setup.router}[contender]
    processes = {"node": setup.node} | ({contender: middle} if middle is not None else {})
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as s:
        _, warm_requests, warm_errors, _ = await _load(s, url, headers, concurrency, warmup)
        before = {name: p.cpu_seconds() for name, p in processes.items()}
        me_before = time.process_time()
        latencies, requests, errors, wall = await _load(s, url, headers, concurrency, seconds)
        me_cpu = time.process_time() - me_before
        after = {name: p.cpu_seconds() for name, p in processes.items()}
    cpu_us = {"loadgen": me_cpu / requests * 1e6}
    for name in processes:
        b, a = before[name], after[name]
        if a is not None and b is not None:
            cpu_us[name] = (a - b) / requests * 1e6
    ordered = sorted(latencies)
    cell = Cell(
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
    )
    return cell, warm_requests + requests


async def measure(
    setup: Setup, levels: Sequence[int], rounds: int, seconds: float, warmup: float, pause: float
) -> tuple[list[Cell], int]:
    """Rounds × levels × contenders, the contenders' order rotating by one per round and level."""
    cells: list[Cell] = []
    sent_to_router = 0
    names = list(CONTENDERS)
    for r in range(rounds):
        for i, level in enumerate(levels):
            shift = (r + i) % len(names)
            line = []
            for name in names[shift:] + names[:shift]:
                cell, sent = await measure_cell(setup, name, level, r, seconds, warmup)
                cells.append(cell)
                if name == "router":
                    sent_to_router += sent
                line.append(f"{name} {cell.rps:7.0f} rps p50 {cell.p50_ms:6.2f} ms")
                await asyncio.sleep(pause)
            print(f"  round {r + 1}/{rounds}  c={level:<3}  " + "  ".join(line), flush=True)
    return cells, sent_to_router


# --- checks and the report --------------------------------------------------------------------------------


def verify_books(setup: Setup, sent: int) -> dict[str, Any]:
    """The router really priced, held and settled every request: balanced books, one charge per request."""
    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
        resp = http.get(f"{setup.router.url}/admin/books", headers={"Authorization": f"Bearer {setup.admin_key}"})
        resp.raise_for_status()
        books: dict[str, Any] = resp.json()
    # The ledger is the authority on what was charged; WAL lets a reader look while the router writes.
    with closing(sqlite3.connect(f"file:{setup.db}?mode=ro", uri=True)) as conn:
        charges, credits = conn.execute("SELECT COUNT(*), COALESCE(SUM(amount), 0) FROM charges").fetchone()
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM usage GROUP BY status").fetchall())
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


def summarise(cells: list[Cell], levels: Sequence[int]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per concurrency level and contender: medians over rounds, and what each adds over `direct`."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for level in levels:
        row: dict[str, dict[str, Any]] = {}
        for name in CONTENDERS:
            mine = [c for c in cells if c.contender == name and c.concurrency == level]
            cpu_names = sorted({k for c in mine for k in c.cpu_us})
            row[name] = {
                "rps": statistics.median(c.rps for c in mine),
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
        for name in CONTENDERS:
            row[name]["added_p50_ms_vs_direct"] = row[name]["p50_ms"] - row["direct"]["p50_ms"]
            row[name]["added_p99_ms_vs_direct"] = row[name]["p99_ms"] - row["direct"]["p99_ms"]
        table[str(level)] = row
    return table


def _paired(cells: list[Cell], level: int, value: str, combine: Callable[[float, float], float]) -> float:
    """The median over rounds of combine(router, floor) within the same round: robust to drifts in load."""
    by_round: dict[int, dict[str, Cell]] = {}
    for c in cells:
        if c.concurrency == level:
            by_round.setdefault(c.round, {})[c.contender] = c
    pairs = [combine(getattr(r["router"], value), getattr(r["floor"], value)) for r in by_round.values()]
    return statistics.median(pairs)


def headline(cells: list[Cell], table: dict[str, dict[str, dict[str, Any]]], levels: Sequence[int]) -> dict[str, Any]:
    top, low = max(levels), min(levels)
    router_top = table[str(top)]["router"]["rps"]
    ratio_top = router_top / table[str(top)]["floor"]["rps"]
    added_low = table[str(low)]["router"]["p50_ms"] - table[str(low)]["floor"]["p50_ms"]
    return {
        "router_over_floor_rps": {
            str(n): table[str(n)]["router"]["rps"] / table[str(n)]["floor"]["rps"] for n in levels
        },
        "paired_router_over_floor_rps": {str(n): _paired(cells, n, "rps", lambda a, b: a / b) for n in levels},
        "router_added_p50_ms_vs_floor": {
            str(n): table[str(n)]["router"]["p50_ms"] - table[str(n)]["floor"]["p50_ms"] for n in levels
        },
        "paired_router_added_p50_ms_vs_floor": {
            str(n): _paired(cells, n, "p50_ms", lambda a, b: a - b) for n in levels
        },
        "aim_throughput": {
            "concurrency": top,
            "router_rps": router_top,
            "ratio": ratio_top,
            "met": ratio_top >= 0.6 and router_top >= 1000,
        },
        "aim_latency": {"concurrency": low, "added_p50_ms": added_low, "met": added_low <= 1.0},
    }


def report(table: dict[str, dict[str, dict[str, Any]]], head: dict[str, Any], books: dict[str, Any]) -> None:
    print()
    print(
        f"{'conc':>4}  {'contender':<9} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8}"
        f"  {'CPU µs/req: loadgen, middle, node':<34}"
    )
    for level, row in table.items():
        for name, r in row.items():
            cpu = r["cpu_us_per_request"]
            middle = "-" if name == "direct" else f"{cpu.get(name, 0):.0f}"
            cpu_text = f"{cpu.get('loadgen', 0):7.0f} {middle:>7} {cpu.get('node', 0):7.0f}"
            added = "" if name == "direct" else f"{r['added_p50_ms_vs_direct']:.3f} {r['added_p99_ms_vs_direct']:>8.3f}"
            figures = f"{r['rps']:>8.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {added:>17}"
            print(f"{level:>4}  {name:<9} {figures}  {cpu_text}")
        print()
    print(
        "(+p50/+p99: added over direct; CPU: median per request of the load generator, the proxy or router, the node)"
    )
    print()
    ratios = ", ".join(f"c={n} {v:.2f}" for n, v in head["router_over_floor_rps"].items())
    paired = ", ".join(f"c={n} {v:.2f}" for n, v in head["paired_router_over_floor_rps"].items())
    added = ", ".join(f"c={n} {v:+.3f}" for n, v in head["router_added_p50_ms_vs_floor"].items())
    t, lat = head["aim_throughput"], head["aim_latency"]
    print(f"router / floor rps: {ratios} (paired per round: {paired})")
    print(
        f"  at c={t['concurrency']}: {t['ratio']:.2f} × floor, {t['router_rps']:.0f} rps "
        f"(aim ≥ 0.6 × floor and ≥ 1,000 rps): {'met' if t['met'] else 'NOT met'}"
    )
    print(f"router p50 − floor p50 (ms): {added}")
    print(
        f"  at c={lat['concurrency']}: {lat['added_p50_ms']:+.3f} ms (aim ≤ 1 ms): {'met' if lat['met'] else 'NOT met'}"
    )
    b = books["books"]
    print(
        f"ledger: {books['charges']} charges ({books['charged_credits']} credits) for {books['requests_sent']} "
        f"requests sent to the router; books balanced={b.get('balanced')}, open holds={b.get('holds')}: "
        f"{'ok' if books['ok'] else 'FAILED'}"
    )
    for problem in books["problems"]:
        print(f"ERROR: {problem}", file=sys.stderr)
    for level, row in table.items():
        for name, r in row.items():
            if r["errors"]:
                print(f"WARNING: {name} at c={level} answered {r['errors']} request(s) with an error", file=sys.stderr)


# --- entry points -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every cell; the median is reported (3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell (2)")
    parser.add_argument("--warmup", type=float, default=0.3, help="unmeasured seconds per cell first (0.3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="levels (1 16 64)")
    parser.add_argument("--pause", type=float, default=0.2, help="idle seconds between cells (0.2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    parser.add_argument(
        "--profile-router",
        type=Path,
        default=None,
        metavar="FILE",
        help="py-spy the router: .svg, .json (speedscope) or .txt (collapsed stacks)",
    )
    modes = parser.add_subparsers(dest="mode", help="internal: run one of the servers in this process")
    node = modes.add_parser("node", help="the fake node")
    node.add_argument("--port", type=int, required=True)
    node.add_argument("--slots", type=int, default=NODE_SLOTS)
    node.add_argument("--name", default="fake-node")
    proxy = modes.add_parser("proxy", help="the floor: the thinnest aiohttp proxy")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    if args.mode is None and (args.rounds < 1 or args.seconds <= 0 or min(args.concurrency) < 1):
        parser.error("--rounds and --concurrency must be at least 1, --seconds positive")
    return args


def main() -> None:
    args = parse_args()
    if args.mode == "node":
        web.run_app(node_app(args.name, args.slots), host="127.0.0.1", port=args.port, print=None, access_log=None)
        return
    if args.mode == "proxy":
        web.run_app(proxy_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)
        return

    levels = sorted(set(args.concurrency))
    load_before = os.getloadavg()[0]
    print(
        f"router overhead: {args.rounds} rounds × concurrency {levels} × {len(CONTENDERS)} contenders, "
        f"{args.seconds:g} s per cell after {args.warmup:g} s of warm-up; {os.cpu_count()} CPUs, "
        f"load average {load_before:.2f}",
        flush=True,
    )
    if load_before > 0.5:
        print(
            f"WARNING: the machine is not idle (load average {load_before:.2f}); expect noisy figures", file=sys.stderr
        )
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp,
        running(Path(tmp), args.profile_router) as setup,
    ):
        cells, sent = asyncio.run(measure(setup, levels, args.rounds, args.seconds, args.warmup, args.pause))
        books = verify_books(setup, sent)
        router_log = setup.router.log_tail()
    table = summarise(cells, levels)
    head = headline(cells, table, levels)
    report(table, head, books)
    if args.profile_router is not None:
        print(f"\nrouter profile: {args.profile_router}")

    results = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "concurrency": levels,
            "pause": args.pause,
            "node_slots": NODE_SLOTS,
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
        "cells": [{**asdict(c), "rps": c.rps} for c in cells],
        "router_log_tail": router_log[-1000:] if not books["ok"] else "",
        "total_seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output} ({results['total_seconds']:.0f} s)")
    if not books["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
