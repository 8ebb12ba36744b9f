"""The router's CPU per request, two (or more) versions of it side by side: for a change too small to see in
`router_overhead.py`'s ratios on a shared machine.

Each version is a directory that holds a `llamakit` package (`git archive main llamakit | tar -x -C /tmp/main`
makes one); all of them run at once as `python -m llamakit.router` from their directory, each on a SQLite
ledger of its own, behind the same fake node of `router_overhead.py`, and are loaded in turn, cell by cell,
the order rotating every round. Printed per workload and concurrency: each version's median router CPU
microseconds per request (from /proc), requests per second and p50, and the ratio of every version to the
first, with the median of the per-round ratios (the steadier figure when the machine is busy).

Run: ``.venv/bin/python bench/router_ab.py /tmp/main . [--rounds 4] [--concurrency 1 16 64]
[--workload whole stream] [--seconds 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import router_overhead as ro
from _processes import free_port, stop

ADMIN_KEY, HERD_TOKEN = "bench-admin-key", "bench-herd-token"


def start(stack: ExitStack, name: str, command: list[str], cwd: Path, port: int, tmp: Path) -> ro.Server:
    log = stack.enter_context((tmp / f"{name}.log").open("w+b"))
    process = subprocess.Popen(command, cwd=cwd, env=ro._clean_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    stack.callback(stop, process)
    return ro.Server(name, f"http://127.0.0.1:{port}", process, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("versions", nargs="+", type=Path, help="directories that hold a llamakit package")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--workload", nargs="+", choices=ro.WORKLOADS, default=list(ro.WORKLOADS))
    args = parser.parse_args()
    names = [f"{i}:{v}" for i, v in enumerate(args.versions)]
    with tempfile.TemporaryDirectory() as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        port = free_port()
        node = start(
            stack, "node", [sys.executable, str(Path(ro.__file__)), "node", "--port", str(port)], ro.ROOT, port, tmp
        )
        routers: dict[str, tuple[ro.Server, str]] = {}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(timeout=ro.REQUEST_TIMEOUT) as http:
            ro._wait(node, lambda: http.get(f"{node.url}/health").json()["status"] == "ready")
            for i, (name, version) in enumerate(zip(names, args.versions, strict=True)):
                port = free_port()
                command = [
                    sys.executable, "-m", "llamakit.router", "--host", "127.0.0.1", "--port", str(port),
                    "--db", str(tmp / f"ledger-{i}.db"), "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN,
                    "--node", node.url, "--base-fee", str(ro.BASE_FEE), "--prompt-token-fee", str(ro.PROMPT_TOKEN_FEE),
                    "--completion-token-fee", str(ro.COMPLETION_TOKEN_FEE),
                ]  # fmt: skip
                router = start(stack, f"router-{i}", command, version.resolve(), port, tmp)
                ro._wait(
                    router,
                    lambda r=router: any(
                        n["state"] == "ready" for n in http.get(f"{r.url}/admin/nodes", headers=admin).json()["data"]
                    ),
                )
                made = http.post(
                    f"{router.url}/admin/accounts", headers=admin, json={"name": "ab", "deposit": ro.DEPOSIT}
                )
                routers[name] = (router, made.json()["api_key"])
        cells: dict[tuple[str, int, str], list[ro.Cell]] = {}

        async def run() -> None:
            for r in range(args.rounds):
                for workload in args.workload:
                    for level in args.concurrency:
                        shift = r % len(names)
                        for name in names[shift:] + names[:shift]:
                            router, key = routers[name]
                            setup = ro.Setup(node, node, router, ADMIN_KEY, key, "")
                            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
                            setup.targets = {"router": (f"{router.url}/v1/completions", headers)}
                            cell, _ = await ro.measure_cell(setup, workload, "router", level, r, args.seconds, 0.3)
                            cells.setdefault((workload, level, name), []).append(cell)
                            await asyncio.sleep(0.2)

        load_before = os.getloadavg()[0]
        asyncio.run(run())
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds")
    for workload in args.workload:
        for level in args.concurrency:
            first = cells[(workload, level, names[0])]
            for name in names:
                mine = cells[(workload, level, name)]
                cpu = statistics.median(c.cpu_us.get("router", float("nan")) for c in mine)
                paired = statistics.median(
                    m.cpu_us["router"] / f.cpu_us["router"] for m, f in zip(mine, first, strict=True)
                )
                errors = sum(c.errors for c in mine)
                print(
                    f"{workload:<6} c={level:<3} {name:<40} router CPU {cpu:6.0f} us/request "
                    f"(x{paired:.2f} paired)  {statistics.median(c.rps for c in mine):6.0f} rps  "
                    f"p50 {statistics.median(c.p50_ms for c in mine):7.3f} ms  errors {errors}"
                )


if __name__ == "__main__":
    main()
