"""Does a router answer as fast after a million requests as after a thousand, on a disk that does not fill?

One router (``python -m llamakit.router``) on a SQLite or PostgreSQL ledger, in front of the fake node of
``router_overhead.py`` (it answers every completion at once). Its history is made in two ways: most of it
through the ledger's own API in this process (holds and settlements sent together, so that they share group
commits: the router's own batch path, with the router stopped), then the last thousand through the router
itself, as real paid requests at concurrency 16. At ``--base`` records (1,000) and again at ``--records``
(1,000,000 by default), it measures, each the median of 7 calls:

* the read paths: ``GET /admin/stats`` (time and size), ``GET /admin/books``, ``GET /v1/account``,
  ``GET /admin/usage?limit=50``;
* the paid path: a request's p50 at concurrency 1, and requests per second at concurrency 16 while a
  dashboard polls ``/admin/stats`` every second (its p50 under that load is printed too);
* the ledger on disk: the database (SQLite: the file after a clean stop; PostgreSQL: every table of the
  ledger's schema with its indexes and TOAST) and, on SQLite, the largest WAL seen at any moment of the run.

The read paths are measured at the level's records; the paid path then adds a few thousand more (requests
at c=16 for ``--seconds``), which the next level counts. It prints the ratio of each figure at ``--records`` to
``--base``, and the ledger's growth per request between them. Then, on a fresh ledger, ``/admin/stats`` at 10
and at ``--accounts`` (100,000) accounts that each made one request today: its time and size.

Aims (issue 29): every read path and the paid path within 1.2× from 1,000 to 1,000,000 records; the WAL under
64 MiB throughout; no more than about 1 KB a request before archiving; ``/admin/stats`` under 64 KiB and
within 1.2× from 10 to 100,000 accounts.

Run: ``.venv/bin/python bench/ledger_growth.py [--db sqlite|postgresql://…] [--records 1000000]
[--accounts 100000] [--seconds 5]``; results go to stdout and to ``bench/results/ledger_growth[_postgres].json``.
A million records takes SQLite some minutes on two shared cores, PostgreSQL longer: ``--records 100000`` is a
quicker look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from _processes import free_port
from router_overhead import (
    BASE_FEE,
    COMPLETION_TOKEN_FEE,
    COMPLETION_TOKENS,
    EXPECTED_CHARGE,
    MODEL,
    PROMPT_TOKEN_FEE,
    PROMPT_TOKENS,
    REQUEST_BODY,
    Server,
    _wait,
    ledger_database,
    server,
)

from llamakit.router.ledger import Ledger, hash_key, ledger_at

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ADMIN_KEY, HERD_TOKEN = "bench-admin-key", "bench-herd-token"
DEPOSIT = 10**14
HOLD = 1000  # what each filled request holds (it is charged EXPECTED_CHARGE, as the router's real ones)
CHUNK = 500  # holds (then settlements) sent together by the filler
REAL_TAIL = 1000  # real paid requests that end each level's history
NODES = 4  # the filled history's charges are spread over this many node names
MIB = 1024 * 1024


# --- the ledger, filled through its own API -----------------------------------------------------------------


async def _in_chunks(count: int, make: Callable[[int], Awaitable[Any]], chunk: int = CHUNK) -> None:
    for start in range(0, count, chunk):
        await asyncio.gather(*(make(i) for i in range(start, min(start + chunk, count))))


async def _history(ledger: Ledger, account_id: int, key_hash: str, count: int) -> None:
    """`count` settled requests of one account, as the router would leave them, CHUNK at a time."""
    for start in range(0, count, CHUNK):
        ids = [f"hist-{uuid.uuid4().hex}" for _ in range(min(CHUNK, count - start))]
        await asyncio.gather(
            *(ledger.hold(account_id, HOLD, request_id=r, model=MODEL, key_hash=key_hash) for r in ids)
        )
        await asyncio.gather(
            *(
                ledger.settle(
                    r,
                    charge=EXPECTED_CHARGE,
                    node=f"node-{i % NODES}",
                    prompt_tokens=PROMPT_TOKENS,
                    completion_tokens=COMPLETION_TOKENS,
                    latency_ms=1.5,
                    queue_ms=0.1,
                )
                for i, r in enumerate(ids)
            )
        )


async def _open_bench_account(db: str) -> str:
    """The account the bench sells to, with a large deposit; its API key."""
    async with ledger_at(db) as ledger:
        account = await ledger.create_account("bench")
        await ledger.deposit(account.id, DEPOSIT)
        return await ledger.create_key(account.id)


async def _fill(db: str, api_key: str, count: int) -> float:
    """`count` more settled requests of the bench account; the seconds it took."""
    started = time.perf_counter()
    async with ledger_at(db) as ledger:
        found = await ledger.authenticate(api_key)
        assert found is not None
        done = 0
        while done < count:  # in slices, so that progress shows
            step = min(count - done, 50_000)
            await _history(ledger, found.id, hash_key(api_key), step)
            done += step
            if count > 50_000:
                print(f"    filled {done:,}/{count:,} ({time.perf_counter() - started:.0f} s)", flush=True)
    return time.perf_counter() - started


async def _tenants(db: str, count: int, first: int) -> None:
    """Accounts t{first}… up to `count` in all, each with a deposit and one settled request today."""
    async with ledger_at(db) as ledger:
        accounts: list[int] = [0] * (count - first)

        async def make(i: int) -> None:
            accounts[i] = (await ledger.create_account(f"tenant-{first + i:07d}")).id

        await _in_chunks(count - first, make)
        await _in_chunks(count - first, lambda i: ledger.deposit(accounts[i], 10_000))
        await _in_chunks(
            count - first, lambda i: ledger.hold(accounts[i], HOLD, request_id=f"t-{first + i}", model=MODEL)
        )
        await _in_chunks(
            count - first,
            lambda i: ledger.settle(f"t-{first + i}", charge=EXPECTED_CHARGE + i % 97, node=f"node-{i % NODES}",
                                    prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS),
        )  # fmt: skip


# --- what is on disk ------------------------------------------------------------------------------------


class WalWatch:
    """The largest size the SQLite WAL file reaches, sampled every 20 ms in a thread of its own."""

    def __init__(self, db: str) -> None:
        self.path = Path(db + "-wal") if not db.startswith("postgres") else None
        self.largest = 0
        self.lately = 0  # the largest since the last `take`
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> int:
        if self.path is None:
            return 0
        try:
            size = self.path.stat().st_size
        except OSError:
            size = 0
        self.largest = max(self.largest, size)
        self.lately = max(self.lately, size)
        return size

    def take(self) -> int:
        """The largest size since the last call."""
        self.sample()
        largest, self.lately = self.lately, 0
        return largest

    def __enter__(self) -> WalWatch:
        if self.path is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def ledger_bytes(db: str) -> int:
    """The ledger's size on disk: the SQLite file (WAL not included), or its PostgreSQL schema's tables."""
    if not db.startswith("postgres"):
        return Path(db).stat().st_size
    import asyncpg

    async def read() -> int:
        conn = await asyncpg.connect(db)
        try:
            size = await conn.fetchval(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            )
            return int(size)
        finally:
            await conn.close()

    return asyncio.run(read())


def usage_count(db: str) -> int:
    if not db.startswith("postgres"):
        import sqlite3

        with closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])
    import asyncpg

    async def read() -> int:
        conn = await asyncpg.connect(db)
        try:
            return int(await conn.fetchval("SELECT COUNT(*) FROM usage"))
        finally:
            await conn.close()

    return asyncio.run(read())


# --- the router -------------------------------------------------------------------------------------------


@contextmanager
def router(db: str, node_url: str) -> Iterator[Server]:
    port = free_port()
    command = [
        sys.executable, "-m", "llamakit.router", "--host", "127.0.0.1", "--port", str(port), "--db", db,
        "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN, "--node", node_url, "--base-fee", str(BASE_FEE),
        "--prompt-token-fee", str(PROMPT_TOKEN_FEE), "--completion-token-fee", str(COMPLETION_TOKEN_FEE),
    ]  # fmt: skip
    with server("router", command, port) as running, httpx.Client(timeout=30) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

        def node_ready() -> bool:
            nodes = http.get(f"{running.url}/admin/nodes", headers=admin).json()["data"]
            return any(n["state"] == "ready" and MODEL in n["models"] for n in nodes)

        _wait(running, node_ready)
        yield running


@dataclass
class Level:
    """The figures at one size of history."""

    records: int
    stats_ms: float = 0.0
    stats_kib: float = 0.0
    books_ms: float = 0.0
    account_ms: float = 0.0
    usage_ms: float = 0.0
    paid_p50_ms: float = 0.0
    rps_c16: float = 0.0
    p99_c16_ms: float = 0.0
    stats_under_load_ms: float = 0.0
    ledger_mib: float = 0.0
    wal_max_mib: float = 0.0
    wal_fill_mib: float = 0.0  # the largest WAL while the ledger's API filled the history (SQLite)
    wal_router_mib: float = 0.0  # … and while the router ran (its start-up audit, real requests, the load)
    fill_seconds: float = 0.0
    errors: int = 0
    audit_seconds: float | None = None  # the router's start-up audit (a router that audits), and its verdict
    audit_ok: bool | None = None
    wal_resets: int | None = None  # SQLite: WAL resets during the level's load, the longest one
    wal_reset_max_ms: float | None = None


async def _median_ms(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], times: int = 7
) -> tuple[float, int]:
    """The median of `times` calls (after one unmeasured), and the size of the last answer in bytes."""
    spent, size = [], 0
    for i in range(times + 1):
        started = time.perf_counter()
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {url} answered {resp.status}: {body[:300]!r}")
        if i:
            spent.append(time.perf_counter() - started)
        size = len(body)
    return statistics.median(spent) * 1000, size


async def _paid(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[float, bool]:
    started = time.perf_counter()
    async with session.post(url, data=REQUEST_BODY, headers=headers) as resp:
        await resp.read()
        ok = resp.status == 200
    return time.perf_counter() - started, ok


async def _closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    concurrency: int,
    *,
    seconds: float = 0,
    requests: int = 0,
) -> tuple[list[float], int, float]:
    """`concurrency` clients back to back, for `seconds` or until `requests` are sent: latencies, errors, wall."""
    latencies: list[float] = []
    errors = [0]
    sent = [0]
    began = time.perf_counter()
    deadline = began + seconds if seconds else float("inf")

    async def client() -> None:
        while time.perf_counter() < deadline and (not requests or sent[0] < requests):
            sent[0] += 1
            spent, ok = await _paid(session, url, headers)
            latencies.append(spent)
            errors[0] += not ok

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors[0], time.perf_counter() - began


async def real_requests(base_url: str, api_key: str, count: int) -> int:
    """The last of a level's history: `count` real paid requests at concurrency 16; returns the errors."""
    tenant = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        _, errors, _ = await _closed_loop(session, f"{base_url}/v1/completions", tenant, 16, requests=count)
    return errors


