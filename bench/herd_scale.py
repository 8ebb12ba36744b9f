"""Does the router's cost per request stay flat as the herd grows from 1 to 100 to 1,000 nodes?

One process serves every fake node (``tests/support/fake_node.py --ports N``: N aiohttp sites on one
event loop), each answering a completion at once (1 token, as many slots as the load has connections). The
nodes join the router(s) over ``/herd/join``. For each herd size and each contender, a load generator (one
process, an aiohttp client pool of ``--concurrency`` connections spread over the contender's routers) posts
paid ``/v1/completions`` for ``--seconds`` after a short warm-up, and the script reports:

* requests per second (all routers together),
* router CPU milliseconds per request (user + system of every router process, from /proc via psutil),
* the same for the database (every PostgreSQL process; none for SQLite, which runs in the router) and for
  the fake nodes' process: what the request cost elsewhere,
* for the cluster contenders, the mean wall time of one dispatch transaction (lock wait included), from
  ``/admin/stats`` (``cluster.dispatch``), per router;
* flatness: in each round a contender runs on every herd size back to back (every herd is up for the whole
  run), and the ratio of the largest herd to one node is taken within the round; the median over rounds is
  printed. The fake nodes' CPU per request is the control: their work per request is the same whatever the
  router does, so where it moves, the machine's speed moved.

Contenders: ``sqlite-1`` (one router, SQLite ledger, the in-process scheduler), ``pg-1`` (one router,
``--cluster yes`` on PostgreSQL) and ``pg-3`` (three routers, ``--cluster yes``, one database). Health
checks are set to every hour so that a herd of 1,000 is not health-checked during the measurement (a
round of 1,000 checks is load that grows with the herd by design, not per request).

Run: ``.venv/bin/python bench/herd_scale.py [--postgres URL] [--sizes 1 100 1000] [--seconds 4]
[--concurrency 16]``; ``--postgres`` defaults to ``LLAMAKIT_TEST_POSTGRES``; each PostgreSQL contender gets
a fresh schema, dropped afterwards. Results go to stdout and ``bench/results/herd_scale.json``.
``HERD_SCALE_PROFILE=/tmp/prof`` runs each router under cProfile (``/tmp/prof-<port>.prof``, written when it
stops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _processes import free_port, stop

ROOT = Path(__file__).parents[1]
_LOGS = Path(tempfile.gettempdir()) / "herd_scale-router-*.log"
ADMIN_KEY = "bench-admin-key"
HERD_TOKEN = "fake-herd-token"  # tests/support/fake_node.py's


@dataclass
class Cell:
    contender: str
    nodes: int
    requests: int
    seconds: float
    rps: float
    cpu_ms_per_request: float
    # CPU milliseconds per request of the database's processes (every PostgreSQL backend; 0 for SQLite, whose
    # work is the router's) and of the fake nodes' process: where else the request's cost went.
    db_cpu_ms_per_request: float
    nodes_cpu_ms_per_request: float
    dispatch_ms: float | None
    errors: int
    round: int = 0


async def _wait(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if process.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {process.returncode}; see {_LOGS}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def _start_nodes(count: int, slots: int) -> tuple[subprocess.Popen[bytes], int]:
    while True:  # a block of `count` free ports starting at a random one
        base = 20000 + int.from_bytes(os.urandom(2), "big") % 30000
        if all(_port_free(base + i) for i in range(count)):
            break
    argv = [sys.executable, "-m", "tests.support.fake_node", "--port", str(base), "--name", "n"]
    argv += ["--ports", str(count), "--slots", str(slots), "--tokens", "1", "--token-delay", "0"]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE), base


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start_router(db: str, cluster: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", db, "--admin-key", ADMIN_KEY]
    if os.environ.get("HERD_SCALE_PROFILE"):  # a cProfile of each router, written when it stops
        argv[1:1] = ["-m", "cProfile", "-o", f"{os.environ['HERD_SCALE_PROFILE']}-{port}.prof"]
    argv += ["--herd-token", HERD_TOKEN, "--health-interval", "3600", "--max-queue", "4096", "--affinity", "no"]
    if cluster:
        argv += ["--cluster", "yes"]
    # Its log, for the error if it exits (a router logs little at INFO: start, stop, failures).
    log = Path(tempfile.gettempdir()) / f"herd_scale-router-{port}.log"
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def _cpu(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each process still running, by pid."""
    times = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # a backend that ended during the measurement
            times[process.pid] = sum(process.cpu_times()[:2])
    return times


def _postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")]


