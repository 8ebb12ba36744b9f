"""Idempotency keys: a repeat is answered from the ledger, never generated or charged twice."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from llamakit.wire.headers import OVERHEAD_HEADER, REPLAYED_HEADER
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

BODY = {"prompt": "one two three four", "max_tokens": 5}


async def test_a_repeat_of_a_settled_request_gets_the_same_answer_and_no_new_charge(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    first = await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "call-1"})
    again = await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "call-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-Llamakit-Cost-Credits"] == first.headers["X-Llamakit-Cost-Credits"]
    assert len(node.received) == 1
    account = (await alice.get("/v1/account")).json()
    assert account["spent"] == first.json()["usage"]["cost_credits"]
    # A new key is a new request.
    assert (await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "call-2"})).status_code == 200
    assert len(node.received) == 2


async def test_a_repeat_while_the_first_runs_waits_for_it_instead_of_generating_again(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=3, gate=gate)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    first = asyncio.create_task(alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "k"}))
    while not node.received:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "k"}))
    await asyncio.sleep(0.2)
    assert not second.done()
    gate.set()
    a, b = await asyncio.gather(first, second)
    assert a.json() == b.json() and len(node.received) == 1
    assert (await alice.get("/v1/account")).json()["spent"] == a.json()["usage"]["cost_credits"]


async def test_a_client_that_times_out_and_retries_under_its_key_pays_once_and_gets_the_answer(herd: Herd) -> None:
    # As the SDK (or any client with retries) does after a read timeout. Before, the first was stopped and
    # charged as "cut", and the retry ran again and was charged again: twice the price for one answer.
    node = await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=20, token_delay=0.03)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    body = {**BODY, "max_tokens": 20}
    with pytest.raises(httpx.ReadTimeout):
        await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "slow"}, timeout=0.25)
    retry = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "slow"}, timeout=30)
    assert retry.status_code == 200, retry.text
    assert retry.json()["usage"]["completion_tokens"] == 20
    assert len(node.received) == 1 and node.cancelled == 0
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["completion_tokens"]) for u in usage] == [("ok", 20)]
    assert (await alice.get("/v1/account")).json()["spent"] == retry.json()["usage"]["cost_credits"]


async def test_without_a_key_a_client_that_leaves_stops_the_generation_and_pays_for_what_was_made(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=40, token_delay=0.03)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    with pytest.raises(httpx.ReadTimeout):
        await alice.post("/v1/completions", json={**BODY, "max_tokens": 40}, timeout=0.3)
    for _ in range(100):
        usage = (await alice.get("/v1/account/usage")).json()["data"]
        if usage:
            break
        await asyncio.sleep(0.05)
    assert usage[0]["status"] == "cut" and usage[0]["completion_tokens"] < 40, usage


async def test_a_key_reused_for_a_different_request_is_422(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "same"})).status_code == 200
    other = await alice.post("/v1/completions", json={**BODY, "prompt": "else"}, headers={"Idempotency-Key": "same"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_keys_belong_to_their_account(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice, bob = await herd.account("alice", 10_000), await herd.account("bob", 10_000)
    a = await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "shared"})
    b = await bob.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "shared"})
    assert a.json()["id"] != b.json()["id"] and len(node.received) == 2
    assert (await bob.get("/v1/account")).json()["spent"] == b.json()["usage"]["cost_credits"]


async def test_a_refunded_request_runs_again_on_retry(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(fail_status=500)))
    await herd.start(max_attempts=1)
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "r"})).status_code == 503
    node.script = Script(tokens=2)
    retry = await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "r"})
    assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers


async def test_a_settled_stream_is_replayed_as_a_stream(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=4)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}

    def events(text: str) -> list[dict[str, object]]:
        return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]

    first = events((await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "s"})).text)
    again_resp = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "s"})
    again = events(again_resp.text)
    assert again_resp.text.rstrip().endswith("data: [DONE]")
    text = "".join(c["choices"][0]["text"] for c in first if c["choices"])  # type: ignore[index]
    assert "".join(c["choices"][0]["text"] for c in again if c["choices"]) == text  # type: ignore[index]
    assert again[-1]["usage"] == first[-1]["usage"]
    assert len(node.received) == 1


async def test_a_malformed_key_is_400(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "x" * 300})
    assert resp.status_code == 400 and "Idempotency-Key" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", BODY),
        ("/v1/completions", {**BODY, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}),
        ("/v1/embeddings", {"input": "one two"}),
        ("/v1/responses", {"input": "one"}),
        ("/v1/responses", {"input": "one", "stream": True}),
    ],
    ids=["completion", "completion-stream", "chat", "chat-stream", "embeddings", "response", "response-stream"],
)
async def test_a_replayed_answer_carries_the_routers_overhead_on_the_replay(
    herd: Herd, path: str, body: dict[str, object]
) -> None:
    # Every paid answer says the router's own time, so that a client or dashboard reading it never finds it missing.
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    first = await alice.post(path, json=body, headers={"Idempotency-Key": "timed"})
    again = await alice.post(path, json=body, headers={"Idempotency-Key": "timed"})
    assert first.status_code == again.status_code == 200
    assert again.headers[REPLAYED_HEADER] == "true" and len(node.received) == 1
    assert float(again.headers[OVERHEAD_HEADER]) >= 0
    assert float(first.headers[OVERHEAD_HEADER]) >= 0


async def test_a_repeat_waiting_for_the_first_does_not_count_the_wait_as_overhead(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=3, gate=gate)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    first = asyncio.create_task(alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "k"}))
    while not node.received:
        await asyncio.sleep(0.01)
    asked = time.monotonic()
    second = asyncio.create_task(alice.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "k"}))
    await asyncio.sleep(0.3)  # the repeat waits for the first all this time
    gate.set()
    await first
    again = await second
    waited_ms = (time.monotonic() - asked) * 1000
    assert again.headers[REPLAYED_HEADER] == "true"
    # Its overhead is the router's own work on the repeat, not the time the first one took.
    assert float(again.headers[OVERHEAD_HEADER]) < waited_ms / 2
