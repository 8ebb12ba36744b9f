"""Routers whose ledger stops being writable under load, then comes back: what their clients get, what their
logs say, and whether the books balance, without a restart. Two scenarios:

* `full_disk`: one router whose SQLite ledger and usage log sit on a tmpfs of 4 MiB (mounting it needs root),
  nearly filled by a file before the load starts; the load's usage records fill the rest. Once `outage`
  requests have been refused, the file is deleted and the file system grown to 64 MiB.
* `lost_postgres`: one router on PostgreSQL, or two `--cluster` routers sharing it, on a PostgreSQL instance
  of the scenario's own (initdb and pg_ctl from /usr/lib/postgresql/15/bin in a temporary directory, on its
  own port, run as the postgres user when run as root): stopped (`pg_ctl stop -m fast`) under load, then
  started again once `outage` requests have been refused.

The routers are real processes (`python -m llamakit.router`), their node a fast scripted one in this process.

`python -m tests.reliability.ledger_outage [full_disk|lost_postgres|cluster] [--requests 8000] [--concurrency
16]` runs one and prints its report (the issue's run: a full disk, 8,000 requests at 16 at a time);
`tests/reliability/test_ledger_outage.py` runs shorter ones and checks them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.ports import free_port
from tests.support.servers import RunningServer

__all__ = ["CannotRun", "PrivatePostgres", "Report", "full_disk", "lost_postgres"]

ADMIN = "ledger-outage-admin-key"
ROOT = Path(__file__).parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
LOG_MARKERS = (
    "the ledger failed",
    "the ledger works again",
    "writing the usage log",
    "cluster: the database",
    "lock on the ledger",
    "Traceback",
)


class CannotRun(Exception):
    """The scenario cannot run here (not root, no tmpfs, no PostgreSQL binaries); the message says which."""


@dataclass
class Report:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)  # error codes of the refusals
    charged_in_answers: int = 0  # the sum of usage.cost_credits the clients were told
    health_during: int | None = None  # /health's status while the ledger could not be written
    ready_during: int | None = None
    live_during: int | None = None
    retry_after: str | None = None
    served_after: int = 0  # 200s once the ledger was back
    back_without_restart: bool = False  # every router answered /ready 200 again, and none had exited
    books: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, float]] = field(default_factory=list)  # each router's ledger series
    logs: list[list[str]] = field(default_factory=list)  # each router's lines of LOG_MARKERS
    log_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self, marker: str) -> int:
        return sum(marker in line for log in self.logs for line in log)

    def show(self) -> str:
        out = [
            f"statuses: {dict(sorted(self.statuses.items()))}   refusal codes: {dict(self.codes)}",
            f"during the outage: /health {self.health_during}, /ready {self.ready_during}, /live {self.live_during}, "
            f"Retry-After {self.retry_after}",
            f"served once the ledger was back: {self.served_after}; "
            f"back without a restart: {self.back_without_restart}",
            f"books: {self.books}",
            f"charged as the clients were told: {self.charged_in_answers} (books: {self.books.get('charges')})",
        ]
        for i, (metrics, log, size) in enumerate(zip(self.metrics, self.logs, self.log_bytes, strict=True)):
            out.append(f"router {i}: metrics {metrics}")
            out.append(f"router {i}: log {size} bytes; its lines about the outage:")
            out += [f"    {line}" for line in log]
        out.append(f"({self.seconds:.1f} s)")
        return "\n".join(out)


# -- the routers and the load ---------------------------------------------------------------------------------


@asynccontextmanager
async def _routers(
    work: Path, db: str, *, count: int, extra: list[str]
) -> AsyncIterator[tuple[list[str], list[subprocess.Popen[bytes]], RunningServer]]:
    """`count` router processes on `db` (a cluster when more than one) in front of one fast scripted node."""
    node = await RunningServer(FakeNode("n1", slots=64, script=Script(tokens=4)).app()).start()
    urls: list[str] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            port = free_port()
            argv = [sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", db, "--admin-key", ADMIN]
            argv += ["--herd-token", HERD_TOKEN, "--health-interval", "0.2", *extra]
            argv += ["--node", node.url] if i == 0 else []
            if count > 1:
                argv += ["--cluster", "yes", "--router-id", f"r{i}"]
            with (work / f"router-{i}.log").open("wb") as out:
                processes.append(subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))  # noqa: ASYNC220
            urls.append(f"http://127.0.0.1:{port}")
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(600):
                    with suppress(httpx.TransportError):
                        health = await client.get(urls[-1] + "/health")
                        if health.status_code == 200 and health.json()["ready"] == 1:
                            break
                    if processes[-1].poll() is not None:
                        raise AssertionError(f"router {i} exited: {(work / f'router-{i}.log').read_text()}")
                    await asyncio.sleep(0.05)
        yield urls, processes, node
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        await node.stop()


async def _load(
    report: Report,
    urls: list[str],
    *,
    requests: int,
    concurrency: int,
    outage: int,
    fail: Callable[[], Awaitable[None]],
    mend: Callable[[], Awaitable[None]],
    stable: Callable[[], Awaitable[bool]],
) -> None:
    """Send `requests` paid requests, `concurrency` at a time, spread over the routers: `fail()` the ledger once
    `stable()` is true (the sooner load ran a while), `mend()` it once `outage` requests were refused, then
    wait until every router is ready again with no hold open."""
    async with httpx.AsyncClient(base_url=urls[0], headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
        created = await admin.post("/admin/accounts", json={"name": "load", "deposit": 10**12})
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]
    clients = [
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        for url in urls
    ]  # fmt: skip
    body = {"messages": [{"role": "user", "content": "is the ledger there?"}], "max_tokens": 4}
    sent = refused = 0
    failing, failed, mended = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def mend_once_failed() -> None:
        await asyncio.wait_for(failed.wait(), 300)  # a stop still under way (pg_ctl stop waits) cannot be mended yet
        await mend()

    mending: asyncio.Task[None] | None = None

    async def look(url: str) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            report.health_during = (await client.get(url + "/health")).status_code
            report.ready_during = (await client.get(url + "/ready")).status_code
            report.live_during = (await client.get(url + "/live")).status_code

    deadline = time.monotonic() + 300

    def more() -> bool:
        # `requests` sent, and then on until some were served after the mend: refusals come back so fast that
        # the rest of `requests` can all be refused while the database is still starting.
        if sent < requests:
            return True
        return not (mended.is_set() and report.served_after >= concurrency) and time.monotonic() < deadline

    async def worker(n: int) -> None:
        nonlocal sent, refused, mending
        while more():
            sent += 1
            if not failing.is_set() and await stable():
                failing.set()
                await fail()
                failed.set()
            client = clients[(sent + n) % len(clients)]
            try:
                answer = await client.post("/v1/chat/completions", json=body)
            except httpx.TransportError as exc:  # counted apart: not an answer (none are expected)
                report.codes[type(exc).__name__] += 1
                continue
            report.statuses[answer.status_code] += 1
            if answer.status_code == 200:
                report.charged_in_answers += answer.json()["usage"]["cost_credits"]
                report.served_after += mended.is_set()
                continue
            code = answer.json()["error"].get("code") or "?"
            report.codes[code] += 1
            if code == "ledger_unavailable":
                refused += 1
                if report.retry_after is None:
                    report.retry_after = answer.headers.get("Retry-After")
                    await look(str(client.base_url).rstrip("/"))
                if refused >= outage and mending is None:
                    mending = asyncio.ensure_future(mend_once_failed())
                    mending.add_done_callback(lambda _: mended.set())

    try:
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        if mending is None:
            mending = asyncio.ensure_future(mend_once_failed())
        await mending
    finally:
        for client in clients:
            await client.aclose()


async def _settled(report: Report, urls: list[str], processes: list[subprocess.Popen[bytes]], work: Path) -> None:
    """Wait until every router is ready again and no hold is open (the gate opens and releases what it owes on
    its own), then read the books, the metrics and the logs."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as admin:
        for _ in range(1200):
            ready = [(await admin.get(url + "/ready")).status_code == 200 for url in urls]
            if all(ready) and (await admin.get(urls[0] + "/admin/books")).json()["holds"] == 0:
                break
            await asyncio.sleep(0.05)
        report.back_without_restart = all(ready) and all(p.poll() is None for p in processes)
        report.books = (await admin.get(urls[0] + "/admin/books")).json()
        for url in urls:
            series = {}
            for line in (await admin.get(url + "/metrics")).text.splitlines():
                if line.startswith(("llamakit_router_ledger_", 'llamakit_router_refusals_total{code="ledger_unavail')):
                    name, value = line.rsplit(" ", 1)
                    series[name] = float(value)
            report.metrics.append(series)


