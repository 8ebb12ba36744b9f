"""Long answers are not hangs, and a client that leaves pays only for what was made before the node stopped."""

from __future__ import annotations

import asyncio

import httpx

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"  # the fake node counts 4 + 3 prompt tokens
FEES = {"base": 10, "prompt": 1, "completion": 2}


async def test_a_whole_answer_longer_than_the_node_timeout_is_served_while_the_node_proves_progress(
    herd: Herd,
) -> None:
    node = await herd.add_node(FakeNode("slow", script=Script(tokens=12, token_delay=0.1, keepalive=True)))
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 12
    assert resp.json()["usage"]["cost_credits"] == 10 + 7 + 2 * 12
    assert (await herd.node_states())["slow"] == "ready", "a node that was making progress is not rested"
    assert len(node.received) == 1


async def test_a_silent_node_is_still_given_up_on_after_the_node_timeout(herd: Herd) -> None:
    await herd.add_node(FakeNode("silent", script=Script(tokens=12, token_delay=0.1)))  # no keepalives
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_node"
    account = (await alice.get("/v1/account")).json()
    assert (account["balance"], account["held"], account["spent"]) == (100_000, 0, 0)


async def test_a_client_that_leaves_a_whole_request_pays_for_the_tokens_made_until_the_node_stopped(
    herd: Herd,
) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=100, token_delay=0.05, keepalive=True)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    with_timeout = httpx.AsyncClient(base_url=str(alice.base_url), headers=alice.headers, timeout=0.6)
    try:
        await with_timeout.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100})
        raise AssertionError("the request should have outlived the client")
    except httpx.ReadTimeout:
        pass
    finally:
        await with_timeout.aclose()
    for _ in range(100):
        usage = (await alice.get("/v1/account/usage")).json()["data"]
        if usage:
            break
        await asyncio.sleep(0.05)
    [record] = usage
    assert record["status"] == "cut"
    assert 5 <= record["completion_tokens"] < 40, record  # stopped within a few tokens of the client leaving
    assert record["cost_credits"] == 10 + 7 + 2 * record["completion_tokens"]
    assert node.active == 0 and not node.stops
    account = (await alice.get("/v1/account")).json()
    assert account["held"] == 0 and account["spent"] == record["cost_credits"]


async def test_a_stream_client_that_leaves_before_its_first_token_is_refunded_and_the_node_stops(
    herd: Herd,
) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=5, first_delay=30)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True}
    with_timeout = httpx.AsyncClient(base_url=str(alice.base_url), headers=alice.headers, timeout=0.5)
    try:
        await with_timeout.post("/v1/completions", json=body)
        raise AssertionError("the stream should not have started")
    except httpx.ReadTimeout:
        pass
    finally:
        await with_timeout.aclose()
    for _ in range(100):
        if node.cancelled:
            break
        await asyncio.sleep(0.05)
    assert node.cancelled == 1 and node.active == 0, "the node's request was closed, which stops its generation"
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["cost_credits"]) for u in usage] == [("cancelled", 0)]
    account = (await alice.get("/v1/account")).json()
    assert (account["balance"], account["held"]) == (100_000, 0)