async def measure(base_url: str, api_key: str, seconds: float, level: Level) -> None:
    """The read paths first, at the level's records; then the paid path (which adds records as it goes)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tenant = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    paid_url = f"{base_url}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        level.stats_ms, stats_bytes = await _median_ms(session, f"{base_url}/admin/stats", admin)
        level.stats_kib = stats_bytes / 1024
        level.books_ms, _ = await _median_ms(session, f"{base_url}/admin/books", admin)
        level.account_ms, _ = await _median_ms(session, f"{base_url}/v1/account", tenant)
        level.usage_ms, _ = await _median_ms(session, f"{base_url}/admin/usage?limit=50", admin)
        await _closed_loop(session, paid_url, tenant, 1, requests=20)  # warm-up
        latencies, errors, _ = await _closed_loop(session, paid_url, tenant, 1, requests=200)
        level.errors += errors
        level.paid_p50_ms = statistics.median(latencies) * 1000

        polls: list[float] = []
        stop = asyncio.Event()

        async def dashboard() -> None:  # polls the snapshot every second, as llamakit-tui does
            while not stop.is_set():
                started = time.perf_counter()
                async with session.get(f"{base_url}/admin/stats", headers=admin) as resp:
                    await resp.read()
                polls.append(time.perf_counter() - started)
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

        poller = asyncio.create_task(dashboard())
        latencies, errors, wall = await _closed_loop(session, paid_url, tenant, 16, seconds=seconds)
        stop.set()
        await poller
        level.errors += errors
        level.rps_c16 = len(latencies) / wall
        level.p99_c16_ms = sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1000
        level.stats_under_load_ms = statistics.median(polls) * 1000
        async with session.get(f"{base_url}/metrics", headers=admin) as resp:
            metrics = await resp.text()
        for line in metrics.splitlines():
            if line.startswith("llamakit_ledger_wal_resets "):
                level.wal_resets = int(float(line.split()[1]))
            elif line.startswith("llamakit_ledger_wal_reset_seconds_max "):
                level.wal_reset_max_ms = float(line.split()[1]) * 1000


async def start_up_audit(base_url: str) -> tuple[float | None, bool | None]:
    """The router's start-up audit, once it is done (seconds, verdict); (None, None) from a router without."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{base_url}/admin/books", headers=admin) as resp:
                audit = (await resp.json()).get("audit")
            if audit is None:
                return None, None
            if audit["ok"] is not None:
                return audit["seconds"], audit["ok"]
            await asyncio.sleep(0.2)


