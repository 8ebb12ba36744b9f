"""`POST /v1/responses` through the router against scripted nodes: served as a chat completion, so priced, held,
queued and settled like one; answered in the Responses shape, whole and streamed; bad fields refused unheld."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from openai import AsyncOpenAI

from llamakit.wire.completions import ChatCompletionRequest
from tests.router.test_responses_translation import assert_items_one_after_another
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

HAS_CHAT_TOOLS = "tools" in ChatCompletionRequest.model_fields


def cost(prompt: int, completion: int, bid: float = 1.0) -> int:
    return math.ceil(bid * (10 + 1 * prompt + 2 * completion))


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


async def test_a_response_is_a_chat_completion_settled_on_exact_usage(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=4)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post(
        "/v1/responses",
        json={"model": "fake-model", "input": "one two three", "instructions": "be brief", "max_output_tokens": 9},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    # The fake node counts the words of all messages + 3: "be brief one two three" → 8.
    assert body["usage"] == {
        "input_tokens": 8,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
        "cost": cost(8, 4) / 10**6,
        "cost_credits": cost(8, 4),
        "cost_details": {"cache_discount": 0.0, "cache_discount_credits": 0},
    }
    assert body["object"] == "response" and body["id"] == "resp_" + resp.headers["X-Llamakit-Request-Id"][4:]
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = body["output"]
    assert message["type"] == "message" and message["content"][0] == {
        "type": "output_text",
        "text": " tok" * 4,
        "annotations": [],
        "logprobs": [],
    }
    assert body["store"] is False and body["instructions"] == "be brief" and body["max_output_tokens"] == 9
    assert resp.headers["X-Llamakit-Cost-Credits"] == str(cost(8, 4))
    assert node.received == [
        {
            "model": "fake-model",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
            "max_tokens": 9,
        }
    ]
    account = (await alice.get("/v1/account")).json()
    assert account["spent"] == cost(8, 4) and account["held"] == 0
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["prompt_tokens"], u["completion_tokens"], u["status"]) for u in usage] == [(8, 4, "ok")]


async def test_input_items_become_chat_messages_and_the_bid_applies(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    parts = [{"type": "input_text", "text": "hi "}, {"type": "input_text", "text": "there"}]
    answer = [{"type": "output_text", "text": "hello", "annotations": []}]
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": parts},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": answer},
        {"role": "user", "content": "again"},
    ]
    resp = await alice.post(
        "/v1/responses",
        json={"input": items, "bid": 2, "temperature": 0, "top_p": 0.5, "text": {"format": {"type": "json_object"}}},
    )
    assert resp.status_code == 200, resp.text
    sent = node.received[0]
    assert sent["messages"] == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert sent["temperature"] == 0 and sent["top_p"] == 0.5 and sent["response_format"] == {"type": "json_object"}
    assert "bid" not in sent
    usage = resp.json()["usage"]
    assert usage["cost_credits"] == cost(usage["input_tokens"], 2, bid=2)


async def test_a_json_schema_text_format_becomes_a_response_format(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    schema = {"type": "object", "properties": {"grade": {"type": "integer"}}, "required": ["grade"]}
    text = {"format": {"type": "json_schema", "name": "grade", "schema": schema, "strict": True}}
    resp = await alice.post("/v1/responses", json={"input": "rate it", "text": text})
    assert resp.status_code == 200, resp.text
    assert node.received[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "grade", "schema": schema, "strict": True},
    }
    assert resp.json()["text"] == text


async def test_a_streamed_response_is_the_responses_event_sequence(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/responses", json={"input": "one two", "stream": True, "max_output_tokens": 3})
    assert resp.status_code == 200, resp.text
    # UTF-8 said outright: a client that reads text/* without a charset as Latin-1 (requests) gets the emoji right
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = events_of(resp.text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # the fake node stops at max_tokens: finish_reason "length"
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    assert "[DONE]" not in resp.text
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == " tok" * 3
    assert final["usage"]["output_tokens"] == 3 and final["usage"]["cost_credits"] == cost(2 + 3, 3)
    assert node.received[0]["stream"] is True and node.received[0]["stream_options"] == {"include_usage": True}
    assert (await alice.get("/v1/account")).json()["spent"] == cost(5, 3)


@pytest.mark.skipif(not HAS_CHAT_TOOLS, reason="chat completions have no tool calling in this build")
async def test_streamed_function_calls_end_one_before_the_next_begins(herd: Herd) -> None:
    calls = [("get_weather", '{"city":"Paris"}'), ("get_weather", '{"city":"Oslo"}'), ("get_time", '{"tz":"CET"}')]
    await herd.add_node(FakeNode("n1", script=Script(calls=calls)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    client = AsyncOpenAI(
        base_url=f"{herd.router.url}/v1", api_key=alice.headers["Authorization"].removeprefix("Bearer "), max_retries=0
    )
    tools: list[Any] = [
        {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}, "strict": False}
        for name in ("get_weather", "get_time")
    ]
    async with client.responses.stream(
        model="fake-model", input="weather and time?", tools=tools, tool_choice="required"
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert_items_one_after_another(events)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected = [("function_call", *call) for call in calls]
    for items in ([e.item for e in events if e.type == "response.output_item.done"], final.output):
        assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in items] == expected
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens == 9


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "hi", "store": True}, "store", "does not keep responses"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "does not keep"),
        ({"input": "hi", "frobnicate": 1}, "frobnicate", "not supported"),
        ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
        ({"input": "hi", "include": ["reasoning.encrypted_content"]}, "include", "message.output_text.logprobs"),
        ({"input": "hi", "include": "message.output_text.logprobs"}, "include", "list"),
        ({"input": "hi", "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"input": "hi", "background": True}, "background", "background"),
        ({"input": "hi", "truncation": "auto"}, "truncation", "disabled"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools", ""),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "input_image"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input", "role"),
        ({"input": []}, "input", "empty"),
        ({"model": "fake-model"}, "input", "required"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "greater than 0"),
        ({"input": "hi", "max_output_tokens": 10**9}, "max_output_tokens", "the most this router allows"),
        ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text", "schema"),
        ({"input": "hi", "bid": 0.5}, "bid", "from 1"),
        ({"input": "hi", "model": "gpt-4o"}, "model", "fake-model"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_held(
    herd: Herd, body: dict[str, object], param: str, words: str
) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/responses", json=body)
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    if param == "max_output_tokens" and "router" in words:
        assert error["code"] == "invalid_value", error
    assert node.received == []
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000
    # Refused before anything was held: a usage record with no tokens and no cost, as chat completions get.
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["cost_credits"], u["prompt_tokens"], u["http_status"]) for u in usage] == [(0, 0, resp.status_code)]


@pytest.mark.skipif(HAS_CHAT_TOOLS, reason="chat completions have tool calling: tools are translated, not refused")
async def test_function_tools_are_refused_while_chat_has_no_tool_calling(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    tool = {"type": "function", "name": "grade", "parameters": {"type": "object", "properties": {}}}
    for body in (
        {"input": "hi", "tools": [tool]},
        {"input": [{"type": "function_call_output", "call_id": "c1", "output": "4"}]},
    ):
        resp = await alice.post("/v1/responses", json=body)
        assert resp.status_code == 400 and "tool calling" in resp.json()["error"]["message"]
    assert node.received == []


@pytest.mark.skipif(not HAS_CHAT_TOOLS, reason="chat completions have no tool calling in this build")
async def test_function_tools_and_items_are_sent_as_chat_tools(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    tool = {"type": "function", "name": "grade", "parameters": {"type": "object", "properties": {}}}
    items = [
        {"role": "user", "content": "grade it"},
        {"type": "function_call", "call_id": "c1", "name": "grade", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
    ]
    resp = await alice.post(
        "/v1/responses", json={"input": items, "tools": [tool], "tool_choice": {"type": "function", "name": "grade"}}
    )
    assert resp.status_code == 200, resp.text
    sent = node.received[0]
    assert sent["tools"] == [{"type": "function", "function": {"name": "grade", "parameters": tool["parameters"]}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "grade"}}
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "grade", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]


async def test_a_failing_node_is_refunded_in_full(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(fail_status=500)))
    await herd.start(max_attempts=2)
    alice = await herd.account("alice", 10_000)
    for stream in (False, True):
        resp = await alice.post("/v1/responses", json={"input": "one two", "stream": stream})
        assert resp.status_code == 503, resp.text
    account = (await alice.get("/v1/account")).json()
    assert account["balance"] == 10_000 and account["spent"] == 0


async def test_a_stream_broken_after_tokens_ends_failed_and_is_charged_for_what_was_delivered(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5, die_after=2)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/responses", json={"input": "one two", "stream": True})
    events = events_of(resp.text)
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"]["code"] == "node_failed"
    assert (await alice.get("/v1/account")).json()["spent"] == cost(5, 2)


async def test_a_repeat_with_the_same_idempotency_key_gets_the_same_response_charged_once(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    headers = {"Idempotency-Key": "respond-once"}
    one = await alice.post("/v1/responses", json={"input": "one"}, headers=headers)
    two = await alice.post("/v1/responses", json={"input": "one"}, headers=headers)
    assert two.headers["Idempotent-Replayed"] == "true"
    strip = {"created_at", "completed_at"}
    assert {k: v for k, v in one.json().items() if k not in strip} == {
        k: v for k, v in two.json().items() if k not in strip
    }
    streamed = await alice.post(
        "/v1/responses", json={"input": "two", "stream": True}, headers={"Idempotency-Key": "s"}
    )
    again = await alice.post("/v1/responses", json={"input": "two", "stream": True}, headers={"Idempotency-Key": "s"})
    assert again.headers["Idempotent-Replayed"] == "true"
    first, second = events_of(streamed.text), events_of(again.text)
    assert first[-1][1]["response"]["output"] == second[-1][1]["response"]["output"]
    assert len(node.received) == 2


async def test_a_response_cannot_be_retrieved_later(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.get("/v1/responses/resp_123")
    assert resp.status_code == 404
    assert "does not keep responses" in resp.json()["error"]["message"]
