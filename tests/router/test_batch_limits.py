"""A batch under its API key's rate and concurrency limits (docs/money.md#batches): its lines wait for the key's
batch window instead of failing, each runs and is charged once, and neither they nor their place in the queue
take anything from interactive requests.

The limiter's clock is the test's (`Clock`): a window ends when the test moves the clock past it, so the test
counts the lines let in per window and asserts on the counts, never on time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from llamakit.router import limits
from llamakit.router.batches import runner as batch_runner
from llamakit.router.batches.runner import RUNNER
from llamakit.router.limits import UNLIMITED, Admission, Caller, KeyRates
from tests.router.test_batches import MODEL, Tenant, line, price, stats, until
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd


class Clock:
    """`time` as the limiter sees it: monotonic seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        return time.time()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(limits, "time", clock)
    monkeypatch.setattr(batch_runner, "ROUND_SECONDS", 0.05)  # a window freed is claimed from within a round
    return clock


@pytest.fixture
def let_in(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> list[float]:
    """The limiter's clock at each batch line let in under a key's limits."""
    times: list[float] = []
    admit = KeyRates.admit

    def counted(self: KeyRates, caller: Caller, tokens: int = 0, *, batch: bool = False) -> Admission:
        admission = admit(self, caller, tokens, batch=batch)
        if batch and admission is not UNLIMITED:
            times.append(clock.now)
        return admission

    monkeypatch.setattr(KeyRates, "admit", counted)
    return times


async def key_tenant(herd: Herd, account: str, key_limits: dict[str, Any] | None) -> Tenant:
    """A tenant using a new key of `account` (made if need be) with `key_limits`."""
    assert herd.admin is not None and herd.router is not None
    if (await herd.admin.get(f"/admin/accounts/{account}")).status_code == 404:
        await (await herd.account(account, 1_000_000)).aclose()
    made = await herd.admin.post(f"/admin/accounts/{account}/keys", json={"limits": key_limits})
    assert made.status_code == 201, made.text
    key = made.json()["api_key"]
    return Tenant(herd, httpx.AsyncClient(base_url=herd.router.url, headers={"Authorization": f"Bearer {key}"}))


def wake(herd: Herd) -> None:
    assert herd.router is not None
    herd.router.app[RUNNER].wake()


async def run_windows(herd: Herd, tenant: Tenant, batch_id: str, clock: Clock, let_in: list[float]) -> Any:
    """Let the batch run window by window: once every line let in has ended, the clock moves past the window."""
    for _ in range(200):
        batch = await tenant.openai.batches.retrieve(batch_id)
        if batch.status != "in_progress":
            return batch

        async def ended(seen: int = len(let_in)) -> bool:
            done = (await tenant.openai.batches.retrieve(batch_id)).request_counts
            return done.completed + done.failed >= seen

        await until(ended, "the lines let in have ended")
        clock.now += limits.WINDOW_SECONDS + 1
        wake(herd)
        await asyncio.sleep(0.05)
    raise AssertionError("the batch never finished")


async def test_a_batch_runs_at_most_rpm_limit_lines_per_window_and_completes(
    herd: Herd, clock: Clock, let_in: list[float]
) -> None:
    node = await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=2), openai_shapes=True))
    await herd.start()
    alice = await key_tenant(herd, "alice", {"rpm_limit": 2})
    lines = [line(i) for i in range(7)]
    batch = await alice.submit(lines)
    done = await run_windows(herd, alice, batch.id, clock, let_in)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed, done.request_counts.total) == (7, 0, 7)
    per_window = Counter(let_in)
    assert len(let_in) == 7 and max(per_window.values()) == 2, per_window  # never refused: each let in once
    assert len(per_window) >= 4  # 7 lines at 2 a window
    assert len(node.received) == 7  # each line ran once
    out = await alice.lines_of(done.output_file_id)
    assert sorted(out) == sorted(f"line-{i}" for i in range(7))
    costs = [x["response"]["body"]["usage"]["cost_credits"] for x in out.values()]
    assert costs == [price(1 + 3, 2)] * 7
    books = await herd.books()
    assert books["charges"] == sum(costs) == done.usage.model_extra["cost_credits"]  # type: ignore[union-attr]
    assert (await stats(herd))["batches"]["here"]["lines"] == 0
    await alice.close()