def _read_logs(report: Report, work: Path, count: int) -> None:
    for i in range(count):
        text = (work / f"router-{i}.log").read_bytes().decode(errors="replace")
        report.log_bytes.append(len(text.encode()))
        report.logs.append([line for line in text.splitlines() if any(m in line for m in LOG_MARKERS)])


# -- a full disk ----------------------------------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str = "4m") -> None:
    if os.geteuid() != 0:
        raise CannotRun("mounting a tmpfs needs root (CI runs the tests as root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        raise CannotRun(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")


def _fill(path: Path, *, leave: int) -> None:
    """A file that takes all of the file system's space but `leave` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


async def full_disk(
    work: Path, *, requests: int = 8000, concurrency: int = 16, outage: int | None = None, leave: int = 192 * 1024
) -> Report:
    """The full-disk scenario in `work` (the tmpfs at work/disk, the router's log at work/router-0.log)."""
    report, started = Report(), time.monotonic()
    disk = work / "disk"
    mount_tmpfs(disk)
    filler = disk / "filler"
    try:
        extra = ["--usage-log", str(disk / "usage.jsonl")]
        async with _routers(work, str(disk / "ledger.db"), count=1, extra=extra) as (urls, processes, _):

            async def fail() -> None:
                _fill(filler, leave=leave)  # the load's own records fill the rest

            async def mend() -> None:  # the operator's fix: the file deleted and the file system grown
                filler.unlink(missing_ok=True)
                await asyncio.to_thread(
                    subprocess.run, ["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True
                )

            async def stable() -> bool:
                return True

            await _load(report, urls, requests=requests, concurrency=concurrency,
                        outage=requests // 4 if outage is None else outage, fail=fail, mend=mend,
                        stable=stable)  # fmt: skip
            await _settled(report, urls, processes, work)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], capture_output=True)
    _read_logs(report, work, 1)
    report.seconds = time.monotonic() - started
    return report


