"""A running stream's checkpoints: what it delivered, noted on its hold every --checkpoint-tokens tokens or
--checkpoint-ms, whichever first (a crash of the router is tests/router/test_crash_recovery.py's)."""

from __future__ import annotations

import asyncio

import httpx

from llamakit.router.ledger import Hold
from llamakit.router.state import STATE
from tests.router.test_operator import sample
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

BODY = {"prompt": "one two three four", "max_tokens": 64, "stream": True}


async def hold_of(herd: Herd, request_id: str) -> Hold:
    assert herd.router is not None
    hold = await herd.router.app[STATE].ledger.find_hold(request_id)
    assert hold is not None
    return hold


async def stream(client: httpx.AsyncClient) -> str:
    """A whole stream, read to its end: its request id."""
    async with client.stream("POST", "/v1/completions", json=BODY) as resp:
        assert resp.status_code == 200
        assert [line async for line in resp.aiter_lines() if line.startswith("data:")][-1] == "data: [DONE]"
        return resp.headers["X-Llamakit-Request-Id"]


async def test_a_stream_checkpoints_every_n_tokens_and_its_settlement_charges_the_usage(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=10)))
    await herd.start(checkpoint_tokens=3, checkpoint_ms=60_000)
    alice = await herd.account("alice", 10_000)
    request_id = await stream(alice)
    hold = await hold_of(herd, request_id)
    # The last checkpoint before the settlement: 9 tokens when each came in a read of its own, at least 3.
    assert hold.status == "settled" and hold.delivered is not None
    assert 3 <= hold.delivered.completion_tokens <= 9 and hold.delivered.node == "n1"
    assert hold.delivered.charge == 10 + 7 + 2 * hold.delivered.completion_tokens
    [record] = (await alice.get("/v1/account/usage")).json()["data"]
    assert (record["status"], record["completion_tokens"], record["cost_credits"]) == ("ok", 10, 10 + 7 + 20)
    written = sample((await alice.get("/metrics")).text, "llamakit_router_stream_checkpoints_total")
    assert written is not None and 1 <= written <= 3


async def test_no_checkpoints_with_checkpoint_tokens_0(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=10)))
    await herd.start(checkpoint_tokens=0)
    alice = await herd.account("alice", 10_000)
    request_id = await stream(alice)
    assert (await hold_of(herd, request_id)).delivered is None


async def test_a_slow_stream_checkpoints_every_t_milliseconds(herd: Herd) -> None:
    # One token every 20 ms at least, and a checkpoint due every 50 ms: 12 tokens span more than one.
    await herd.add_node(FakeNode("n1", script=Script(tokens=12, token_delay=0.02)))
    await herd.start(checkpoint_tokens=1000, checkpoint_ms=50)
    alice = await herd.account("alice", 10_000)
    request_id = await stream(alice)
    delivered = (await hold_of(herd, request_id)).delivered
    assert delivered is not None and 1 <= delivered.completion_tokens <= 12


async def test_a_stalled_streams_last_tokens_are_checkpointed_within_checkpoint_ms(herd: Herd) -> None:
    # A checkpoint every 1000 tokens or 100 ms: the node's 7 tokens come quicker than that, then it goes silent.
    # No flush comes after them, and a timer checkpoints them.
    await herd.add_node(FakeNode("n1", script=Script(tokens=64, stall_after=7)))
    await herd.start(checkpoint_tokens=1000, checkpoint_ms=100)
    alice = await herd.account("alice", 10_000)
    async with alice.stream("POST", "/v1/completions", json=BODY) as resp:
        request_id, lines, chunks = resp.headers["X-Llamakit-Request-Id"], resp.aiter_lines(), 0
        while chunks < 7:
            chunks += (await anext(lines)).startswith("data: {")
        for _ in range(400):
            delivered = (await hold_of(herd, request_id)).delivered
            if delivered is not None and delivered.completion_tokens == 7:
                break
            await asyncio.sleep(0.025)
        assert delivered is not None and (delivered.completion_tokens, delivered.prompt_tokens) == (7, 7)
    await herd.stop_node("n1")  # the stream ends, and is settled
    for _ in range(400):
        if not (await herd.books())["holds"]:
            break
        await asyncio.sleep(0.025)
