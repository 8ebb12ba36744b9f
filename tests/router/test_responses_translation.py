"""The Responses ↔ chat translation on its own: input items to chat messages, chat answers (with tool calls in
OpenAI's chat shape) to Response objects and events, checked against the `openai` client's own types and its
stream accumulator (served from a mock transport, no network)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from llamakit.wire.errors import ApiError
from llamakit.wire.responses import (
    ResponseEvents,
    ResponsesRequest,
    chat_body,
    chat_messages,
    parse_responses_request,
    response_from_chat,
)

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
USAGE = {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27, "cost": 0.000044, "cost_credits": 44}


def request(**fields: Any) -> ResponsesRequest:
    """A request as validated, without the check that chat completions can call tools (done at parse time)."""
    return ResponsesRequest.model_validate({"input": "hi", **fields})


def tool_answer() -> dict[str, Any]:
    """A whole chat answer with two tool calls, in OpenAI's chat shape."""
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
    ]
    return {
        "id": "req-abc",
        "object": "chat.completion",
        "model": "smollm2-135m-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE,
    }


def tool_chunks() -> list[dict[str, Any]]:
    """The same answer streamed as OpenAI streams tool calls: `delta.tool_calls` pieces with an `index`."""

    def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return {"id": "req-abc", "object": "chat.completion.chunk", "choices": choices, "usage": None}

    head = {"type": "function", "function": {"name": "get_weather", "arguments": ""}}
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", **head}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", **head}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city":"Oslo"}'}}]}),
        chunk({}, "tool_calls"),
        {**chunk(None), "usage": USAGE},
    ]