async def _run(
    name: str, db: str, routers: int, nodes: int, base: int, seconds: float, concurrency: int, node_pid: int
) -> Cell:
    started = [_start_router(db, cluster=name.startswith("pg")) for _ in range(routers)]
    try:
        for process, url in started:
            await _wait(url + "/health", process)
        urls = [url for _, url in started]
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession() as session:
            join = {"Authorization": f"Bearer {HERD_TOKEN}"}
            sem = asyncio.Semaphore(16)

            async def join_one(i: int) -> None:
                body = {"url": f"http://127.0.0.1:{base + i}", "name": f"n-{i}" if nodes > 1 else "n",
                        "models": ["fake-model"], "slots": concurrency}  # fmt: skip
                async with sem, session.post(urls[0] + "/herd/join", json=body, headers=join) as resp:
                    assert resp.status == 201, await resp.text()

            await asyncio.gather(*(join_one(i) for i in range(nodes)))
            for url in urls:  # every router knows the whole herd
                for _ in range(400):
                    async with session.get(url + "/v1/info") as resp:
                        if (await resp.json())["nodes"]["ready"] == nodes:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError(f"{url} does not see {nodes} nodes")
            account = {"name": f"bench-{uuid.uuid4().hex[:8]}", "deposit": 10**12}
            async with session.post(urls[0] + "/admin/accounts", json=account, headers=admin) as resp:
                key = (await resp.json())["api_key"]
        procs = [psutil.Process(p.pid) for p, _ in started]
        body = {"model": "fake-model", "prompt": "one two three", "max_tokens": 1}
        counts = {"ok": 0, "errors": 0}

        async def client(session: aiohttp.ClientSession, url: str, until: float, count: bool) -> None:
            while time.monotonic() < until:
                async with session.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    if count:
                        counts["ok" if resp.status == 200 else "errors"] += 1

        connector = aiohttp.TCPConnector(limit=concurrency)
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            until = time.monotonic() + 0.5  # warm-up
            await asyncio.gather(*(client(session, urls[i % routers], until, False) for i in range(concurrency)))
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            database, node_process = _postgres_processes() if name.startswith("pg") else [], psutil.Process(node_pid)
            db0, nodes0 = _cpu(database), _cpu([node_process])
            t0 = time.monotonic()
            until = t0 + seconds
            await asyncio.gather(*(client(session, urls[i % routers], until, True) for i in range(concurrency)))
            wall = time.monotonic() - t0
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
            db1 = _cpu(database + _postgres_processes()) if database else {}
            nodes1 = _cpu([node_process])
            db_cpu = sum(t - db0.get(pid, 0.0) for pid, t in db1.items())
            nodes_cpu = sum(t - nodes0.get(pid, 0.0) for pid, t in nodes1.items())
        dispatch: list[float] = []
        async with aiohttp.ClientSession(headers=admin) as session:
            for url in urls:
                async with session.get(url + "/admin/stats") as resp:
                    stats = await resp.json()
                if stats.get("cluster") and stats["cluster"]["dispatch"]["mean_ms"] is not None:
                    dispatch.append(stats["cluster"]["dispatch"]["mean_ms"])
            async with session.get(urls[0] + "/admin/books") as resp:
                books = await resp.json()
            assert books["balanced"] and books["holds"] == 0, books
        done = counts["ok"]
        return Cell(
            contender=name,
            nodes=nodes,
            requests=done,
            seconds=round(wall, 3),
            rps=round(done / wall, 1),
            cpu_ms_per_request=round(1000 * cpu / max(done, 1), 3),
            db_cpu_ms_per_request=round(1000 * db_cpu / max(done, 1), 3),
            nodes_cpu_ms_per_request=round(1000 * nodes_cpu / max(done, 1), 3),
            dispatch_ms=round(sum(dispatch) / len(dispatch), 3) if dispatch else None,
            errors=counts["errors"],
        )
    finally:
        for process, _ in started:
            stop(process)


