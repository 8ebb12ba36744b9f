"""The official `openai` client, unchanged, against the router in front of a real node."""

from __future__ import annotations

from decimal import Decimal

import pytest
from openai import AsyncOpenAI, AuthenticationError, NotFoundError

from tests.integration.conftest import LiveHerd

pytestmark = pytest.mark.model


@pytest.fixture
def client(live_herd: LiveHerd) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=live_herd.router.url + "/v1", api_key=live_herd.api_key, max_retries=0)


async def test_models(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]


async def test_chat(client: AsyncOpenAI, live_herd: LiveHerd) -> None:
    before = (await live_herd.admin.get("/admin/books")).json()["charges"]
    reply = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    cost = reply.usage.model_extra["cost_credits"]  # type: ignore[index]
    assert cost == 10 + reply.usage.prompt_tokens + 2 * reply.usage.completion_tokens
    assert (await live_herd.admin.get("/admin/books")).json()["charges"] == before + cost
    # usage.cost is the price in US dollars, as OpenRouter reports it: a credit is a millionth of a dollar.
    price = reply.usage.model_extra["cost"]  # type: ignore[index]
    assert isinstance(price, float) and price == float(Decimal(cost) / 10**6)


async def test_cached_prompt_tokens_are_reported_and_priced_as_prompt_tokens(client: AsyncOpenAI) -> None:
    async def ask() -> tuple[int, int, int]:
        reply = await client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Name a fruit that is yellow."}],
            max_tokens=8,
            temperature=0,
        )
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        return usage.prompt_tokens, cached, usage.model_extra["cost_credits"]  # type: ignore[index]

    await ask()
    prompt_tokens, cached, cost = await ask()
    assert cached == prompt_tokens - 1, "the node's slot held the whole prompt: only its last token was decoded"
    assert cost == (await ask())[2], "cached tokens cost what other prompt tokens cost"


async def test_streaming_with_usage(client: AsyncOpenAI) -> None:
    # The stream is compared with a whole answer that, like it, finds the prompt in the slot's cache: a cold and
    # a warm prompt are decoded in other batch shapes, which can part the texts at a near-tie on some CPUs.
    await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=24,
        temperature=0,
    )
    stream = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) > 3
    assert usage is not None and len(pieces) <= usage.completion_tokens <= 24
    whole = await client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=24,
        temperature=0,
    )
    assert "".join(pieces) == whole.choices[0].message.content


async def test_legacy_completions_and_extensions(client: AsyncOpenAI) -> None:
    done = await client.completions.create(
        model="smollm2-135m-instruct",
        prompt="The grade from 1 to 5 is",
        max_tokens=3,
        extra_body={"grammar": "root ::= [1-5]", "bid": 1.5},
    )
    assert done.choices[0].text in {"1", "2", "3", "4", "5"}


async def test_errors_are_openai_exceptions(client: AsyncOpenAI, live_herd: LiveHerd) -> None:
    with pytest.raises(NotFoundError, match="smollm2-135m-instruct"):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    bad = AsyncOpenAI(base_url=live_herd.router.url + "/v1", api_key="lk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        await bad.models.list()


async def test_a_prompt_over_the_context_is_refused_and_refunded(client: AsyncOpenAI, live_herd: LiveHerd) -> None:
    from openai import BadRequestError

    before = (await live_herd.admin.get("/admin/books")).json()
    with pytest.raises(BadRequestError, match="context"):
        await client.completions.create(model="smollm2-135m-instruct", prompt="word " * 2000, max_tokens=4)
    after = (await live_herd.admin.get("/admin/books")).json()
    assert after["charges"] == before["charges"] and after["holds"] == 0
