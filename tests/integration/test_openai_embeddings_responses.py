"""The official `openai` client's `embeddings.create` and `responses.create` / `responses.stream`, unchanged,
against a real router in front of a real node: shapes the client parses, exact usage, and the books."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError
from pydantic import BaseModel

from llamakit.wire.completions import ChatCompletionRequest
from tests.integration.conftest import ADMIN_KEY, HERD_TOKEN, LiveHerd
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
DIMENSIONS = 576  # SmolLM2-135M's hidden size


@pytest.fixture(scope="module")
async def herd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveHerd]:
    """As `live_herd`, with one thread: the machine's cores are shared with other llama.cpp processes."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("openai-surface")
    settings = NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name="real-node", threads=1)
    node = await RunningServer(create_node(settings)).start()
    router = await RunningServer(
        create_router(
            RouterSettings(
                db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url], health_interval=0.2
            )
        )
    ).start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    for _ in range(600):
        if (await admin.get("/health")).json()["ready"] == 1:
            break
        await asyncio.sleep(0.1)
    created = await admin.post("/admin/accounts", json={"name": "surface", "deposit": 1_000_000})
    yield LiveHerd(router, node, created.json()["api_key"], admin)
    books = (await admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0, books
    await admin.aclose()
    await router.stop()
    await node.stop()


@pytest.fixture
def client(herd: LiveHerd) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=herd.router.url + "/v1", api_key=herd.api_key, max_retries=0, timeout=120)


async def charges(herd: LiveHerd) -> int:
    books: dict[str, Any] = (await herd.admin.get("/admin/books")).json()
    return int(books["charges"])


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


async def test_embeddings_of_a_list_as_floats(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    texts = ["The cat sat on the mat.", "A kitten sleeps on a rug.", "Quarterly revenue grew by four percent."]
    done = await client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    vectors = [d.embedding for d in done.data]
    assert [d.index for d in done.data] == [0, 1, 2] and done.model == MODEL
    assert all(len(v) == DIMENSIONS for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors), "vectors have unit length"
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    # The tokens of a batch are the tokens of its inputs one by one (each with its BOS).
    singles = [await client.embeddings.create(model=MODEL, input=t, encoding_format="float") for t in texts]
    assert done.usage.prompt_tokens == done.usage.total_tokens == sum(s.usage.prompt_tokens for s in singles)
    for single, vector in zip(singles, vectors, strict=True):
        assert max(abs(x - y) for x, y in zip(single.data[0].embedding, vector, strict=True)) < 1e-3
    cost = done.usage.model_extra["cost_credits"]  # type: ignore[index]
    assert cost == 10 + done.usage.prompt_tokens  # base fee + prompt fee × tokens, no completion
    costs = [s.usage.model_extra["cost_credits"] for s in singles]  # type: ignore[index]
    assert await charges(herd) == before + cost + sum(costs)


async def test_embeddings_as_base64_the_clients_default_and_of_token_ids(client: AsyncOpenAI) -> None:
    as_floats = await client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    as_base64 = await client.embeddings.create(model=MODEL, input="hello world")  # the client asks for base64
    assert len(as_base64.data[0].embedding) == DIMENSIONS
    assert max(abs(x - y) for x, y in zip(as_base64.data[0].embedding, as_floats.data[0].embedding, strict=True)) < 1e-6
    ids = await client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4, 5]], encoding_format="base64")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 5  # token ids are embedded as given


