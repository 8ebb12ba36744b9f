"""Do 1,000 slow clients slow a router down for everyone else? Normal requests' latency and rate, with and without
an attacker holding 1,000 slow connections open, against the same router in one run.

The servers are router_overhead.py's (a fake node that answers at once, ``python -m llamakit.router`` on a SQLite
ledger in front of it). The attacker is a process of its own (a mode of this file): it keeps ``--slow`` connections
open to the router, half sending a request head one byte every half second, half a body so, and opens a new one
whenever the router closes one (after ``--request-timeout`` with a 408). The load generator posts completions
back to back at concurrency 1 and 16, as router_overhead.py does. Rounds alternate ``quiet`` and ``attacked``
(the attacker started and its connections all open before measuring); the medians over rounds are reported, and
the ratio attacked / quiet of requests per second and of the p50 and p99 latencies. Also reported: the router's
open file descriptors and what its /metrics says of its connections under attack.

Run: ``.venv/bin/python bench/slow_clients.py [--rounds 3] [--seconds 3] [--slow 1000] [--request-timeout 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import aiohttp
import httpx
from _processes import stop
from router_overhead import BODIES, running

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer lk-"
BODY = b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Length: 100000\r\n\r\n{"


async def attack(port: int, connections: int) -> None:
    """Keep `connections` slow connections open to 127.0.0.1:`port` until killed; print 'open' once they are."""
    opened = 0
    ready = asyncio.Event()

    async def one(first: bytes) -> None:
        nonlocal opened
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            writer.write(first)
            opened += 1
            if opened == connections:
                ready.set()

            async def trickle(writer: asyncio.StreamWriter = writer) -> None:
                with suppress(OSError):
                    while True:
                        await asyncio.sleep(0.5)
                        writer.write(b"x")
                        await writer.drain()

            trickling = asyncio.create_task(trickle())
            with suppress(OSError):
                await reader.read()  # until the router closes it: then a new one takes its place
            trickling.cancel()
            writer.close()

    tasks = [asyncio.create_task(one(HEAD if i % 2 else BODY)) for i in range(connections)]
    await ready.wait()
    print("open", flush=True)
    await asyncio.gather(*tasks)


async def _load(url: str, headers: dict[str, str], concurrency: int, seconds: float) -> tuple[float, list[float]]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while (started := time.perf_counter()) < deadline:
                async with session.post(url, data=BODIES["whole"], headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 200
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(time.perf_counter() + 0.3) for _ in range(concurrency)))  # warm-up
        latencies.clear()
        began = time.perf_counter()
        await asyncio.gather(*(worker(began + seconds) for _ in range(concurrency)))
        wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{errors} normal requests failed")
    return len(latencies) / wall, sorted(latencies)


def _pct(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--slow", type=int, default=1000, help="slow connections the attacker holds open")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    modes = parser.add_subparsers(dest="mode")
    attacker = modes.add_parser("attack", help="internal: the attacker")
    attacker.add_argument("--port", type=int, required=True)
    attacker.add_argument("--connections", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "attack":
        asyncio.run(attack(args.port, args.connections))
        return

    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    under_attack: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, running(Path(tmp), None, "sqlite") as setup:
        url, headers = setup.targets["router"]
        port = int(setup.router.url.rsplit(":", 1)[1])
        for round_ in range(args.rounds):
            for state in ("quiet", "attacked") if round_ % 2 == 0 else ("attacked", "quiet"):
                attacker_process = None
                if state == "attacked":
                    command = [sys.executable, str(Path(__file__).resolve()), "attack", "--port", str(port)]
                    command += ["--connections", str(args.slow)]
                    attacker_process = subprocess.Popen(command, stdout=subprocess.PIPE)
                    assert attacker_process.stdout is not None
                    assert attacker_process.stdout.readline() == b"open\n"
                try:
                    for level in args.concurrency:
                        rps, latencies = asyncio.run(_load(url, headers, level, args.seconds))
                        results.setdefault((state, level), []).append(
                            (rps, _pct(latencies, 0.5), _pct(latencies, 0.99))
                        )
                    if attacker_process is not None and not under_attack:
                        before = setup.router.cpu_seconds() or 0.0
                        time.sleep(args.seconds)  # the attacker alone
                        spent = (setup.router.cpu_seconds() or 0.0) - before
                        under_attack["router CPU, attacker alone"] = f"{100 * spent / args.seconds:.1f} % of a core"
                        under_attack["open files"] = len(os.listdir(f"/proc/{setup.router.process.pid}/fd"))
                        metrics = httpx.get(f"{setup.router.url}/metrics").text
                        under_attack["metrics"] = [
                            line for line in metrics.splitlines() if line.startswith("llamakit_router_connection")
                        ]
                finally:
                    if attacker_process is not None:
                        stop(attacker_process, grace=5)
                time.sleep(0.5)
    print(
        f"normal requests to the router, quiet and with {args.slow} slow connections held open ({args.rounds} "
        f"rounds × {args.seconds:g} s, medians); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'concurrency':>11} {'state':>9} {'rps':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for level in args.concurrency:
        medians = {}
        for state in ("quiet", "attacked"):
            rows = results[(state, level)]
            medians[state] = tuple(statistics.median(r[i] for r in rows) for i in range(3))
            rps, p50, p99 = medians[state]
            print(f"{level:>11} {state:>9} {rps:>8.0f} {p50:>8.2f} {p99:>8.2f}")
        q, a = medians["quiet"], medians["attacked"]
        print(
            f"{level:>11} {'ratio':>9} {a[0] / q[0]:>8.2f} {a[1] / q[1]:>8.2f} {a[2] / q[2]:>8.2f}  (attacked / quiet)"
        )
    print(
        f"under attack: the router had {under_attack.get('open files')} files open and used "
        f"{under_attack.get('router CPU, attacker alone')} for the attacker alone; its /metrics:"
    )
    for line in under_attack.get("metrics", []):  # type: ignore[attr-defined]
        print(f"    {line}")


if __name__ == "__main__":
    main()