async def test_a_batch_never_has_more_than_max_parallel_requests_lines_on_nodes(
    herd: Herd, clock: Clock, let_in: list[float]
) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=6, script=Script(tokens=2, gate=gate), openai_shapes=True))
    await herd.start()
    alice = await key_tenant(herd, "alice", {"max_parallel_requests": 2})
    batch = await alice.submit([line(i) for i in range(9)])
    while len(node.received) < 9:
        # Two lines reach the node and are held there; rounds go by (one is asked for here) and no third comes.
        await until(lambda: _true(node.active == 2 or len(node.received) == 9), "two lines at the node")
        wake(herd)
        await asyncio.sleep(0.1)
        assert node.active <= 2
        gate.set()
        gate.clear()
    gate.set()
    done = await alice.finished(batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 9, 0)
    assert node.max_active == 2 and len(node.received) == 9 and len(let_in) == 9
    await alice.close()


async def _true(value: bool) -> bool:
    return value


async def test_interactive_requests_are_served_while_a_batch_waits_on_its_limit(
    herd: Herd, clock: Clock, let_in: list[float]
) -> None:
    await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=2), openai_shapes=True))
    await herd.start()
    alice = await key_tenant(herd, "alice", {"rpm_limit": 1})
    batch = await alice.submit([line(i) for i in range(3)])

    async def one_done() -> bool:
        counts = (await alice.openai.batches.retrieve(batch.id)).request_counts
        return counts is not None and counts.completed == 1

    await until(one_done, "the batch's first line done")
    for _ in range(5):  # the batch waits for its key's window; nothing holds up anyone else's request
        wake(herd)
        await asyncio.sleep(0.02)
    assert len(let_in) == 1
    bob = await herd.account("bob", 1_000_000)
    for n in range(5):
        asked = await bob.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                                                             "content": f"ask{n}"}], "max_tokens": 2})  # fmt: skip
        assert asked.status_code == 200, asked.text
    # The batch's lines are counted apart from the key's interactive requests: its own minute is still whole.
    own = await alice.http.post("/v1/completions", json={"model": MODEL, "prompt": "mine", "max_tokens": 2})
    assert own.status_code == 200, own.text
    assert (await alice.http.post("/v1/completions", json={"model": MODEL, "prompt": "again"})).status_code == 429
    done = await run_windows(herd, alice, batch.id, clock, let_in)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 3, 0)
    assert max(Counter(let_in).values()) == 1
    await bob.aclose()
    await alice.close()


async def test_batch_lines_waiting_for_a_slot_never_fill_the_queue_of_interactive_requests(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=2, gate=gate), openai_shapes=True))
    await herd.start(max_queue=1)
    alice = Tenant(herd, await herd.account("alice", 1_000_000))

    def ask(n: int) -> asyncio.Task[httpx.Response]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"ask{n}"}], "max_tokens": 2}
        return asyncio.create_task(alice.http.post("/v1/chat/completions", json=body))

    asks = [ask(0), ask(1)]  # both slots
    await until(lambda: _true(node.active == 2), "both slots taken")
    batch = await alice.submit([line(i) for i in range(4)])

    async def line_waiting() -> bool:
        return bool((await stats(herd))["batches"]["here"].get("waiting") == 1)

    await until(line_waiting, "a batch line waiting for a slot: the queue's one place")
    # Before, the waiting line took the queue's place: this got 429 queue_full, and its account's share with it.
    asks.append(ask(2))

    async def interactive_waiting() -> bool:
        return int((await alice.http.get("/v1/info")).json()["queue_length"]) == 1

    await until(interactive_waiting, "the interactive request queued")
    gate.set()
    assert [r.status_code for r in await asyncio.gather(*asks)] == [200, 200, 200]
    done = await alice.finished(batch.id)
    assert (done.status, done.request_counts.completed) == ("completed", 4)
    tags = [(r["messages"][0]["content"]).split()[0] for r in node.received]
    assert tags.index("ask2") < tags.index("batch0")  # still behind the interactive request
    await alice.close()