async def test_embeddings_refusals_cost_nothing(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    with pytest.raises(BadRequestError, match="vocabulary"):
        await client.embeddings.create(model=MODEL, input=[[1, 10**8]])
    with pytest.raises(BadRequestError, match=str(DIMENSIONS)):
        await client.embeddings.create(model=MODEL, input="hi", dimensions=8)
    with pytest.raises(BadRequestError, match="at most 1024 tokens"):
        await client.embeddings.create(model=MODEL, input=[[1] * 1100])
    assert await charges(herd) == before


async def test_a_response_is_what_the_chat_completion_says(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    response = await client.responses.create(
        model=MODEL, instructions="Answer in one word.", input="Name a colour.", max_output_tokens=12, temperature=0
    )
    chat = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
    )
    assert response.output_text and response.output_text == chat.choices[0].message.content
    assert response.object == "response" and response.model == MODEL
    assert response.status in ("completed", "incomplete")
    usage = response.usage
    assert usage is not None and chat.usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    cost = usage.model_extra["cost_credits"]  # type: ignore[index]
    assert cost == 10 + usage.input_tokens + 2 * usage.output_tokens
    assert await charges(herd) == before + cost + chat.usage.model_extra["cost_credits"]  # type: ignore[index]


async def test_a_streamed_response_with_create(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    stream = await client.responses.create(
        model=MODEL, input="Count from one to five.", max_output_tokens=20, temperature=0, stream=True
    )
    kinds, deltas, final = [], [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert final is not None and final.output_text == "".join(deltas) and len(deltas) > 3
    assert final.usage is not None and final.usage.output_tokens <= 20
    assert await charges(herd) == before + final.usage.model_extra["cost_credits"]  # type: ignore[index]


async def test_logprobs_of_a_response_are_the_chat_completions_whole_and_streamed(client: AsyncOpenAI) -> None:
    question = "Name three fruits."
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    # The tokens chosen, as the text is (the alternatives' order may differ by a float between two runs).
    want = [(e.token, e.bytes) for e in chat.choices[0].logprobs.content]
    include: list[Any] = ["message.output_text.logprobs"]

    whole = await client.responses.create(
        model=MODEL, input=question, max_output_tokens=6, temperature=0, include=include, top_logprobs=3
    )
    part = whole.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.text == chat.choices[0].message.content
    assert whole.top_logprobs == 3
    assert part.logprobs is not None and len(part.logprobs) == whole.usage.output_tokens == len(want)  # type: ignore[union-attr]
    assert [(e.token, e.bytes) for e in part.logprobs] == want
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in part.logprobs)

    stream = await client.responses.create(
        model=MODEL, input=question, max_output_tokens=6, temperature=0, include=include, top_logprobs=3, stream=True
    )
    streamed, done = [], None
    async for event in stream:
        if event.type == "response.output_text.delta":
            streamed += [(e.token, len(e.top_logprobs or ())) for e in event.logprobs]
        if event.type == "response.output_text.done":
            done = [(e.token, len(e.top_logprobs or ())) for e in event.logprobs]
    assert streamed == done == [(token, 3) for token, _ in want]

    plain = await client.responses.create(
        model=MODEL, input=question, max_output_tokens=6, temperature=0, top_logprobs=3
    )
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]  # OpenAI's too: only with include


class Grade(BaseModel):
    grade: Literal[1, 2, 3, 4, 5]


async def test_responses_stream_with_a_json_schema_text_format(client: AsyncOpenAI) -> None:
    async with client.responses.stream(
        model=MODEL,
        input="Rate this review from 1 to 5: 'I love it, best purchase ever.'",
        text_format=Grade,
        max_output_tokens=32,
        temperature=0,
    ) as stream:
        final = await stream.get_final_response()
    assert isinstance(final.output_parsed, Grade)
    assert json.loads(final.output_text) == final.output_parsed.model_dump()


async def test_what_is_not_kept_is_refused(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    with pytest.raises(BadRequestError, match="does not keep responses"):
        await client.responses.create(model=MODEL, input="hi", store=True)
    with pytest.raises(BadRequestError, match="whole conversation"):
        await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert await charges(herd) == before


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.mark.skipif(
    "tools" not in ChatCompletionRequest.model_fields, reason="chat completions have no tool calling in this build"
)
async def test_a_function_tool_round_trip(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    question: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await client.responses.create(
        model=MODEL, input=question, tools=[WEATHER], tool_choice="required", max_output_tokens=64, temperature=0
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    call = calls[0]
    follow_up = [
        *question,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 °C"},
    ]
    second = await client.responses.create(
        model=MODEL, input=follow_up, tools=[WEATHER], max_output_tokens=48, temperature=0
    )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its result were in the prompt
    spent = sum(r.usage.model_extra["cost_credits"] for r in (first, second))  # type: ignore[union-attr,index]
    assert await charges(herd) == before + spent


@pytest.mark.skipif(
    "tools" not in ChatCompletionRequest.model_fields, reason="chat completions have no tool calling in this build"
)
async def test_a_streamed_function_call(client: AsyncOpenAI, herd: LiveHerd) -> None:
    before = await charges(herd)
    async with client.responses.stream(
        model=MODEL,
        input="What is the weather in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(call.parsed_arguments["city"], str)  # type: ignore[union-attr]
    assert final.usage is not None
    assert await charges(herd) == before + final.usage.model_extra["cost_credits"]  # type: ignore[index]


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city today.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def test_with_tools_the_logprobs_are_those_of_the_answers_text_not_of_its_json(client: AsyncOpenAI) -> None:
    """With tools, a node generates JSON (`{"response": "…"}`) and answers its text: the logprobs are the
    text's tokens, whole and streamed, through chat completions and the Responses API alike."""
    common: Any = {
        "model": MODEL, "messages": [{"role": "user", "content": "Hello, how are you?"}], "tools": [WEATHER_TOOL],
        "tool_choice": "auto", "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    whole = await client.chat.completions.create(**common)
    text = whole.choices[0].message.content
    if not text:  # another CPU's floats chose to call the tool (this one answers "Hello, …"): no text, no logprobs
        logprobs = whole.choices[0].logprobs
        assert whole.choices[0].message.tool_calls and not (logprobs and logprobs.content)
        return
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content
    tokens = [e.token for e in whole.choices[0].logprobs.content]
    assert "response" not in tokens and text.startswith(tokens[0].lstrip('"')), tokens

    streamed = []
    async for chunk in await client.chat.completions.create(**common, stream=True):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += [e.token for e in chunk.choices[0].logprobs.content]
    assert streamed == tokens

    tool = {"type": "function", **WEATHER_TOOL["function"]}
    response = await client.responses.create(
        model=MODEL, input="Hello, how are you?", tools=[tool], tool_choice="auto", max_output_tokens=12, temperature=0,
        include=["message.output_text.logprobs"], top_logprobs=2,
    )  # fmt: skip
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and [e.token for e in part.logprobs] == tokens
