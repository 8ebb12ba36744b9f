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


def test_logprobs_come_with_each_token_in_both_formats_whole_and_streamed(client: sdk.Client) -> None:
    done = client.generate("The capital of France is", max_tokens=4, temperature=0, logprobs=3)
    chat = client.chat("Name a colour.", max_tokens=4, temperature=0, logprobs=2)
    streamed = client.stream_chat("Name a colour.", max_tokens=4, temperature=0, logprobs=2)
    list(streamed)
    for result, alternatives in ((done, 3), (chat, 2), (streamed.result, 2)):
        assert result.logprobs is not None and result.usage is not None
        assert len(result.logprobs) == result.usage.completion_tokens
        for entry in result.logprobs:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == alternatives
            # Greedy: the token taken is the most likely one (ties aside, as probable as it).
            assert entry.logprob >= max(t.logprob for t in entry.top_logprobs) - 1e-4
    assert "".join(t.token for t in done.logprobs or ()) == done.text
    assert chat.logprobs is not None and all(t.bytes for t in chat.logprobs)  # chat's format carries the bytes
    assert client.generate("Hi", max_tokens=2).logprobs is None  # nothing unless asked for
    with pytest.raises(ValueError, match="0 to 20"):
        client.generate("Hi", max_tokens=2, logprobs=21)
