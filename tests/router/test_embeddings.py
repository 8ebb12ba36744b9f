"""`POST /v1/embeddings` through the router against scripted nodes: priced per input token, held, queued with
bids for a node slot, settled on exact usage, refunded on failure, refused (nothing held) on bad input."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from llamakit.wire.embeddings import MAX_EMBEDDING_INPUTS, MAX_EMBEDDING_TOKENS, TEXT_TOKEN_ALLOWANCE
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd


def cost(prompt: int, bid: float = 1.0) -> int:
    return math.ceil(bid * (10 + 1 * prompt))


async def test_embeddings_are_settled_on_exact_input_tokens(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"model": "fake-model", "input": ["one two", "three"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    # The fake node counts words + 1 per text: 3 + 2.
    # cost is the price in US dollars at the default credit value (a millionth); cost_credits what was charged
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5, "cost": cost(5) / 10**6, "cost_credits": cost(5)}
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert resp.headers["X-Llamakit-Cost-Credits"] == str(cost(5))
    assert resp.headers["X-Llamakit-Node"] == "n1"
    account = (await alice.get("/v1/account")).json()
    assert account["balance"] == 10_000 - cost(5) and account["held"] == 0 and account["spent"] == cost(5)
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["prompt_tokens"], u["completion_tokens"], u["cost_credits"], u["status"]) for u in usage] == [
        (5, 0, cost(5), "ok")
    ]
    assert node.received == [{"model": "fake-model", "input": ["one two", "three"]}]


async def test_the_bid_multiplies_the_price_and_token_ids_are_priced_exactly(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"input": [[1, 2, 3], [4]], "bid": 1.5})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["cost_credits"] == cost(4, 1.5) == 21  # 1.5 × 14
    assert resp.headers["X-Llamakit-Bid"] == "1.5"
    assert "bid" not in node.received[0]
    resp = await alice.post("/v1/embeddings", json={"input": "one"}, headers={"X-Llamakit-Bid": "2"})
    assert resp.json()["usage"]["cost_credits"] == cost(2, 2)
    assert (await alice.get("/v1/account")).json()["spent"] == 21 + cost(2, 2)


async def test_base64_vectors_pass_through(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
    assert isinstance(resp.json()["data"][0]["embedding"], str)


async def test_402_when_the_hold_is_not_covered_and_nothing_is_queued(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    poor = await herd.account("poor", 20)
    text = "word " * 10  # 50 bytes
    resp = await poor.post("/v1/embeddings", json={"input": text})
    assert resp.status_code == 402, resp.text
    assert resp.json()["error"]["needed"] == 10 + len(text) + TEXT_TOKEN_ALLOWANCE
    assert node.received == []
    assert (await poor.get("/v1/account")).json()["balance"] == 20


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "hi", "frobnicate": 1}, "frobnicate", "not supported"),
        ({"model": "fake-model"}, "input", "required"),
        ({"input": []}, "input", "empty"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["a", ""]}, "input", "input 1 is empty"),
        ({"input": ["a"] * (MAX_EMBEDDING_INPUTS + 1)}, "input", f"at most {MAX_EMBEDDING_INPUTS} inputs"),
        ({"input": [0] * (MAX_EMBEDDING_TOKENS + 1)}, "input", f"at most {MAX_EMBEDDING_TOKENS} tokens"),
        ({"input": [[1, -2]]}, "input", "out of range"),
        ({"input": [1, "a"]}, "input", ""),
        ({"input": "hi", "encoding_format": "hex"}, "encoding_format", "float"),
        ({"input": "hi", "dimensions": 0}, "dimensions", "greater than 0"),
        ({"input": "hi", "bid": 0.5}, "bid", "from 1"),
        ({"input": "hi", "model": "gpt-4o"}, "model", "fake-model"),
        # kept on the usage record: as long as completions allow it, and text (not half an emoji, which JSON can
        # escape but UTF-8 cannot hold)
        ({"input": "hi", "user": "u" * 101}, "user", "at most 100 characters"),
        ({"input": "hi", "user": "\ud800"}, "user", "unicode string"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_held(
    herd: Herd, body: dict[str, object], param: str, words: str
) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    # JSON with \u escapes, as a client sends a lone surrogate (httpx's json= cannot encode one as UTF-8)
    resp = await alice.post("/v1/embeddings", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert node.received == []
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000
    # Refused before anything was held: a usage record with no tokens and no cost, as chat completions get.
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["cost_credits"], u["prompt_tokens"], u["http_status"]) for u in usage] == [(0, 0, resp.status_code)]


async def test_a_refusal_by_the_node_is_passed_on_and_refunded(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"input": [[5, 99999]]})
    assert resp.status_code == 400 and "vocabulary" in resp.json()["error"]["message"]
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000
    assert [u["status"] for u in (await alice.get("/v1/account/usage")).json()["data"]] == ["rejected"]


async def test_a_failing_node_is_refunded_in_full(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(fail_status=500)))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"input": "one two"})
    assert resp.status_code == 503, resp.text
    assert "nothing was charged" in resp.json()["error"]["message"]
    assert (await alice.get("/v1/account")).json() | {"balance": 10_000, "held": 0, "spent": 0} == (
        await alice.get("/v1/account")
    ).json()


async def test_when_every_node_fails_the_error_says_what_the_last_one_answered(herd: Herd) -> None:
    """A node that cannot embed at all (a llama-server without --embeddings): its error code reaches the client,
    not "no node right now", which would invite a retry that cannot help; its message (the operator's) does not."""
    script = Script(fail_status=503, fail_code="embeddings_unavailable", fail_message="start it on 127.0.0.1:9 with")
    await herd.add_node(FakeNode("n1", script=script))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/embeddings", json={"input": "one two"})
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "node n1 answered 503 (embeddings_unavailable)" in message and "nothing was charged" in message
    assert "127.0.0.1" not in message
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000


async def test_a_node_that_did_not_answer_is_told_without_its_address(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 10_000)
    await herd.stop_node("n1")  # the router learns it when it tries it
    resp = await alice.post("/v1/embeddings", json={"input": "one two"})
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "127.0.0.1" not in message and "nothing was charged" in message, message


async def test_embeddings_wait_for_a_slot_in_bid_order_with_other_requests(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(gate=gate, tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    first = asyncio.create_task(alice.post("/v1/embeddings", json={"input": "first"}))
    while node.active == 0:
        await asyncio.sleep(0.01)
    chat = asyncio.create_task(
        alice.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "low"}], "max_tokens": 2})
    )
    await asyncio.sleep(0.1)
    high = asyncio.create_task(alice.post("/v1/embeddings", json={"input": "high", "bid": 2}))
    while (await alice.get("/v1/info")).json()["queue_length"] < 2:
        await asyncio.sleep(0.01)
    assert node.max_active == 1
    gate.set()
    responses = await asyncio.gather(first, chat, high)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [b.get("input") or b["messages"][0]["content"] for b in node.received] == ["first", "high", "low"]
    assert node.max_active == 1


async def test_a_repeat_with_the_same_idempotency_key_is_charged_once(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    headers = {"Idempotency-Key": "embed-once"}
    one = await alice.post("/v1/embeddings", json={"input": "one two"}, headers=headers)
    two = await alice.post("/v1/embeddings", json={"input": "one two"}, headers=headers)
    assert one.json() == two.json() and two.headers["Idempotent-Replayed"] == "true"
    assert len(node.received) == 1
    assert (await alice.get("/v1/account")).json()["spent"] == cost(3)
