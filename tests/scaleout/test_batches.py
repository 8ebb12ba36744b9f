"""Batches on several routers sharing one PostgreSQL database: any router runs any line, each line once, and the
lines of a router killed mid-batch are run by the others once its lease is gone, charged once."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from openai import AsyncOpenAI

from tests.router.test_batches import Gate, jsonl, line, price
from tests.scaleout.conftest import Routers
from tests.support.fake_node import FakeNode, Script


async def submitted(url: str, key: str, lines: list[dict[str, Any]]) -> tuple[AsyncOpenAI, str]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    upload = await client.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return client, batch.id


async def finished(client: AsyncOpenAI, batch_id: str) -> Any:
    for _ in range(2000):
        batch = await client.batches.retrieve(batch_id)
        if batch.status == "completed":
            return batch
        await asyncio.sleep(0.01)
    raise AssertionError(f"batch {batch_id} did not complete: {batch}")


async def outputs(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (await client.files.content(file_id or "")).text.splitlines()]


async def test_routers_share_a_batch_and_run_each_line_once(routers: Routers) -> None:
    node = await routers.add_node(FakeNode("n1", slots=4, script=Script(tokens=2, token_delay=0.005),
                                           openai_shapes=True))  # fmt: skip
    a, b = await routers.start_router(), await routers.start_router()
    await routers.join(a, "n1")
    for url in (a, b):
        await routers.wait_nodes(url, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    client, batch_id = await submitted(b, key, [line(i, words=1 + i % 3) for i in range(30)])
    done = await finished(client, batch_id)
    assert (done.request_counts.completed, done.request_counts.failed) == (30, 0)
    assert len(node.received) == 30  # no line ran twice
    out = await outputs(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(30))
    costs = [o["response"]["body"]["usage"]["cost_credits"] for o in out]
    assert sorted(costs) == sorted(price(1 + i % 3 + 3, 2) for i in range(30))
    books = await routers.books()
    assert books["charges"] == sum(costs) == done.usage.model_extra["cost_credits"]  # type: ignore[union-attr]
    await client.close()


async def test_the_lines_of_a_router_killed_mid_batch_are_run_by_another_once(routers: Routers) -> None:
    node = await routers.add_node(FakeNode("n1", slots=2, script=Script(tokens=2), openai_shapes=True))
    gate = Gate(node)
    victim_url, victim = await routers.spawn_router()
    survivor = await routers.start_router()
    await routers.join(survivor, "n1")
    for url in (victim_url, survivor):
        await routers.wait_nodes(url, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    client, batch_id = await submitted(survivor, key, [line(i) for i in range(8)])
    await gate.arrived(2)  # two lines on the node, others held and waiting, at either router
    admin = routers.admin(victim_url)
    for _ in range(1000):  # until the victim runs lines of its own
        if (await admin.get("/admin/stats")).json()["batches"]["here"]["lines"] >= 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the router to be killed never claimed a line")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    gate.event.set()
    done = await finished(client, batch_id)
    assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
    out = await outputs(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"line-{i}" for i in range(8))
    charged = {o["response"]["request_id"]: o["response"]["body"]["usage"]["cost_credits"] for o in out}
    books = await routers.books()
    assert books["balanced"] and books["holds"] == 0 and books["charges"] == sum(charged.values())
    assert set(charged.values()) == {price(1 + 3, 2)}
    await client.close()


async def test_a_line_waiting_at_one_router_goes_after_an_interactive_request_at_another(routers: Routers) -> None:
    """The cluster's queue orders batch lines below every interactive bid, whichever router holds each."""
    node = await routers.add_node(FakeNode("n1", slots=1, script=Script(tokens=1), openai_shapes=True))
    gate = Gate(node)
    a, b = await routers.start_router(), await routers.start_router()
    await routers.join(a, "n1")
    for url in (a, b):
        await routers.wait_nodes(url, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    at_a, at_b = routers.client(a, key), routers.client(b, key)

    def ask(client: Any, n: int) -> asyncio.Task[Any]:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": f"ask{n}"}], "max_tokens": 1}
        return asyncio.create_task(client.post("/v1/chat/completions", json=body))

    async def until(check: Any, what: str) -> None:
        for _ in range(2000):
            if await check():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"never: {what}")

    async def waiting_lines() -> int:
        return sum([(await routers.admin(u).get("/admin/stats")).json()["batches"]["here"]["waiting"] for u in (a, b)])

    async def interactive(n: int) -> bool:
        return int((await at_a.get("/v1/info")).json()["queue_length"]) == n

    asks = [ask(at_a, 0)]
    await gate.arrived(1)
    client, batch_id = await submitted(b, key, [line(i) for i in range(3)])
    await until(lambda: _is(waiting_lines(), 2), "a line held and waiting at each router")
    asks.append(ask(at_a, 1))
    await until(lambda: interactive(1), "ask1 waiting")
    asks.append(ask(at_b, 2))
    await until(lambda: interactive(2), "ask2 waiting")
    for _ in range(3):
        await gate.step()
    assert gate.tags()[:3] == ["ask0", "ask1", "ask2"] and gate.tags()[3].startswith("batch"), gate.tags()
    gate.event.set()
    await asyncio.gather(*asks)
    done = await finished(client, batch_id)
    assert done.request_counts.completed == 3
    await client.close()


async def _is(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_batch_lines_waiting_in_the_cluster_queue_never_fill_it_for_interactive_requests(
    routers: Routers,
) -> None:
    """llamakit_enqueue counts only interactive requests against --max-queue for an interactive request."""
    node = await routers.add_node(FakeNode("n1", slots=1, script=Script(tokens=1), openai_shapes=True))
    gate = Gate(node)
    a = await routers.start_router(max_queue=1)
    await routers.join(a, "n1")
    await routers.wait_nodes(a, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    http = routers.client(a, key)

    def ask(n: int) -> asyncio.Task[Any]:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": f"ask{n}"}], "max_tokens": 1}
        return asyncio.create_task(http.post("/v1/chat/completions", json=body))

    asks = [ask(0)]
    await gate.arrived(1)
    client, batch_id = await submitted(a, key, [line(i) for i in range(2)])
    admin = routers.admin(a)
    for _ in range(2000):  # the queue's one place taken by a batch line
        if (await admin.get("/admin/stats")).json()["batches"]["here"]["waiting"] == 1:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("no batch line ever waited")
    asks.append(ask(1))  # before, 429 queue_full
    for _ in range(2000):
        if int((await http.get("/v1/info")).json()["queue_length"]) == 1:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError(f"the interactive request never queued: {await asks[1]}")
    await gate.step()
    gate.event.set()
    assert [r.status_code for r in await asyncio.gather(*asks)] == [200, 200]
    assert (await finished(client, batch_id)).request_counts.completed == 2  # its lines reached the node too
    assert gate.tags()[:3] == ["ask0", "ask1", "batch0"], gate.tags()
    await client.close()