async def _schema(postgres: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(postgres)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    return schema, f"{postgres}{'&' if '?' in postgres else '?'}search_path={schema}"


async def _drop(postgres: str, schema: str) -> None:
    conn = await asyncpg.connect(postgres)
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    await conn.close()


async def _cell(args: argparse.Namespace, contender: str, size: int, base: int, node_pid: int) -> Cell | None:
    """One contender on a herd of `size` nodes (ports from `base`): a fresh ledger, fresh routers."""
    routers = int(contender.split("-")[1])
    if contender.startswith("sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            return await _run(contender, str(Path(tmp) / "ledger.db"), routers, size, base, args.seconds,
                              args.concurrency, node_pid)  # fmt: skip
    if not args.postgres:
        print(f"skipping {contender}: no --postgres URL", file=sys.stderr)
        return None
    schema, db = await _schema(args.postgres)
    try:
        return await _run(contender, db, routers, size, base, args.seconds, args.concurrency, node_pid)
    finally:
        await _drop(args.postgres, schema)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=os.environ.get("LLAMAKIT_TEST_POSTGRES"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--contenders", nargs="+", default=["sqlite-1", "pg-1", "pg-3"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cells: list[Cell] = []
    # Every herd size runs for the whole benchmark (an idle fake node costs nothing), so that each round can
    # measure one contender on every size back to back: the machine's speed drifts by ±20 % over a minute
    # (other work, the hypervisor), and sizes measured a minute apart compared that drift, not the herd.
    herds: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for size in args.sizes:
            # Every node has as many slots as there are clients: even a herd of one never makes a request
            # wait, so what is measured is the router's work, not the herd's capacity.
            herds[size] = _start_nodes(size, args.concurrency)
            stdout = herds[size][0].stdout
            assert stdout is not None
            await asyncio.get_running_loop().run_in_executor(None, stdout.readline)  # "ready"
        for round_ in range(args.rounds):
            # The contenders' order and the sizes' order rotate each round: a machine that gets busier or
            # quieter during a run favours none of them.
            order = args.contenders[round_ % len(args.contenders) :] + args.contenders[: round_ % len(args.contenders)]
            sizes = args.sizes if round_ % 2 == 0 else args.sizes[::-1]
            for contender in order:
                for size in sizes:
                    node_process, base = herds[size]
                    cell = await _cell(args, contender, size, base, node_process.pid)
                    if cell is None:
                        break
                    cell.round = round_ + 1
                    cells.append(cell)
                    print(
                        f"round {round_ + 1}  {cell.contender:9} nodes {cell.nodes:5}  {cell.rps:8.1f} req/s  "
                        f"{cell.cpu_ms_per_request:6.3f} router CPU ms/req  db {cell.db_cpu_ms_per_request:6.3f}  "
                        f"nodes {cell.nodes_cpu_ms_per_request:6.3f}  statement "
                        f"{'-' if cell.dispatch_ms is None else f'{cell.dispatch_ms:.3f} ms'}  errors {cell.errors}",
                        flush=True,
                    )
    finally:
        for node_process, _ in herds.values():
            stop(node_process)
    medians: dict[str, dict[int, dict[str, float | None]]] = {}
    print("\nmedians over rounds:")
    for contender in args.contenders:
        for size in args.sizes:
            mine = [c for c in cells if c.contender == contender and c.nodes == size]
            if not mine:
                continue
            dispatch = [c.dispatch_ms for c in mine if c.dispatch_ms is not None]
            entry = {
                "rps": statistics.median(c.rps for c in mine),
                "cpu_ms_per_request": statistics.median(c.cpu_ms_per_request for c in mine),
                "db_cpu_ms_per_request": statistics.median(c.db_cpu_ms_per_request for c in mine),
                "statement_ms": statistics.median(dispatch) if dispatch else None,
            }
            medians.setdefault(contender, {})[size] = entry
            print(
                f"  {contender:9} nodes {size:5}  {entry['rps']:8.1f} req/s  "
                f"{entry['cpu_ms_per_request']:6.3f} router CPU ms/req  {entry['db_cpu_ms_per_request']:6.3f} database"
            )
    # Flatness: in each round, the largest herd against the smallest for the same contender, measured back to
    # back; the median over rounds.
    flatness: dict[str, dict[str, float]] = {}
    print(f"\nflatness ({max(args.sizes)} nodes against {min(args.sizes)}; median of the rounds' paired ratios):")
    for contender in args.contenders:
        ratios: dict[str, list[float]] = {"rps": [], "cpu_ms_per_request": [], "db_cpu_ms_per_request": []}
        for round_ in range(1, args.rounds + 1):
            pair = {c.nodes: c for c in cells if c.contender == contender and c.round == round_}
            small, big = pair.get(min(args.sizes)), pair.get(max(args.sizes))
            if small is None or big is None:
                continue
            for what, values in ratios.items():
                if getattr(small, what) and getattr(big, what):
                    values.append(getattr(big, what) / getattr(small, what))
        if not ratios["rps"]:
            continue
        flatness[contender] = {what: statistics.median(values) for what, values in ratios.items() if values}
        db = flatness[contender].get("db_cpu_ms_per_request")
        print(
            f"  {contender:9} req/s {flatness[contender]['rps']:5.2f}×   CPU ms/req "
            f"{flatness[contender]['cpu_ms_per_request']:5.2f}×"
            + (f"   database CPU ms/req {db:5.2f}×" if db else "")
            + f"   (rounds: req/s {', '.join(f'{r:.2f}' for r in ratios['rps'])})"
        )
    out = ROOT / "bench" / "results" / "herd_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": vars(args), "cells": [asdict(c) for c in cells], "medians": medians, "flatness": flatness},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    asyncio.run(main())