def vacuum(db: str) -> None:
    """PostgreSQL: VACUUM ANALYZE the ledger's tables, as autovacuum would have over the weeks a history this long
    took to make; measured at once after a bulk fill, the router would share the machine with its catch-up."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(db)
        try:
            for (table,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"):
                await conn.execute(f'VACUUM ANALYZE "{table}"')
        finally:
            await conn.close()

    asyncio.run(run())


def run_level(
    db: str, node_url: str, api_key: str, target: int, seconds: float, wal: WalWatch, *, settle: bool = False
) -> Level:
    """Fill the history to `target` records (the last REAL_TAIL of them real requests) and measure; with `settle`,
    VACUUM ANALYZE a PostgreSQL ledger after filling it."""
    have = usage_count(db)
    real = min(REAL_TAIL, max(0, target - have))
    fill = max(0, target - have - real)
    fill_seconds = 0.0
    wal.take()
    if fill:
        print(f"  filling {fill:,} records through the ledger's API …", flush=True)
        fill_seconds = asyncio.run(_fill(db, api_key, fill))
    if settle and db.startswith("postgres"):
        vacuum(db)
    wal_fill = wal.take()
    with router(db, node_url) as running:
        # Measured after the router's start-up audit (a full scan, in the background) is done.
        audit_seconds, audit_ok = asyncio.run(start_up_audit(running.url))
        errors = asyncio.run(real_requests(running.url, api_key, real)) if real else 0
        level = Level(records=usage_count(db), fill_seconds=fill_seconds, errors=errors, audit_seconds=audit_seconds,
                      audit_ok=audit_ok)  # fmt: skip
        asyncio.run(measure(running.url, api_key, seconds, level))
    level.wal_fill_mib, level.wal_router_mib = wal_fill / MIB, wal.take() / MIB
    wal.sample()
    level.ledger_mib = ledger_bytes(db) / MIB
    level.wal_max_mib = wal.largest / MIB
    return level


def run_accounts(db: str, node_url: str, counts: list[int]) -> list[dict[str, float]]:
    """`/admin/stats` with `counts` accounts that each made one request today."""
    out = []
    have = 0
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for count in counts:
        print(f"  {count:,} accounts …", flush=True)
        started = time.perf_counter()
        asyncio.run(_tenants(db, count, have))
        made = time.perf_counter() - started
        have = count
        with router(db, node_url) as running:
            asyncio.run(start_up_audit(running.url))

            async def stats(url: str = running.url) -> tuple[float, int]:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                    return await _median_ms(session, f"{url}/admin/stats", admin)

            try:
                ms, size = asyncio.run(stats())
            except TimeoutError:  # an older router, whose snapshot grew with the tenants
                print(f"  /admin/stats did not answer within 300 s at {count:,} accounts", flush=True)
                ms, size = float("inf"), 0
        out.append({"accounts": count, "stats_ms": ms, "stats_kib": size / 1024, "made_seconds": made})
    return out


# --- the report -------------------------------------------------------------------------------------------

COLUMNS = [
    ("records", "records", "{:,.0f}"),
    ("/admin/stats ms", "stats_ms", "{:.1f}"),
    ("stats KiB", "stats_kib", "{:.1f}"),
    ("/admin/books ms", "books_ms", "{:.2f}"),
    ("/v1/account ms", "account_ms", "{:.2f}"),
    ("/admin/usage?limit=50 ms", "usage_ms", "{:.2f}"),
    ("paid p50 c=1 ms", "paid_p50_ms", "{:.2f}"),
    ("rps c=16 + dashboard", "rps_c16", "{:.0f}"),
    ("p99 c=16 ms", "p99_c16_ms", "{:.1f}"),
    ("stats under load ms", "stats_under_load_ms", "{:.1f}"),
    ("ledger MiB", "ledger_mib", "{:.1f}"),
    ("WAL max MiB", "wal_max_mib", "{:.1f}"),
]


def report(backend: str, levels: list[Level], accounts: list[dict[str, float]]) -> dict[str, Any]:
    print(f"\nledger growth, {backend}:")
    print("| " + " | ".join(name for name, _, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for level in levels:
        row = asdict(level)
        print("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    summary: dict[str, Any] = {}
    if len(levels) >= 2:
        first, last = asdict(levels[0]), asdict(levels[-1])
        ratios = {key: (last[key] / first[key] if first[key] else float("nan")) for _, key, _ in COLUMNS}
        print("| ratio | " + " | ".join(f"{ratios[key]:.2f}×" for _, key, _ in COLUMNS[1:]) + " |")
        grown = (levels[-1].ledger_mib - levels[0].ledger_mib) * MIB
        per_request = grown / max(1, levels[-1].records - levels[0].records)
        print(f"\nledger growth: {per_request:,.0f} bytes a request between {levels[0].records:,} and "
              f"{levels[-1].records:,} records (aim ≤ ~1,000)")  # fmt: skip
        reads = ("stats_ms", "books_ms", "account_ms", "usage_ms", "paid_p50_ms")
        worst = max(reads, key=lambda k: ratios[k])
        print(f"slowest growth of a read path or the paid path: {worst} {ratios[worst]:.2f}× (aim ≤ 1.2×); "
              f"rps at c=16: {ratios['rps_c16']:.2f}× (aim ≥ 0.83×)")  # fmt: skip
        wal = max(level.wal_max_mib for level in levels)
        if backend == "sqlite":
            fill = max(level.wal_fill_mib for level in levels)
            served = max(level.wal_router_mib for level in levels)
            print(f"largest WAL: {wal:.1f} MiB (aim < 64 MiB); {fill:.1f} MiB while the ledger's API filled the "
                  f"history, {served:.1f} MiB while the router ran")  # fmt: skip
        for level in levels:
            if level.wal_resets is not None:
                print(f"at {level.records:,} records: {level.wal_resets} WAL resets under load, the longest "
                      f"{level.wal_reset_max_ms or 0:.1f} ms")  # fmt: skip
            if level.audit_seconds is not None:
                verdict = "agrees" if level.audit_ok else "DISAGREES"
                print(
                    f"at {level.records:,} records: the start-up audit took {level.audit_seconds:.1f} s and {verdict}"
                )
        summary = {"ratios": ratios, "bytes_per_request": per_request, "wal_max_mib": wal}
    if accounts:
        print("\n| accounts | /admin/stats ms | stats KiB |\n|---|---|---|")
        for entry in accounts:
            print(f"| {entry['accounts']:,.0f} | {entry['stats_ms']:.1f} | {entry['stats_kib']:.1f} |")
        if len(accounts) >= 2:
            ratio = accounts[-1]["stats_ms"] / accounts[0]["stats_ms"]
            print(f"| ratio | {ratio:.2f}× | {accounts[-1]['stats_kib'] / accounts[0]['stats_kib']:.2f}× |")
            summary["accounts_ratio"] = ratio
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="sqlite", help="'sqlite' (a file in a temp dir) or a postgresql:// URL")
    parser.add_argument("--base", type=int, default=1000, help="records at the first measurement (1000)")
    parser.add_argument("--records", type=int, default=1_000_000, help="records at the last measurement")
    parser.add_argument("--levels", type=int, nargs="*", default=[], help="more sizes to measure in between")
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts for the snapshot (0: skip)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load at c=16 per level (5)")
    parser.add_argument(
        "--vacuum", action="store_true", help="PostgreSQL: VACUUM ANALYZE the ledger after filling each level"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.db != "sqlite" and not args.db.startswith(("postgresql://", "postgres://")):
        parser.error("--db must be 'sqlite' or a postgresql:// URL")
    if args.records < args.base or args.base < REAL_TAIL:
        parser.error(f"--base must be at least {REAL_TAIL} and --records at least --base")
    return args


def main() -> None:
    args = parse_args()
    backend = "sqlite" if args.db == "sqlite" else "postgres"
    output = args.output or RESULTS / ("ledger_growth.json" if backend == "sqlite" else "ledger_growth_postgres.json")
    sizes = sorted({args.base, *args.levels, args.records})
    history = ", ".join(f"{s:,}" for s in sizes)
    load = os.getloadavg()[0]
    print(f"ledger growth ({backend}): history of {history} records, then {args.accounts:,} accounts; "
          f"{os.cpu_count()} CPUs, load average {load:.2f}", flush=True)  # fmt: skip
    started = time.perf_counter()
    me = [sys.executable, str(Path(__file__).resolve().with_name("router_overhead.py"))]
    with tempfile.TemporaryDirectory(prefix="ledger-growth-") as tmp, ExitStack() as stack:
        node_port = free_port()
        node = stack.enter_context(server("node", [*me, "node", "--port", str(node_port), "--slots", "256"], node_port))
        with httpx.Client() as http:
            _wait(node, lambda: http.get(f"{node.url}/health").json()["status"] == "ready")
        db = stack.enter_context(ledger_database(args.db, Path(tmp)))
        api_key = asyncio.run(_open_bench_account(db))
        levels = []
        with WalWatch(db) as wal:
            for size in sizes:
                print(f"level {size:,} records", flush=True)
                level = run_level(db, node.url, api_key, size, args.seconds, wal, settle=args.vacuum)
                print(f"  {asdict(level)}", flush=True)
                levels.append(level)
        accounts: list[dict[str, float]] = []
        if args.accounts:
            tenants_db = stack.enter_context(ledger_database(args.db, Path(tmp) / "tenants"))
            if backend == "sqlite":
                (Path(tmp) / "tenants").mkdir()
            accounts = run_accounts(tenants_db, node.url, sorted({10, min(1000, args.accounts), args.accounts}))
    summary = report(backend, levels, accounts)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": {
                    "db": backend,
                    "sizes": sizes,
                    "accounts": args.accounts,
                    "seconds": args.seconds,
                    "vacuum": args.vacuum,
                },
                "levels": [asdict(level) for level in levels],
                "accounts": accounts,
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"results: {output}")


if __name__ == "__main__":
    main()
