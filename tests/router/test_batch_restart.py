"""A router killed (SIGKILL, a real process) in the middle of a batch: the next router on its ledger resumes the
batch where it stopped, and no line is charged twice (the one on the node when the router died is refunded at the
restart, run again, and charged once)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI

from tests.router.test_batches import Gate, jsonl, line, price
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import ADMIN_KEY
from tests.support.ports import free_port
from tests.support.servers import RunningServer

ROOT = Path(__file__).parents[2]


class RouterProcess:
    """`python -m llamakit.router` on a ledger file, in front of one node."""

    def __init__(self, db: Path, node: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "llamakit.router", "--port", str(self.port), "--db", str(db), "--node", node,
                "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN, "--health-interval", "0.1", "--loop", "asyncio",
                "--base-fee", "10", "--prompt-token-fee", "1", "--completion-token-fee", "2"]  # fmt: skip
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(600):
                try:
                    if (await client.get("/health")).json().get("ready") == 1:
                        return
                except (httpx.TransportError, ValueError):
                    pass
                assert self.process.poll() is None, "the router exited"
                await asyncio.sleep(0.05)
        raise AssertionError("the router did not become ready")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
async def node() -> AsyncIterator[tuple[FakeNode, str]]:
    fake = FakeNode("n1", script=Script(tokens=3), openai_shapes=True)
    server = await RunningServer(fake.app()).start()
    yield fake, server.url
    await server.stop()


async def test_a_router_killed_mid_batch_resumes_it_and_runs_no_line_twice(
    tmp_path: Path, node: tuple[FakeNode, str]
) -> None:
    fake, node_url = node
    gate = Gate(fake)
    first = RouterProcess(tmp_path / "ledger.db", node_url, tmp_path / "router.log")
    routers = [first]
    try:
        await first.ready()
        async with httpx.AsyncClient(base_url=first.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            made = await admin.post("/admin/accounts", json={"name": "alice", "deposit": 100_000})
            key = made.json()["api_key"]
        client = AsyncOpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0)
        lines = [line(i, words=1 + i) for i in range(6)]
        upload = await client.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await gate.arrived(1)
        await gate.step()
        await gate.step()  # lines 0 and 1 are settled; line 2 is on the node, held
        assert gate.tags() == ["batch0", "batch1", "batch2"]
        first.kill()
        await client.close()

        gate.event.set()
        second = RouterProcess(tmp_path / "ledger.db", node_url, tmp_path / "router.log")
        routers.append(second)
        await second.ready()
        client = AsyncOpenAI(base_url=second.url + "/v1", api_key=key, max_retries=0)
        for _ in range(1000):
            done = await client.batches.retrieve(batch.id)
            if done.status == "completed":
                break
            await asyncio.sleep(0.02)
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 6, 0)
        # Line 2 reached the node twice (the first answer died with the router), every other line once.
        assert sorted(gate.tags()) == sorted(["batch0", "batch1", "batch2", "batch2", "batch3", "batch4", "batch5"])
        content = await client.files.content(done.output_file_id or "")
        outputs = [json.loads(x) for x in content.text.splitlines()]
        assert sorted(o["custom_id"] for o in outputs) == [f"line-{i}" for i in range(6)]
        costs = {o["response"]["request_id"]: o["response"]["body"]["usage"]["cost_credits"] for o in outputs}
        assert sorted(costs.values()) == sorted(price(1 + i + 3, 3) for i in range(6))
        async with httpx.AsyncClient(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as alice:
            records = (await alice.get("/v1/account/usage")).json()["data"]
        charged = [r for r in records if r["cost_credits"]]
        assert sorted(r["request_id"] for r in charged) == sorted(costs)  # each line charged once, and only so
        assert [r["status"] for r in records if not r["cost_credits"]] == ["recovered"]  # line 2's first hold
        async with httpx.AsyncClient(base_url=second.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            books = (await admin.get("/admin/books")).json()
        assert books["balanced"] and books["holds"] == 0 and books["charges"] == sum(costs.values())
        assert done.usage is not None and done.usage.model_extra["cost_credits"] == sum(costs.values())
        await client.close()
    finally:
        for router in routers:
            router.stop()
