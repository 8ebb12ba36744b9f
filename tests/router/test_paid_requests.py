"""The router's money rules against scripted nodes: holds, exact settlement, refunds, 402, bids and the queue."""

from __future__ import annotations

import asyncio
import json
import math

import httpx

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"  # the fake node counts 4 + 3 = 7 prompt tokens


def cost(prompt: int, completion: int, bid: float = 1.0) -> int:
    return math.ceil(bid * (10 + 1 * prompt + 2 * completion))


async def test_a_request_is_settled_on_exact_usage(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={"model": "fake-model", "prompt": PROMPT, "max_tokens": 50})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "cost": 0.000027, "cost_credits": cost(7, 5),
        "prompt_tokens_details": {"cached_tokens": 0},  # the fake node reports none: no cache held any of it
        "cost_details": {"cache_discount": 0.0, "cache_discount_credits": 0},
    }  # fmt: skip
    assert resp.headers["X-Llamakit-Cost-Credits"] == str(cost(7, 5))
    assert resp.headers["X-Llamakit-Node"] == "n1"
    assert body["id"] == resp.headers["X-Llamakit-Request-Id"]
    account = (await alice.get("/v1/account")).json()
    assert account["balance"] == 10_000 - cost(7, 5) and account["held"] == 0 and account["spent"] == cost(7, 5)
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["request_id"], u["cost_credits"], u["node"], u["status"]) for u in usage] == [
        (body["id"], cost(7, 5), "n1", "ok")
    ]
    # The node was told the max_tokens that was paid for.
    assert herd.nodes["n1"].received[0]["max_tokens"] == 50
    assert "bid" not in herd.nodes["n1"].received[0]


async def test_the_bid_multiplies_the_price_and_rounds_up(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50, "bid": 1.3})
    assert resp.json()["usage"]["cost_credits"] == 36  # 1.3 × (10 + 7 + 10) = 35.1, rounded up
    resp = await alice.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 50}, headers={"X-Llamakit-Bid": "2"}
    )
    assert resp.json()["usage"]["cost_credits"] == 54
    assert (await alice.get("/v1/account")).json()["spent"] == 90


async def test_the_hold_covers_no_more_prompt_than_the_largest_context_leaves(herd: Herd) -> None:
    await herd.add_node(FakeNode("small", n_ctx=300))
    await herd.add_node(FakeNode("large", n_ctx=500))
    await herd.start()
    assert herd.admin is not None
    for _ in range(100):  # until the health checks have read both contexts
        if {n["name"]: n["n_ctx"] for n in (await herd.admin.get("/admin/nodes")).json()["data"]} == {
            "small": 300, "large": 500
        }:  # fmt: skip
            break
        await asyncio.sleep(0.05)
    poor = await herd.account("poor", 100)
    long_prompt = "word " * 2_000  # 10,000 bytes: far more than either context
    resp = await poor.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 20})
    assert resp.status_code == 402
    # ceil(1 × (10 + 1 × (500 - 20) + 2 × 20)): the prompt bound is the larger node's context less max_tokens.
    assert resp.json()["error"]["needed"] == 10 + (500 - 20) + 2 * 20
    resp = await poor.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 500})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "holds 500 tokens per request" in resp.json()["error"]["message"]


async def test_402_when_the_hold_is_not_covered_and_nothing_is_queued(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    poor = await herd.account("poor", 100)
    resp = await poor.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 500})
    assert resp.status_code == 402
    error = resp.json()["error"]
    held = 10 + (len(PROMPT) + 4) + 2 * 500  # a raw prompt: its bytes, a BOS and spare
    assert error["type"] == "insufficient_funds"
    assert error["needed"] == held and error["balance"] == 100
    assert str(held) in error["message"]
    assert node.received == []
    assert (await poor.get("/v1/account")).json() == {
        **(await poor.get("/v1/account")).json(),
        "balance": 100,
        "held": 0,
        "spent": 0,
    }


