"""Fair share among equal bids: accounts take turns, and no account holds more than its share of a queue."""

from __future__ import annotations

import asyncio

import httpx

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd


async def test_a_late_account_is_served_within_two_and_a_flooding_account_is_capped(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start(max_queue=20, max_queue_share=0.5)
    alice = await herd.account("alice", 1_000_000)
    bob = await herd.account("bob", 1_000_000)

    async def ask(client: httpx.AsyncClient, who: str) -> tuple[str, int]:
        resp = await client.post("/v1/completions", json={"prompt": who, "max_tokens": 1})
        return who, resp.status_code

    # Alice floods: one request runs (held at the node's gate), ten wait (her share of 20), the rest are refused.
    flood = [asyncio.create_task(ask(alice, f"alice-{i}")) for i in range(50)]
    refused = []
    for _ in range(200):
        refused = [t for t in flood if t.done()]
        if len(refused) == 39:
            break
        await asyncio.sleep(0.02)
    assert len(refused) == 39 and all(t.result()[1] == 429 for t in refused)
    body = (await alice.post("/v1/completions", json={"prompt": "one more", "max_tokens": 1})).json()
    assert body["error"]["code"] == "queue_share_exceeded" and "10 of 20" in body["error"]["message"]

    # Bob comes later with one request at the same bid: it still gets into the queue, and is served next but one.
    late = asyncio.create_task(ask(bob, "bob-0"))
    await asyncio.sleep(0.1)
    gate.set()
    results = await asyncio.gather(*[t for t in flood if t not in refused], late)
    assert all(status == 200 for _, status in results)
    order = [body["prompt"] for body in node.received]
    assert order[0].startswith("alice-")
    assert order.index("bob-0") <= 2, order


async def test_a_higher_bid_still_goes_first_and_turns_alternate_between_accounts(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start(max_queue=64)
    alice = await herd.account("alice", 1_000_000)
    bob = await herd.account("bob", 1_000_000)
    carol = await herd.account("carol", 1_000_000)

    async def ask(client: httpx.AsyncClient, prompt: str, bid: float = 1.0) -> int:
        resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "bid": bid})
        return resp.status_code

    tasks = [asyncio.create_task(ask(alice, "a-running"))]
    await asyncio.sleep(0.1)  # holds the only slot
    for i in range(4):
        tasks.append(asyncio.create_task(ask(alice, f"a{i}")))
        await asyncio.sleep(0.02)
    for i in range(2):
        tasks.append(asyncio.create_task(ask(bob, f"b{i}")))
        await asyncio.sleep(0.02)
    tasks.append(asyncio.create_task(ask(carol, "c-high", bid=2.0)))
    await asyncio.sleep(0.1)
    gate.set()
    assert all(status == 200 for status in await asyncio.gather(*tasks))
    order = [body["prompt"] for body in node.received]
    assert order == ["a-running", "c-high", "a0", "b0", "a1", "b1", "a2", "a3"], order