def test_items_become_chat_messages_with_tool_calls_and_tool_results() -> None:
    req = request(
        instructions="Answer with tools.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Oslo?"}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": "{}", "status": "done"},
            {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "snow"}]},
        ],
    )  # fmt: skip
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert chat_messages(req) == [
        {"role": "system", "content": "Answer with tools."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_a", **call}, {"id": "call_b", **call}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "snow"},
    ]


def test_a_call_after_assistant_text_joins_that_message() -> None:
    req = request(
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]
    )
    assert chat_messages(req)[-1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


def test_tools_and_tool_choice_become_chat_tools() -> None:
    body = chat_body(
        request(tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False),
        stream=False,
    )
    assert body["tools"] == [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert chat_body(request(tools=[TOOL], tool_choice="required"), stream=False)["tool_choice"] == "required"
    assert "tool_choice" not in chat_body(request(tool_choice="auto"), stream=False)
    with pytest.raises(ApiError, match="tool_choice"):
        chat_body(request(tools=[TOOL], tool_choice={"type": "web_search_preview"}), stream=False)
    with pytest.raises(ApiError, match="needs 'tools'"):
        parse_responses_request({"input": "hi", "tool_choice": "required"})


def test_hosted_tools_are_refused_by_name() -> None:
    with pytest.raises(ApiError) as caught:
        parse_responses_request({"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["x"]}]})
    assert caught.value.status == 400 and caught.value.param == "tools"


def test_a_chat_answer_with_tool_calls_is_a_response_with_function_calls() -> None:
    body = response_from_chat(request(tools=[TOOL]), tool_answer(), response_id="resp_abc")
    response = Response.model_validate(body)  # OpenAI's own type, validated, not just constructed
    assert response.status == "completed" and response.output_text == ""
    calls = [(o.type, getattr(o, "call_id", None), getattr(o, "arguments", None)) for o in response.output]
    assert calls == [
        ("function_call", "call_a", '{"city":"Paris"}'),
        ("function_call", "call_b", '{"city":"Oslo"}'),
    ]
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (20, 7)
    assert body["usage"]["cost"] == 0.000044 and body["usage"]["cost_credits"] == 44


def test_a_text_answer_cut_at_max_tokens_is_incomplete() -> None:
    answer = {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Once upon"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    response = Response.model_validate(response_from_chat(request(max_output_tokens=2), answer, response_id="resp_x"))
    assert response.status == "incomplete" and response.output_text == "Once upon"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"


def test_a_call_cut_at_max_tokens_is_an_incomplete_item_of_an_incomplete_response() -> None:
    calls = [{"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Pa'}}]
    answer = {
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24},
    }
    body = response_from_chat(request(tools=[TOOL], max_output_tokens=4), answer, response_id="resp_x")
    response = Response.model_validate(body)
    assert response.status == "incomplete"
    assert [(o.type, o.status) for o in response.output] == [("function_call", "incomplete")]


def streamed_events(req: ResponsesRequest, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = ResponseEvents(req, response_id="resp_abc", model="smollm2-135m-instruct")
    out = events.opening()
    for chunk in chunks:
        out += events.feed(chunk)
    return out + events.closing()


def test_streamed_tool_calls_are_function_call_events_that_openai_types_accept() -> None:
    events = streamed_events(request(tools=[TOOL]), tool_chunks())
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",  # the first call ends before the second begins, as OpenAI streams them
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(e["arguments"]) for e in done] == [{"city": "Paris"}, {"city": "Oslo"}]


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def openai_client(body: bytes, content_type: str) -> AsyncOpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": content_type})

    transport = httpx.MockTransport(handler)
    return AsyncOpenAI(
        base_url="http://router.test/v1", api_key="k", http_client=httpx.AsyncClient(transport=transport)
    )


async def test_the_openai_client_accumulates_streamed_function_calls() -> None:
    req = request(tools=[TOOL])
    client = openai_client(sse(streamed_events(req, tool_chunks())), "text/event-stream")
    async with client.responses.stream(model="m", input="hi", tools=[TOOL]) as stream:  # type: ignore[list-item]
        final = await stream.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.parsed_arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Oslo"}),
    ]


def chunks_of(*deltas: dict[str, Any], finish: str = "tool_calls") -> list[dict[str, Any]]:
    """A chat stream of `deltas`, its finish and its usage chunk."""
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    return [*chunks, {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}, {"choices": [], "usage": USAGE}]


def call_pieces(index: int, city: str) -> list[dict[str, Any]]:
    """One tool call as llama.cpp streams it: its head, then its arguments in two pieces."""
    head = {"index": index, "id": f"call_{index}", "type": "function"}
    return [
        {"tool_calls": [{**head, "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": '{"city":'}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": f'"{city}"}}'}}]},
    ]


def assert_items_one_after_another(events: list[Any]) -> None:
    """Each item's events come between its response.output_item.added and .done, and the next item is added
    only after: how OpenAI streams, and what a client that follows "the current item" relies on."""
    current: int | None = None
    ended = 0
    for event in events:
        index = getattr(event, "output_index", None)
        if event.type == "response.output_item.added":
            assert current is None, f"item {index} added while item {current} is open"
            assert index == ended, f"item {index} added after {ended} items"
            current = index
        elif index is not None:
            assert index == current, f"{event.type} for item {index} while item {current} is open"
            if event.type == "response.output_item.done":
                current, ended = None, ended + 1
    assert current is None


@pytest.mark.parametrize(
    ("deltas", "types"),
    [
        (  # tool_choice "required": three calls, the case testers saw interleaved
            [*call_pieces(0, "Paris"), *call_pieces(1, "Oslo"), *call_pieces(2, "Rome")],
            ["function_call"] * 3,
        ),
        (  # text, then calls, then text again: each text is a message of its own
            [{"content": "Let me look."}, *call_pieces(0, "Paris"), *call_pieces(1, "Oslo"), {"content": "Done."}],
            ["message", "function_call", "function_call", "message"],
        ),
    ],
)
async def test_streamed_items_end_before_the_next_begins(deltas: list[dict[str, Any]], types: list[str]) -> None:
    sent = streamed_events(request(tools=[TOOL], tool_choice="required"), chunks_of(*deltas))
    client = openai_client(sse(sent), "text/event-stream")
    async with client.responses.stream(model="m", input="hi", tools=[TOOL]) as stream:  # type: ignore[list-item]
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert_items_one_after_another(events)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert sent[-1]["type"] == "response.completed"  # with the items as each was done
    assert sent[-1]["response"]["output"] == [e["item"] for e in sent if e["type"] == "response.output_item.done"]
    assert [item.type for item in final.output] == types
    ids = [item.id for item in final.output]
    assert len(set(ids)) == len(ids)  # item ids are unique in a Response, a second message's too
    calls = [o for o in final.output if o.type == "function_call"]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo", "Rome"][: len(calls)]


async def test_the_openai_client_accumulates_streamed_text() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": USAGE},
    ]
    client = openai_client(sse(streamed_events(request(), chunks)), "text/event-stream")
    async with client.responses.stream(model="m", input="hi") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert deltas == ["Hello", " there"] and final.output_text == "Hello there"
    assert final.usage is not None and final.usage.total_tokens == 27