async def test_a_refused_request_is_refunded_in_full(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(fail_status=400)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    assert resp.status_code == 400
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000
    assert (await alice.get("/v1/account/usage")).json()["data"][0]["status"] == "rejected"


async def test_bids_below_one_and_nonsense_are_400(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    for bid in (0.99, -1, "abc", True, 1e9):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "bid": bid})
        assert resp.status_code == 400, (bid, resp.text)
        assert resp.json()["error"]["param"] == "bid"
    resp = await alice.post(
        "/v1/completions", content=b'{"prompt": "x", "bid": NaN}', headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert node.received == []
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000


async def test_max_tokens_above_the_routers_cap_is_400_before_anything_is_held(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    for path, body, field in (
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 10**9}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40_000}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9},
            "max_completion_tokens",
        ),
    ):
        resp = await alice.post(path, json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_value", field), error
        assert "the most this router allows is 32768" in error["message"]
    assert node.received == []
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000


async def test_a_check_across_fields_names_its_field_in_plain_words(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for body, param, says in (
        ({**chat, "top_logprobs": 3}, "top_logprobs", "invalid request: top_logprobs needs logprobs: true"),
        ({**chat, "tool_choice": "required"}, "tool_choice", "invalid request: tool_choice needs 'tools'"),
    ):
        error = (await alice.post("/v1/chat/completions", json=body)).json()["error"]
        assert error["param"] == param and error["message"].startswith(says), error
        assert "Value error" not in error["message"]


async def test_unknown_model_is_404_listing_the_models(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "model": "gpt-9"})
    assert resp.status_code == 404
    assert "fake-model" in resp.json()["error"]["message"]


async def test_missing_or_wrong_key_is_401(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    router = await herd.start()
    async with httpx.AsyncClient(base_url=router.url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer lk-nope"}, {"Authorization": "Bearer test-admin-key"}):
            resp = await anonymous.post("/v1/completions", json={"prompt": PROMPT}, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json()["error"]["type"] == "authentication_error"
        assert (await anonymous.get("/v1/info")).status_code == 200


async def test_highest_bid_first_fifo_among_equals(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start()
    alice = await herd.account("alice", 100_000)

    async def send(tag: str, bid: float) -> httpx.Response:
        return await alice.post("/v1/completions", json={"prompt": tag, "max_tokens": 1, "bid": bid})

    tasks = [asyncio.create_task(send("first", 1.0))]
    while not node.received:
        await asyncio.sleep(0.01)
    for tag, bid in [("low", 1.0), ("high", 3.0), ("mid-a", 2.0), ("mid-b", 2.0), ("top", 5.5)]:
        tasks.append(asyncio.create_task(send(tag, bid)))
        expected = len(tasks) - 1
        while (await alice.get("/v1/info")).json()["queue_length"] != expected:
            await asyncio.sleep(0.01)
    info = (await alice.get("/v1/info")).json()
    assert info["models"]["fake-model"]["queue_length"] == 5
    gate.set()
    responses = await asyncio.gather(*tasks)
    assert all(r.status_code == 200 for r in responses)
    assert [r["prompt"] for r in node.received] == ["first", "top", "high", "mid-a", "mid-b", "low"]
    assert node.max_active == 1, "a node never gets more requests than it has slots"
    assert (await alice.get("/v1/info")).json()["last_multiplier"] == 1.0


async def test_queue_full_is_429_and_queue_timeout_is_504_both_refunded(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start(max_queue=1, queue_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    busy = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}))
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "b", "max_tokens": 1}))
    await asyncio.sleep(0.1)
    full = await alice.post("/v1/completions", json={"prompt": "c", "max_tokens": 1})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert full.headers["Retry-After"]
    timed_out = await waiting
    assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "queue_timeout"
    gate.set()
    assert (await busy).status_code == 200
    account = (await alice.get("/v1/account")).json()
    assert account["spent"] == cost(4, 1) and account["balance"] == 100_000 - cost(4, 1)
    statuses = sorted(u["status"] for u in (await alice.get("/v1/account/usage")).json()["data"])
    assert statuses == ["ok", "queue_full", "queue_timeout"]


async def test_client_gone_while_queued_leaves_the_queue_with_a_refund(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    busy = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}))
    await asyncio.sleep(0.1)
    impatient = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "gone", "max_tokens": 1}))
    while (await alice.get("/v1/info")).json()["queue_length"] != 1:
        await asyncio.sleep(0.01)
    impatient.cancel()
    for _ in range(100):
        if (await alice.get("/v1/info")).json()["queue_length"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await alice.get("/v1/info")).json()["queue_length"] == 0
    gate.set()
    await busy
    assert [r["prompt"] for r in node.received] == ["a"]
    assert (await alice.get("/v1/account")).json()["spent"] == cost(4, 1)


