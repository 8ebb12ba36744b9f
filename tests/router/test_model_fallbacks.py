"""Model fallbacks, as OpenRouter's `models: [...]`: a request goes to its next model when one has no node, is
draining everywhere, has its queue full, or its node fails before the first token; it is held at its dearest
model's worst case and charged at the fees of the model that served it, at its bid; a key's allowed models apply
to every one; the answer and the usage record say which models were passed over and why."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from llamakit.money.fees import FeeSchedule, hold_amount, raw_prompt_token_bound
from tests.router.test_key_limits import key_client
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

BIG = {"base_fee": 100, "prompt_token_fee": 5, "completion_token_fee": 10}
PROMPT = "one two three four"  # 7 prompt tokens at the fake node
ASK = {"prompt": PROMPT, "max_tokens": 5}
SMALL_CHARGE = 10 + 1 * 7 + 2 * 5  # the herd fixture's fees: 27
WORST_BIG = hold_amount(FeeSchedule.from_dict(BIG), 1, raw_prompt_token_bound(PROMPT), 5)  # 260
WORST_SMALL = hold_amount(FeeSchedule(10, 1, 2), 1, raw_prompt_token_bound(PROMPT), 5)  # 42


async def two_models(herd: Herd, big: Script | None = None, *, slots: int = 1, **settings: Any) -> None:
    """Node b1 serves `big` (dear), s1 `small` (the default fees); `ghost` has BIG's fees and no node."""
    await herd.add_node(FakeNode("b1", model="big", slots=slots, script=big or Script(tokens=5)))
    await herd.add_node(FakeNode("s1", model="small", script=Script(tokens=5)))
    await herd.start(**settings)
    assert herd.admin is not None
    for model in ("big", "ghost", "ghost2"):
        resp = await herd.admin.put(f"/admin/fees/{model}", params={"unserved": "true"}, json=BIG)
        assert resp.status_code == 200, resp.text


async def record(client: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    records = (await client.get("/v1/account/usage")).json()["data"]
    [found] = [r for r in records if r["request_id"] == request_id]
    return found


def reasons(passed: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(p["model"], p["reason"]) for p in passed]


def sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_model_without_a_node_is_passed_over_and_the_next_serves_at_its_own_fees(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "small"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("ghost", "no_node")]
    assert "no node is available for model 'ghost'" in body["passed_over"][0]["message"]
    assert resp.headers["X-Llamakit-Passed-Over"] == "ghost=no_node"
    assert body["usage"]["cost_credits"] == SMALL_CHARGE == int(resp.headers["X-Llamakit-Cost-Credits"])
    usage = await record(alice, body["id"])
    # held at the dearest model's worst case, charged at the fees of the one that served
    assert (usage["model"], usage["held"], usage["cost_credits"], usage["status"]) == (
        "small", WORST_BIG, SMALL_CHARGE, "ok",
    )  # fmt: skip
    assert reasons(usage["passed_over"]) == [("ghost", "no_node")]
    assert (await alice.get("/v1/account")).json()["spent"] == SMALL_CHARGE
    assert herd.nodes["s1"].received[-1]["model"] == "small" and "models" not in herd.nodes["s1"].received[-1]


async def test_a_model_draining_everywhere_is_passed_over(herd: Herd) -> None:
    await two_models(herd)
    assert herd.admin is not None
    assert (await herd.admin.post("/admin/nodes/b1/drain")).status_code == 200
    alice = await herd.account("alice", 10_000)
    body = (await alice.post("/v1/completions", json={**ASK, "models": ["big", "small"]})).json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("big", "no_node")]
    assert herd.nodes["b1"].received == []


async def test_a_model_whose_queue_is_full_is_passed_over(herd: Herd) -> None:
    gate = asyncio.Event()
    await two_models(herd, Script(tokens=5, gate=gate), max_queue=0)
    alice = await herd.account("alice", 10_000)
    busy = asyncio.ensure_future(alice.post("/v1/completions", json={**ASK, "model": "big"}))
    while not herd.nodes["b1"].active:  # the big node's one slot is taken, and its queue holds none
        await asyncio.sleep(0.01)
    try:
        body = (await alice.post("/v1/completions", json={**ASK, "models": ["big", "small"]})).json()
        assert body["model"] == "small" and reasons(body["passed_over"]) == [("big", "queue_full")]
    finally:
        gate.set()
    assert (await busy).json()["model"] == "big"


