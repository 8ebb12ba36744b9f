"""Strict where OpenAI is strict, exact where money is (issue 26, item 5): JSON types are JSON types, a bid is read
from its own digits, query parameters are ASCII digits, and an idempotent retry is known by its JSON's meaning."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

import httpx
import pytest

from llamakit.router.ledger import MAX_AMOUNT
from llamakit.router.paid.idempotency import canonical_json, fingerprint
from llamakit.wire.completions import ChatCompletionRequest, CompletionRequest, validate_request
from llamakit.wire.embeddings import parse_embedding_request
from llamakit.wire.errors import ApiError
from llamakit.wire.responses import parse_responses_request
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three"
CHAT = {"messages": [{"role": "user", "content": PROMPT}]}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("max_tokens", 10.5),
        ("max_completion_tokens", "10"),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", "1"),
        ("seed", "7"),
        ("stream", "true"),
        ("stream", 1),
        ("n", "1"),
        ("presence_penalty", False),
        ("logprobs", "true"),
        ("top_logprobs", "2"),
        ("bid", True),
        ("stream_options", {"include_usage": "true"}),
    ],
)
def test_a_string_or_boolean_where_a_number_goes_is_refused_on_both_sides(field: str, value: Any) -> None:
    # The node validates with the same models: what the router refuses, a node reached directly refuses too.
    body = {**CHAT, field: value}
    with pytest.raises(ApiError) as refused:
        validate_request(ChatCompletionRequest, body)
    assert refused.value.status == 400 and refused.value.param == field, refused.value.message


def test_numbers_stay_numbers_where_a_number_goes() -> None:
    req = validate_request(ChatCompletionRequest, {**CHAT, "temperature": 1, "top_p": 1, "max_tokens": 10})
    assert (req.temperature, req.top_p, req.max_tokens) == (1.0, 1.0, 10)
    with pytest.raises(ApiError):
        validate_request(CompletionRequest, {"prompt": PROMPT, "logprobs": "1"})
    for data, param in [
        ({"input": "x", "dimensions": "3"}, "dimensions"),
        ({"input": ["1", 2]}, "input"),
        ({"input": "x", "bid": False}, "bid"),
    ]:
        with pytest.raises(ApiError) as refused:
            parse_embedding_request(data)
        assert refused.value.param == param
    for data, param in [
        ({"input": "x", "max_output_tokens": "10"}, "max_output_tokens"),
        ({"input": "x", "stream": "false"}, "stream"),
        ({"input": "x", "temperature": "1"}, "temperature"),
    ]:
        with pytest.raises(ApiError) as refused:
            parse_responses_request(data)
        assert refused.value.param == param


async def test_the_router_answers_400_to_max_tokens_as_a_string_or_a_boolean(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    for value in ("10", True):
        for path, body in [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", CHAT)]:
            resp = await alice.post(path, json={**body, "max_tokens": value})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["param"] == "max_tokens"
    assert node.received == []
    assert (await alice.get("/v1/account")).json()["held"] == 0
    # A whole number is an integer however it is written, as JSON Schema's `integer` (and /openapi.json) says.
    raw = b'{"prompt": "one two three", "max_tokens": 2.0}'
    whole = await alice.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert whole.status_code == 200 and node.received[-1]["max_tokens"] == 2, whole.text
    half = await alice.post("/v1/completions", content=raw.replace(b"2.0", b"2.5"))
    assert half.status_code == 400 and half.json()["error"]["param"] == "max_tokens"


async def test_a_bid_is_read_from_its_own_digits_never_rounded_through_a_float(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 100_000)

    async def post(bid_text: str) -> httpx.Response:
        raw = '{"prompt": "one two three", "max_tokens": 2, "bid": ' + bid_text + "}"
        return await alice.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})

    # 21 decimal places: as a float it is 1.0 and passed as bid 1; read from its text it has one place too many.
    refused = await post("1.000000000000000000001")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_bid", "bid") and "20 decimal places" in error["message"]
    assert node.received == []
    # 20 places is a bid, held and charged exactly: a hair over 1, so every charge is one credit more than at 1.
    at_one = await post("1")
    exact = await post("1.00000000000000000001")
    assert at_one.status_code == exact.status_code == 200, exact.text
    assert exact.headers["X-Llamakit-Bid"] == "1.00000000000000000001"
    assert int(exact.headers["X-Llamakit-Cost-Credits"]) == int(at_one.headers["X-Llamakit-Cost-Credits"]) + 1
    # A bid a float holds as written is the number it says, as before.
    assert (await post("1.5")).headers["X-Llamakit-Bid"] == "1.5"
    assert (await post("15e-1")).headers["X-Llamakit-Bid"] == "1.5"


async def test_query_parameters_take_ascii_digits_only(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    assert herd.admin is not None
    for client, path, query in [
        (alice, "/v1/account/usage", "limit=١"),  # Arabic-Indic one: int() reads it as 1
        (alice, "/v1/account/usage", "limit=1_0"),
        (alice, "/v1/account/usage", "before=%EF%BC%91"),  # a fullwidth one
        (alice, "/v1/account/usage", "since=%D9%A1%D9%A7"),
        (alice, "/v1/events", "limit=١"),
        (alice, "/v1/events", "limit=+5"),
        (herd.admin, "/admin/usage", "limit=١"),
        (herd.admin, "/admin/stats/stream", "interval=١"),
    ]:
        resp = await client.get(f"{path}?{query}")
        assert resp.status_code == 400, (path, query, resp.text)
        assert resp.json()["error"]["param"] == query.split("=")[0]


async def test_events_limit_is_one_to_a_thousand_and_zero_is_refused(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    for kind in ("buy", "skip", "error"):
        assert (await alice.post("/v1/events", json={"kind": kind})).status_code == 201
    for limit in ("0", "1001", "99999999999999999999"):
        resp = await alice.get(f"/v1/events?limit={limit}")
        assert resp.status_code == 400 and "between 1 and 1000" in resp.json()["error"]["message"], resp.text
    assert [e["kind"] for e in (await alice.get("/v1/events?limit=2")).json()["data"]] == ["error", "skip"]
    assert len((await alice.get("/v1/events?limit=1000")).json()["data"]) == 3
    assert len((await alice.get("/v1/events")).json()["data"]) == 3  # no limit: the latest 100


def test_canonical_json_is_the_meaning_not_the_bytes() -> None:
    a = fingerprint("/v1/completions", b'{"prompt": "caf\\u00e9", "max_tokens": 2, "bid": 1.50}')
    b = fingerprint("/v1/completions", '{"bid":15e-1,"max_tokens":2,"prompt":"café"}'.encode())
    assert a.value == b.value and a.raw != b.raw
    same_body = b'{"prompt": "x"}'
    assert fingerprint("/v1/chat/completions", same_body).value != fingerprint("/v1/completions", same_body).value
    assert canonical_json({"n": 10**30}) != canonical_json({"n": 10**30 + 1})
    assert fingerprint("/p", b'{"a": [1, 2]}').value != fingerprint("/p", b'{"a": [2, 1]}').value


async def test_a_retry_with_the_same_json_written_again_is_the_same_request(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    headers = {"Idempotency-Key": "retry-1", "Content-Type": "application/json"}
    body = b'{"prompt": "one two", "max_tokens": 3, "bid": 1.50}'
    first = await alice.post("/v1/completions", content=body, headers=headers)
    again = await alice.post(
        "/v1/completions",
        content=b'{\n  "bid" : 15e-1,\n  "max_tokens" : 3,\n  "prompt" : "one tw\\u006f"\n}',
        headers=headers,
    )
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert len(node.received) == 1
    assert (await alice.get("/v1/account")).json()["spent"] == first.json()["usage"]["cost_credits"]
    # Another meaning under the same key is still refused.
    other = await alice.post("/v1/completions", content=b'{"prompt": "one two", "max_tokens": 2}', headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


async def test_an_answer_remembered_under_a_fingerprint_of_the_bytes_still_answers_its_retry(herd: Herd) -> None:
    # Answers remembered before canonical JSON were found by a hash of the route and the body's bytes.
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    raw = b'{"prompt": "one two", "max_tokens": 3}'
    headers = {"Idempotency-Key": "old-1", "Content-Type": "application/json"}
    first = await alice.post("/v1/completions", content=raw, headers=headers)
    assert first.status_code == 200
    legacy = hashlib.sha256(b"/v1/completions\0" + raw).hexdigest()
    with sqlite3.connect(herd.tmp / "ledger.db") as db:
        db.execute("UPDATE idempotency SET fingerprint = ? WHERE key = ?", (legacy, "old-1"))
    again = await alice.post("/v1/completions", content=raw, headers=headers)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true", again.text
    assert again.json() == first.json() and len(node.received) == 1
    other = await alice.post("/v1/completions", content=raw.replace(b"3", b"2"), headers=headers)
    assert other.status_code == 422
    assert json.loads(raw) == {"prompt": "one two", "max_tokens": 3}


async def test_a_before_past_the_largest_record_id_is_a_400_not_a_500(herd: Herd) -> None:
    # Found by the schemathesis run (make fuzz): ?before=9223372036854775807 passed the query's bound (2^63 - 1)
    # and the ledger refused it with a ValueError, a 500. The bound is now the ledger's own.
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    assert herd.admin is not None
    for client, path in [(alice, "/v1/account/usage"), (herd.admin, "/admin/usage")]:
        for before in (2**63 - 1, MAX_AMOUNT + 1):
            resp = await client.get(path, params={"limit": 962, "before": before})
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "before", resp.text
        assert (await client.get(path, params={"before": MAX_AMOUNT})).status_code == 200
