"""Inputs from the field against a real node: no request body may crash it, and what it must do instead."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node.grammar_check import GrammarCheck
from tests.node.test_inference import sse_events

pytestmark = pytest.mark.model

DEEP_GRAMMAR = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000
DEEP_SCHEMA: dict[str, Any] = {"type": "string"}
for _ in range(40):
    DEEP_SCHEMA = {"type": "array", "items": DEEP_SCHEMA}
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


async def still_serving(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text


async def test_a_grammar_nested_too_deep_for_llama_cpp_is_a_400_and_the_node_serves_on(
    client: httpx.AsyncClient,
) -> None:
    body = {"messages": [{"role": "user", "content": "Say a"}], "max_tokens": 2, "grammar": DEEP_GRAMMAR}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_grammar" and error["param"] == "grammar"
    assert "nests groups more than 64 deep" in error["message"]
    await still_serving(client)


def test_a_grammar_that_crashes_llama_cpps_compiler_only_crashes_the_helper() -> None:
    """What the size and depth bounds might miss: llama.cpp compiles every grammar in a helper process first."""
    check = GrammarCheck(resolve_model(DEFAULT_MODEL).path)
    try:
        assert check.error("root ::= [1-5]") is None
        assert "crashed" in (check.error(DEEP_GRAMMAR) or ""), "this grammar overflows the compiler's stack"
        assert check.restarts == 1
        assert check.error('root ::= "yes" | "no"') is None, "a new helper took over"
        assert "root" in (check.error('foo ::= "a"') or "")
        assert "left recursion" in (check.error('root ::= root "a" | "b"') or "")
    finally:
        check.close()


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"grammar": "root ::= " + '"a" ' * 20_000}, "grammar", "at most 65536"),
        ({"grammar": "root ::= ("}, "grammar", "GBNF syntax"),
        ({"grammar": 'root ::= "\ud800"'}, "grammar", "lone surrogate"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/b"}}}},
            "response_format",
            "cannot be turned into a grammar: Error resolving ref",
        ),
        ({"stop": ["x" * 257]}, "stop", "at most 256 characters"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "between -100 and 100"),
        ({"seed": 2**64}, "seed", "less than or equal"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": DEEP_SCHEMA}}}, "response_format", "32"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "array", "minItems": 10**9}},
                }
            },
            "response_format",
            "minItems",
        ),
    ],
)
async def test_what_reaches_llama_cpp_is_bounded(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, says: str
) -> None:
    payload = json.dumps({"prompt": "Hi", "max_tokens": 2, **body})  # ASCII-escaped: lone surrogates survive
    resp = await client.post("/v1/completions", content=payload, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and says in error["message"], error
    await still_serving(client)


GBNF_PIECES = [
    "root", " ::= ", "(", ")", "*", "+", "?", "|", '"a"', '""', "[a-z]", "[^", "]", "{2,3}", "{0,}", "x", "\n", " ",
    "a ::= ", "a", "<[12]>", "#", "\\",
]  # fmt: skip


async def test_random_grammars_and_stops_never_crash_the_node(client: httpx.AsyncClient) -> None:
    rng = random.Random(12)
    for _ in range(120):
        grammar = "root ::= " + "".join(rng.choice(GBNF_PIECES) for _ in range(rng.randrange(1, 25)))
        stop = ["".join(rng.choice(".!? \n<>|") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(4))]
        body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "grammar": grammar, "stop": stop}
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code in (200, 400), resp.text
        if resp.status_code == 400:
            assert resp.json()["error"]["code"] == "invalid_grammar", resp.text
    await still_serving(client)


async def test_text_held_back_for_a_stop_string_is_delivered_when_generation_ends_otherwise(
    client: httpx.AsyncClient,
) -> None:
    body: dict[str, Any] = {"messages": FRANCE, "temperature": 0, "max_tokens": 40}
    plain = (await client.post("/v1/chat/completions", json=body)).json()
    stopped = (await client.post("/v1/chat/completions", json={**body, "stop": [".#@!"]})).json()
    text = plain["choices"][0]["message"]["content"]
    assert text.endswith("."), "the answer ends in a full stop, which may be the start of the stop string"
    assert stopped["choices"][0]["message"]["content"] == text
    assert stopped["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    streamed = await client.post(
        "/v1/chat/completions",
        json={**body, "stop": [".#@!"], "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = sse_events(streamed.text)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]  # type: ignore[index,union-attr]
    assert "".join(pieces) == text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_null_means_the_default_for_every_nullable_field(client: httpx.AsyncClient, path: str) -> None:
    nulls = {
        "temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None, "user": None,
        "stream_options": None, "response_format": None, "max_completion_tokens": None, "presence_penalty": None,
        "frequency_penalty": None, "logit_bias": None, "logprobs": None, "grammar": None, "model": None,
    }  # fmt: skip
    prompt: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "Say hi", "name": None}]} if "chat" in path else {"prompt": "Hi"}
    )
    resp = await client.post(path, json={**prompt, "max_tokens": 3, **nulls})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json"), "stream: null is not a stream"
    assert resp.json()["usage"]["completion_tokens"] <= 3


async def test_a_long_whole_answer_keeps_its_caller_informed(client: httpx.AsyncClient) -> None:
    """With a keepalive of 50 ms, a 1-second answer starts with whitespace: the JSON is valid all the same."""
    resp = await client.post(
        "/v1/completions",
        json={"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 60, "temperature": 0},
        headers={"X-Llamakit-Keepalive": "0.05"},
    )
    assert resp.status_code == 200
    assert resp.content[:1] == b" ", "whitespace came before the answer"
    body = json.loads(resp.content)
    assert body["usage"]["completion_tokens"] == 60


async def test_a_cancelled_whole_request_answers_with_what_was_made(client: httpx.AsyncClient) -> None:
    rid = "cmpl-cancel-me"
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 300, "temperature": 0}
    running = asyncio.create_task(client.post("/v1/completions", json=body, headers={"X-Llamakit-Request-Id": rid}))
    for _ in range(200):
        await asyncio.sleep(0.05)
        cancel = await client.post(f"/admin/cancel/{rid}")
        if cancel.status_code == 200:
            break
    assert cancel.status_code == 200, cancel.text
    resp = await running
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    assert 0 < usage["completion_tokens"] < 300
    assert (await client.post(f"/admin/cancel/{rid}")).status_code == 404
    assert (await client.get("/health")).json()["busy"] == 0
