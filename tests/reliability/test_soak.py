"""A bounded soak through a real router process with a fast fake node: nothing lost, nothing twice, books exact.

`LLAMAKIT_SOAK_REQUESTS=20000 pytest tests/reliability/test_soak.py` runs the full-size soak; the default is
small enough for every CI run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fake_node import HERD_TOKEN
from tests.support.ports import free_port

ADMIN = "soak-admin-key"
REQUESTS = int(os.environ.get("LLAMAKIT_SOAK_REQUESTS", "3000"))
CONCURRENCY = 64


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[str, int]]:
    node_port, router_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    root = Path(__file__).resolve().parents[2]
    node = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_node", "--port", str(node_port), "--name", "fast",
         "--slots", "512", "--tokens", "4", "--token-delay", "0"],
        cwd=root,
    )  # fmt: skip
    env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN, "LLAMAKIT_HERD_TOKEN": HERD_TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamakit.router", "--port", str(router_port), "--db", str(tmp_path / "ledger.db"),
         "--node", f"http://127.0.0.1:{node_port}", "--health-interval", "0.2", "--max-queue", "100000",
         "--usage-log", str(tmp_path / "usage.jsonl")],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "router.log").open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{router_port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health").json()["ready"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        node.terminate()
        proc.wait(10)
        node.wait(10)


async def test_soak(router: tuple[str, int], tmp_path: Path) -> None:
    url, pid = router
    admin = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    key = (await admin.post("/admin/accounts", json={"name": "soak", "deposit": 10**12})).json()["api_key"]
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits)
    rng = random.Random(7)
    plan = [(rng.random() < 0.3, rng.choice([1, 1.25, 2, 3.5])) for _ in range(REQUESTS)]
    ids: list[str] = []
    costs: list[int] = []
    statuses: Counter[int] = Counter()
    queue: asyncio.Queue[tuple[bool, float]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    memory: list[int] = []

    async def worker() -> None:
        while not queue.empty():
            stream, bid = queue.get_nowait()
            body = {"prompt": "soak test", "max_tokens": 8, "bid": bid, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            resp = await client.post("/v1/completions", json=body)
            statuses[resp.status_code] += 1
            if resp.status_code != 200:
                continue
            ids.append(resp.headers["X-Llamakit-Request-Id"])
            if stream:
                assert resp.text.rstrip().endswith("data: [DONE]")
                events = [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data: {")]
                costs.append(next(e["usage"]["cost_credits"] for e in events if e.get("usage")))
            else:
                costs.append(resp.json()["usage"]["cost_credits"])
            if len(ids) in (REQUESTS // 5, REQUESTS - 1):
                memory.append(rss_kib(pid))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert statuses == Counter({200: REQUESTS}), statuses
    assert len(set(ids)) == REQUESTS, "a request was answered twice"
    books = (await admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0
    assert books["charges"] == sum(costs), "the charges differ from what the clients were told"
    stats = (await admin.get("/admin/stats")).json()
    assert stats["requests"]["by_status"] == {"ok": REQUESTS}
    lines = (tmp_path / "usage.jsonl").read_text().splitlines()
    assert len(lines) == REQUESTS
    growth_mib = (memory[-1] - memory[0]) / 1024
    assert growth_mib < 25, f"the router grew by {growth_mib:.1f} MiB from 20% to 100% of the soak"
    await client.aclose()
    await admin.aclose()
