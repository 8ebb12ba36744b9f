"""The SDK against a real router in front of a real node running the default model."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

import llamakit.sdk as sdk
from tests.sdk.conftest import LiveRouter

pytestmark = pytest.mark.model


class Verdict(BaseModel):
    stars: int


@pytest.fixture
def client(live_router: LiveRouter) -> sdk.Client:
    return sdk.Client(url=live_router.url, api_key=live_router.api_key, usage_log=None, max_retries=0)


def test_generate_and_chat_are_priced_on_exact_usage(client: sdk.Client, live_router: LiveRouter) -> None:
    before = client.account().spent
    with sdk.meter() as m:
        done = client.generate("The capital of France is", max_tokens=8, temperature=0)
        answer = client.chat("Name a colour.", max_tokens=12, temperature=0)
    for result in (done, answer):
        assert result.text.strip() and result.model == live_router.model and result.node == "real-node"
        assert result.usage is not None and 0 < result.usage.completion_tokens <= 12
        assert result.cost_credits == 10 + result.usage.prompt_tokens + 2 * result.usage.completion_tokens
    assert m.cost_credits == client.account().spent - before == (done.cost_credits or 0) + (answer.cost_credits or 0)


def test_a_stream_is_the_same_text_as_the_whole_answer(client: sdk.Client) -> None:
    messages = [{"role": "user", "content": "Count to five."}]
    stream = client.stream_chat(messages, max_tokens=24, temperature=0)
    pieces = list(stream)
    whole = client.chat(messages, max_tokens=24, temperature=0)
    assert len(pieces) > 3 and "".join(pieces) == stream.result.text == whole.text
    assert stream.result.usage is not None and stream.result.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert stream.result.ttft is not None and stream.result.ttft < (stream.result.latency or 0)


def test_a_grammar_constrains_the_answer(client: sdk.Client) -> None:
    grade = client.chat("Rate from 1 to 5: I love it!", grammar="root ::= [1-5]", max_tokens=2)
    assert grade.text in {"1", "2", "3", "4", "5"}
    done = client.generate("The grade from 1 to 5 is", grammar="root ::= [1-5]", max_tokens=2, bid=1.5)
    assert done.text in {"1", "2", "3", "4", "5"} and done.bid == 1.5


def test_a_json_schema_gives_parseable_json(client: sdk.Client) -> None:
    result = client.chat("Review: 'Great phone, love it.' How many stars?", json_schema=Verdict, max_tokens=24)
    assert isinstance(Verdict.model_validate(json.loads(result.text)).stars, int)


async def test_async_chat_and_stream(live_router: LiveRouter) -> None:
    async with sdk.AsyncClient(url=live_router.url, api_key=live_router.api_key, usage_log=None) as client:
        answer = await client.chat("Say hello.", max_tokens=8, temperature=0)
        stream = client.stream("Once upon a time", max_tokens=8, temperature=0)
        pieces = [p async for p in stream]
    assert answer.text and answer.cost_credits
    assert "".join(pieces) == stream.result.text and stream.result.cost_credits