async def test_a_model_whose_node_fails_before_the_first_token_is_passed_over(herd: Herd) -> None:
    await two_models(herd, Script(fail_status=500))
    alice = await herd.account("alice", 10_000)
    whole = await alice.post("/v1/completions", json={**ASK, "models": ["big", "small"]})
    assert whole.json()["model"] == "small" and reasons(whole.json()["passed_over"]) == [("big", "no_node")]
    streamed = await alice.post(
        "/v1/completions",
        json={**ASK, "models": ["big", "small"], "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.status_code == 200 and streamed.headers["X-Llamakit-Passed-Over"] == "big=no_node"
    events = sse(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == " tok" * 5
    assert events[-1]["usage"]["cost_credits"] == SMALL_CHARGE and reasons(events[-1]["passed_over"]) == [
        ("big", "no_node")
    ]
    assert len(herd.nodes["b1"].received) == 2  # tried once each time, then passed over
    assert (await record(alice, streamed.headers["X-Llamakit-Request-Id"]))["model"] == "small"
    assert (await alice.get("/v1/account")).json()["spent"] == 2 * SMALL_CHARGE


async def test_the_hold_covers_the_dearest_model_whichever_comes_first(herd: Herd) -> None:
    await two_models(herd)
    short = await herd.account("short", WORST_BIG - 1)
    refused = await short.post("/v1/completions", json={**ASK, "models": ["small", "big"]})
    assert refused.status_code == 402 and refused.json()["error"]["needed"] == WORST_BIG
    enough = await herd.account("enough", WORST_BIG)
    served = (await enough.post("/v1/completions", json={**ASK, "models": ["small", "big"]})).json()
    assert served["model"] == "small" and served["passed_over"] == [] and served["usage"]["cost_credits"] == 27
    assert (await record(enough, served["id"]))["held"] == WORST_BIG


async def test_a_bid_applies_to_the_model_that_serves(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "small"], "bid": 2})
    assert resp.json()["usage"]["cost_credits"] == 2 * SMALL_CHARGE and resp.headers["X-Llamakit-Bid"] == "2"
    assert (await record(alice, resp.json()["id"]))["held"] == 2 * WORST_BIG


async def test_a_keys_allowed_models_apply_to_every_model_named(herd: Herd) -> None:
    await two_models(herd)
    small_only = await key_client(herd, "alice", {"models": ["small"]})
    body = (await small_only.post("/v1/completions", json={**ASK, "models": ["big", "small"]})).json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("big", "model_not_allowed")]
    assert herd.nodes["b1"].received == []
    assert (await record(small_only, body["id"]))["held"] == WORST_SMALL  # the big model is no candidate
    refused = await small_only.post("/v1/completions", json={**ASK, "models": ["big", "ghost"]})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    assert reasons(refused.json()["error"]["passed_over"]) == [("big", "model_not_allowed")]
    assert refused.headers["X-Llamakit-Passed-Over"] == "big=model_not_allowed"
    assert herd.nodes["b1"].received == []


async def test_an_unknown_model_is_passed_over_and_all_unknown_is_404(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    body = (await alice.post("/v1/completions", json={**ASK, "models": ["nope", "small"]})).json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("nope", "model_not_found")]
    missing = await alice.post("/v1/completions", json={**ASK, "models": ["nope", "nada"]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    message = missing.json()["error"]["message"]
    assert "'nada' does not exist" in message and "the other models were passed over: nope (model_not_found)" in message
    refusal = await record(alice, missing.headers["X-Llamakit-Request-Id"])
    assert (refusal["model"], refusal["status"], refusal["http_status"]) == ("nope", "model_not_found", 404)


async def test_when_every_model_is_passed_over_the_last_ones_error_is_the_answer(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "ghost2"]})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_node"
    error = resp.json()["error"]
    assert "'ghost2'" in error["message"] and "the other models were passed over: ghost (no_node)" in error["message"]
    assert reasons(error["passed_over"]) == [("ghost", "no_node")]
    assert resp.headers["X-Llamakit-Passed-Over"] == "ghost=no_node"
    usage = await record(alice, resp.headers["X-Llamakit-Request-Id"])
    assert (usage["model"], usage["status"], usage["cost_credits"], usage["http_status"]) == (
        "ghost2", "no_node", 0, 503,
    )  # fmt: skip
    assert reasons(usage["passed_over"]) == [("ghost", "no_node")]
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000


async def test_model_comes_first_and_each_model_is_tried_once(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5}
    body = (await alice.post("/v1/chat/completions", json={**chat, "model": "ghost", "models": ["small"]})).json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("ghost", "no_node")]
    once = (await alice.post("/v1/chat/completions", json={**chat, "model": "small", "models": ["small"]})).json()
    assert once["model"] == "small" and once["passed_over"] == []
    plain = (await alice.post("/v1/chat/completions", json={**chat, "model": "small"})).json()
    assert "passed_over" not in plain  # a request without `models` is answered as before


async def test_models_is_validated(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    for bad, said in (([], "at least 1"), (["a", "b", "c", "d", "e"], "at most 4"), ([1], "valid string"),
                      ("small", "valid list"), ([" "], "non-empty name")):  # fmt: skip
        resp = await alice.post("/v1/completions", json={**ASK, "models": bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "models", resp.text
        assert said in resp.json()["error"]["message"], resp.text


async def test_a_response_names_the_model_that_served_it(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    ask = {"models": ["ghost", "small"], "input": PROMPT, "max_output_tokens": 5}
    body = (await alice.post("/v1/responses", json=ask)).json()
    assert body["model"] == "small" and reasons(body["passed_over"]) == [("ghost", "no_node")]
    streamed = await alice.post("/v1/responses", json={**ask, "stream": True})
    events = sse(streamed.text)
    assert streamed.headers["X-Llamakit-Passed-Over"] == "ghost=no_node"
    assert {e["response"]["model"] for e in events if "response" in e} == {"small"}


async def test_a_replay_keeps_what_was_passed_over(herd: Herd) -> None:
    await two_models(herd)
    alice = await herd.account("alice", 10_000)
    key = {"Idempotency-Key": "fallback-1"}
    first = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "small"]}, headers=key)
    again = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "small"]}, headers=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["passed_over"] == first.json()["passed_over"] and again.json()["model"] == "small"
    assert again.headers["X-Llamakit-Passed-Over"] == "ghost=no_node"
    assert (await alice.get("/v1/account")).json()["spent"] == SMALL_CHARGE
