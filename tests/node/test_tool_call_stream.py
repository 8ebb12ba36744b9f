"""Tool calls streamed as OpenAI streams them: each call's id and name as soon as they are known, then its
arguments' JSON text piece by piece, whatever pieces the tokens cut the answer into."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamakit.node.answers import Answer
from llamakit.node.engine import GenerationResult
from llamakit.wire.completions import Usage
from llamakit.wire.tool_calls import ToolCallParser

CALLS = (
    '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris }", "days": [1, {"a": 2}]}},\n'
    ' {"name": "get_time", "arguments": {}}, {"name":"count","arguments":42}]}'
)


def assembled(deltas: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """The calls as the openai client assembles them: by index, names and arguments concatenated."""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += delta.get("id", "")
        call["name"] += delta.get("function", {}).get("name", "")
        call["arguments"] += delta.get("function", {}).get("arguments", "")
    return calls


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, len(CALLS)])
def test_calls_assemble_whatever_the_pieces(size: int) -> None:
    parser = ToolCallParser()
    deltas: list[dict[str, Any]] = []
    for i in range(0, len(CALLS), size):
        text, found = parser.feed(CALLS[i : i + size])
        assert text == ""
        deltas += found
    calls = assembled(deltas)
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time", "count"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": 'Pa"ris }', "days": [1, {"a": 2}]}, {}, 42]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert parser.calls == 3 and parser.calls_complete
    if size == 1:  # one character at a time: the arguments come in as many pieces
        assert sum(1 for d in deltas if d["index"] == 0 and d["function"].get("arguments")) > 10


def test_a_call_is_announced_before_its_arguments_are_whole() -> None:
    parser = ToolCallParser()
    _, deltas = parser.feed('{"tool_calls": [{"name": "get_weather", "arguments": {"ci')
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["type"] == "function"
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"ci'}}
    assert not parser.calls_complete and parser.calls == 0


def test_a_text_answer_still_streams_as_text() -> None:
    parser = ToolCallParser()
    assert parser.feed('{"response": "Hel') == ("Hel", [])
    assert parser.feed('lo \\"you\\""}') == ('lo "you"', [])
    assert parser.streaming_text and parser.calls == 0


def chunks_of(answer: Answer, pieces: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n, piece in enumerate(pieces, 1):
        out += answer.piece(piece, n)
    return out


def test_the_node_streams_call_deltas_and_finishes_with_tool_calls() -> None:
    answer = Answer(kind="chat", id="req-1", model="m", tools=True, logprobs=None)
    pieces = [CALLS[i : i + 4] for i in range(0, len(CALLS), 4)]
    chunks = chunks_of(answer, pieces)
    first = chunks[0]["choices"][0]["delta"]
    assert first["content"] is None and first["tool_calls"][0]["function"]["name"] == "get_weather"
    deltas = [d for c in chunks for d in c["choices"][0]["delta"]["tool_calls"]]
    assert [json.loads(c["arguments"]) for c in assembled(deltas).values()][1:] == [{}, 42]
    result = GenerationResult(
        text=CALLS, prompt_tokens=3, completion_tokens=len(pieces), finish_reason="stop", seconds=0.1
    )
    closing = answer.closing(result)
    assert [c["choices"][0]["finish_reason"] for c in closing] == ["tool_calls"]


def test_a_call_cut_by_max_tokens_ends_with_length() -> None:
    answer = Answer(kind="chat", id="req-1", model="m", tools=True, logprobs=None)
    cut = CALLS[:60]
    chunks_of(answer, [cut])
    result = GenerationResult(text=cut, prompt_tokens=3, completion_tokens=9, finish_reason="length", seconds=0.1)
    assert [c["choices"][0]["finish_reason"] for c in answer.closing(result)] == ["length"]


@pytest.mark.parametrize("cut", [12, 45, 60, 95, len(CALLS) - 2])
def test_an_answer_cut_by_max_tokens_is_whole_what_its_stream_delivered(cut: int) -> None:
    """A whole answer cut short gives the calls (or text) its stream would have: no raw JSON as content."""
    text = CALLS[:cut]
    streamed = Answer(kind="chat", id="req-1", model="m", tools=True, logprobs=None)
    result = GenerationResult(text=text, prompt_tokens=3, completion_tokens=9, finish_reason="length", seconds=0.1)
    chunks = chunks_of(streamed, [text]) + streamed.closing(result)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    want = [(c["name"], c["arguments"]) for c in assembled(deltas).values()]
    usage = Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12)
    choice = Answer(kind="chat", id="req-1", model="m", tools=True, logprobs=None).body(result, usage)["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want
    assert choice["finish_reason"] == "length" and (choice["message"]["content"] is None or not want)


def test_a_text_answer_cut_by_max_tokens_is_its_text_not_its_json() -> None:
    answer = Answer(kind="chat", id="req-1", model="m", tools=True, logprobs=None)
    result = GenerationResult(
        text='{"response": "Hello, how a', prompt_tokens=3, completion_tokens=9, finish_reason="length", seconds=0.1
    )
    usage = Usage(prompt_tokens=3, completion_tokens=9, total_tokens=12)
    message = answer.body(result, usage)["choices"][0]["message"]
    assert message["content"] == "Hello, how a" and not message.get("tool_calls")