async def test_failover_before_the_first_token(herd: Herd) -> None:
    await herd.add_node(FakeNode("bad", slots=4, script=Script(fail_status=500)))
    await herd.add_node(FakeNode("good", slots=1, script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    for stream in (False, True):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": stream})
        assert resp.status_code == 200
        assert resp.headers["X-Llamakit-Node"] == "good"
    assert (await alice.get("/v1/account")).json()["spent"] == 2 * cost(7, 3)


async def test_no_node_for_the_model_is_503_with_a_refund(herd: Herd) -> None:
    await herd.add_node(FakeNode("bad", script=Script(fail_status=500)))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 100_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 503
    assert (await alice.get("/v1/account")).json()["balance"] == 100_000


def sse_events(raw: str) -> list[dict[str, object]]:
    lines = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_stream_passes_tokens_through_and_settles_on_usage(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=6)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    resp = await alice.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(resp.text)
    tokens = [e for e in events if e["choices"] and e["choices"][0]["text"]]  # type: ignore[index]
    assert len(tokens) == 6
    assert all("llamakit" not in e for e in events)
    assert events[-1]["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13, "cost": cost(7, 6) / 10**6,
        "cost_credits": cost(7, 6), "prompt_tokens_details": {"cached_tokens": 0},
        "cost_details": {"cache_discount": 0.0, "cache_discount_credits": 0},
    }  # fmt: skip
    without = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "stream": True})
    assert all(not e.get("usage") for e in sse_events(without.text))
    assert (await alice.get("/v1/account")).json()["spent"] == 2 * cost(7, 6)


async def test_a_cut_stream_is_charged_for_what_was_delivered(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=100, token_delay=0.02)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    received = 0
    async with alice.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 100, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                received += 1
                if received == 5:
                    break
    for _ in range(100):
        usage = (await alice.get("/v1/account/usage")).json()["data"]
        if usage:
            break
        await asyncio.sleep(0.05)
    assert usage[0]["status"] == "cut"
    delivered = usage[0]["completion_tokens"]
    assert 5 <= delivered < 20, delivered
    assert usage[0]["cost_credits"] == cost(7, delivered)
    for _ in range(100):
        if node.cancelled:
            break
        await asyncio.sleep(0.05)
    assert node.cancelled == 1, "the node's generation was stopped"


async def test_a_request_given_the_slot_of_a_cut_stream_waits_for_the_node_to_free_it(herd: Herd) -> None:
    # The router frees a cut stream's slot at once; the node, a token later. The request waiting for that slot
    # (another tenant's) is told "slots_busy" meanwhile: it must be served, not failed over and refused 503.
    node = await herd.add_node(
        FakeNode("n1", slots=1, script=Script(tokens=40, token_delay=0.02, busy_when_full=True, frees_late=0.15))
    )
    await herd.start(max_attempts=1)
    alice = await herd.account("alice", 100_000)
    bob = await herd.account("bob", 100_000)
    async with alice.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 40, "stream": True}) as r:
        waiting = None
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if waiting is None:  # queued behind the stream, for the node's one slot
                    waiting = asyncio.create_task(bob.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}))
                    await asyncio.sleep(0.1)
                else:
                    break
    assert waiting is not None
    served = await waiting
    assert served.status_code == 200, served.text
    assert node.busy_refusals >= 1, "the node was asked before it had freed the slot"
    assert node.max_active == 1
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0


async def test_a_node_dying_mid_stream_ends_it_with_an_error_and_charges_what_was_delivered(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=10, die_after=4)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "stream": True})
    events = sse_events(resp.text)
    assert events[-1]["error"]["code"] == "node_failed"  # type: ignore[index]
    assert len([e for e in events if e.get("choices")]) == 4
    usage = (await alice.get("/v1/account/usage")).json()["data"][0]
    assert usage["status"] == "broken" and usage["completion_tokens"] == 4 and usage["cost_credits"] == cost(7, 4)


async def test_concurrent_requests_on_one_account_never_overdraw(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=2, token_delay=0.001)))
    await herd.start()
    hold = 10 + (1 + 4) + 2 * 20  # what one request holds
    alice = await herd.account("alice", hold * 10 + 5)
    results = await asyncio.gather(
        *(alice.post("/v1/completions", json={"prompt": "x", "max_tokens": 20}) for _ in range(60))
    )
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 402} and codes.count(200) >= 10
    spent = sum(r.json()["usage"]["cost_credits"] for r in results if r.status_code == 200)
    account = (await alice.get("/v1/account")).json()
    assert account["spent"] == spent and account["balance"] == hold * 10 + 5 - spent >= 0
