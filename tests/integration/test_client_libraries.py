"""Structured output and tools through the client libraries people use, unchanged, against a real herd:
instructor's default (tools) mode, LangChain's `bind_tools` and `with_structured_output(method=
"function_calling")`, pydantic-ai's default output type. Each call is priced and settled (the live herd's
teardown checks the books); the tiny model's answers need only have the right structure."""

from __future__ import annotations

import asyncio
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel

from tests.integration.conftest import LiveHerd

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the weather in Paris today? Use celsius."


class Weather(BaseModel):
    """The weather to look up."""

    city: str
    unit: Literal["celsius", "fahrenheit"]


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city today."""
    return f"Sunny, 21 degrees {unit} in {city}"


async def spent(live_herd: LiveHerd) -> int:
    account = (await live_herd.admin.get("/admin/accounts")).json()["data"]
    return sum(a["spent"] for a in account)


async def test_instructor_default_tools_mode(live_herd: LiveHerd) -> None:
    import instructor
    from openai import OpenAI

    before = await spent(live_herd)
    client = instructor.from_openai(OpenAI(base_url=live_herd.router.url + "/v1", api_key=live_herd.api_key))
    assert client.mode == instructor.Mode.TOOLS
    weather = await asyncio.to_thread(
        client.chat.completions.create,
        model=MODEL,
        response_model=Weather,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=60,
        temperature=0,
        max_retries=0,
    )
    assert isinstance(weather, Weather)
    assert await spent(live_herd) > before


async def test_langchain_bind_tools_and_structured_output(live_herd: LiveHerd) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=live_herd.router.url + "/v1", api_key=live_herd.api_key, temperature=0, max_tokens=60
    )  # type: ignore[arg-type]
    forced = await llm.bind_tools([get_weather], tool_choice="get_weather").ainvoke(QUESTION)
    assert [call["name"] for call in forced.tool_calls] == ["get_weather"]
    assert set(forced.tool_calls[0]["args"]) == {"city", "unit"}
    anything = await llm.bind_tools([get_weather]).ainvoke(QUESTION)
    assert anything.tool_calls or anything.content, "either a call or an answer, never nothing"
    structured = await llm.with_structured_output(Weather, method="function_calling").ainvoke(QUESTION)
    assert isinstance(structured, Weather)


async def test_pydantic_ai_default_output_type(live_herd: LiveHerd) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    model = OpenAIChatModel(
        MODEL, provider=OpenAIProvider(base_url=live_herd.router.url + "/v1", api_key=live_herd.api_key)
    )
    agent = Agent(model, output_type=Weather, model_settings=ModelSettings(max_tokens=80, temperature=0))
    result = await agent.run(QUESTION)
    assert isinstance(result.output, Weather)
    usage = result.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0


async def test_every_library_call_was_settled(live_herd: LiveHerd) -> None:
    async with httpx.AsyncClient(base_url=live_herd.router.url, timeout=30) as plain:
        usage = (await plain.get("/v1/account/usage", headers={"Authorization": f"Bearer {live_herd.api_key}"})).json()
    assert all(u["status"] in ("ok", "cut") for u in usage["data"]), usage
    books = (await live_herd.admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0


async def test_litellm_books_usage_cost_as_the_price_in_dollars(live_herd: LiveHerd) -> None:
    """litellm takes an OpenRouter-style `usage.cost` as the upstream's charge in US dollars: its `openrouter/`
    models send `usage: {"include": true}` and record `usage.cost` as the call's `response_cost`."""
    import litellm

    before = await spent(live_herd)
    reply = await litellm.acompletion(
        model=f"openrouter/{MODEL}",
        api_base=live_herd.router.url + "/v1",
        api_key=live_herd.api_key,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    credits = await spent(live_herd) - before
    assert reply.usage.cost_credits == credits > 0
    # A credit is a millionth of a dollar by default: 60 credits are booked as $0.00006, not $60.
    assert reply._hidden_params["response_cost"] == reply.usage.cost == credits / 10**6


async def test_litellm_as_an_openai_compatible_server_whole_and_streamed(live_herd: LiveHerd) -> None:
    """litellm's `openai/` provider, pointed at the router, as its docs say to use any OpenAI-compatible server."""
    import litellm

    common = {
        "model": f"openai/{MODEL}",
        "api_base": live_herd.router.url + "/v1",
        "api_key": live_herd.api_key,
        "messages": [{"role": "user", "content": "Count from one to five."}],
        "max_tokens": 12,
        "temperature": 0,
    }
    before = await spent(live_herd)
    whole = await litellm.acompletion(**common)
    assert whole.choices[0].message.content and whole.usage.completion_tokens <= 12
    charged = await spent(live_herd) - before
    assert charged == whole.usage.cost_credits > 0

    stream = await litellm.acompletion(**common, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content  # greedy, the same prompt: the same text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert await spent(live_herd) - before == 2 * charged