# -- a lost PostgreSQL ------------------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL instance of its own, in a new temporary directory, on a free port: not the one other tests
    share, so stopping it under load touches nobody else's. Run as the postgres user when this process is root
    (PostgreSQL refuses to run as root); its directory is its own (a test's tmp_path is not theirs to enter)."""

    def __init__(self) -> None:
        if not (PG_BIN / "pg_ctl").exists():
            raise CannotRun(f"no PostgreSQL 15 binaries in {PG_BIN}")
        root = Path(tempfile.mkdtemp(prefix="llamakit-pg-"))
        self.root, self.data, self.port = root, root / "data", free_port()
        self.url = f"postgresql://llamakit@127.0.0.1:{self.port}/llamakit"
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise CannotRun("running as root, and there is no postgres user to run PostgreSQL as") from None
            self._user = "postgres"

    def _run(self, *argv: str) -> None:
        command = [*(["runuser", "-u", self._user, "--"] if self._user else []), *argv]
        done = subprocess.run(command, capture_output=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "pg.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr.decode().strip()}\n{tail}")

    def create(self) -> None:
        if self._user:
            shutil.chown(self.root, self._user)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self._run(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                  "CREATE ROLE llamakit LOGIN")  # fmt: skip
        self._run(str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                  "CREATE DATABASE llamakit OWNER llamakit")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"),
                  "-w", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


async def lost_postgres(
    work: Path, *, routers: int = 1, requests: int = 3000, concurrency: int = 16, outage: int | None = None
) -> Report:
    """The lost-PostgreSQL scenario in `work` (the routers' logs in work/router-N.log): one router, or a cluster of
    `routers`."""
    report, started = Report(), time.monotonic()
    postgres = PrivatePostgres()
    try:
        postgres.create()
        async with _routers(work, postgres.url, count=routers, extra=[]) as (urls, processes, _):
            served = 0

            async def stable() -> bool:  # some requests through before the database goes
                nonlocal served
                served += 1
                return served > requests // 10

            async def fail() -> None:
                await asyncio.to_thread(postgres.stop)

            async def mend() -> None:
                await asyncio.to_thread(postgres.start)

            await _load(report, urls, requests=requests, concurrency=concurrency,
                        outage=requests // 4 if outage is None else outage, fail=fail, mend=mend,
                        stable=stable)  # fmt: skip
            await _settled(report, urls, processes, work)
    finally:
        postgres.destroy()
    _read_logs(report, work, routers)
    report.seconds = time.monotonic() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("scenario", choices=["full_disk", "lost_postgres", "cluster"], nargs="?", default="full_disk")
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--outage", type=int, default=None, help="refusals before the ledger comes back")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="llamakit-ledger-outage-"))
    common = {"requests": args.requests, "concurrency": args.concurrency, "outage": args.outage}
    if args.scenario == "full_disk":
        report = asyncio.run(full_disk(work, **common))
    else:
        report = asyncio.run(lost_postgres(work, routers=2 if args.scenario == "cluster" else 1, **common))
    print(report.show())
    print(f"(logs in {work})")


if __name__ == "__main__":
    main()
