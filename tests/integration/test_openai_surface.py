"""The OpenAI surface that clients rely on, with the official `openai` client against a real router and node:
tools (whole, streamed, a result round trip), logprobs, sampling controls, models.retrieve, request ids.

The 135M model's answers may be poor; the structure and the accounting must be right: every call is priced,
held and settled like a chat completion (the live herd's teardown checks that the books balance)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from tests.integration.conftest import LiveHerd

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city today",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris today?"}]


@pytest.fixture
def client(live_herd: LiveHerd) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=live_herd.router.url + "/v1", api_key=live_herd.api_key, max_retries=0)


def cost_of(usage: Any) -> int:
    return 10 + usage.prompt_tokens + 2 * usage.completion_tokens


async def test_a_required_tool_call_has_valid_arguments_and_is_charged(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)  # valid JSON that fits the tool's schema
        if call.function.name == "get_weather":
            assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
        else:
            assert call.function.name == "get_time" and set(arguments) == {"timezone"}
    assert reply.usage is not None and reply.usage.model_extra["cost_credits"] == cost_of(reply.usage)  # type: ignore[index]


async def test_a_named_tool_choice_calls_that_tool_and_none_calls_nothing(client: AsyncOpenAI) -> None:
    named = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )  # fmt: skip
    calls = named.choices[0].message.tool_calls
    assert calls is not None and [c.function.name for c in calls] == ["get_time"]
    plain = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=12,
        temperature=0,
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    with pytest.raises(BadRequestError, match="not among the tools"):
        await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=12,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip


async def test_auto_answers_either_with_calls_or_with_text(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        max_tokens=80,
        temperature=0,
    )
    choice = reply.choices[0]
    if choice.message.tool_calls:  # "length": calls cut by max_tokens, as far as they got (as OpenAI gives them)
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


async def test_streamed_tool_calls_assemble_as_the_client_does(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    finish, usage, pieces = None, None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                if delta.index not in calls:  # a call is announced with its id and name before its arguments
                    assert delta.id and delta.id.startswith("call_") and delta.function and delta.function.name
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
                pieces += bool(delta.function and delta.function.arguments)
            finish = choice.finish_reason or finish
    assert calls and all(c["name"] == "get_weather" for c in calls.values())
    assert pieces > len(calls), "the arguments arrive piece by piece, as they are generated"
    # Whether a 135M model closes its call within max_tokens at temperature 0 depends on the CPU's kernels (the
    # floats of AVX2 and AVX-512 differ): a finished call is whole JSON, a cut one ends with "length" (as OpenAI's).
    if finish == "tool_calls":
        assert all("city" in json.loads(c["arguments"]) for c in calls.values())
    else:
        assert finish == "length" and usage is not None and usage.completion_tokens == 60
    assert usage is not None and usage.model_extra["cost_credits"] == cost_of(usage)  # type: ignore[index]


async def test_a_tool_result_round_trip(client: AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    message = first.choices[0].message
    assert message.tool_calls
    history: list[Any] = [
        *ASK,
        message.model_dump(exclude_none=True),
        *[{"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"} for call in message.tool_calls],
    ]
    second = await client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[WEATHER],
        max_tokens=60,
        temperature=0,
    )
    assert second.choices[0].message.content or second.choices[0].message.tool_calls
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens, "the call and its result are in the prompt"


async def test_chat_logprobs_name_each_token_with_its_alternatives(client: AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert reply.usage is not None and len(logprobs.content) == reply.usage.completion_tokens
    assert "".join(t.token for t in logprobs.content) == reply.choices[0].message.content
    for token in logprobs.content:
        assert token.logprob <= 0 and bytes(token.bytes or []).decode("utf-8", "replace") == token.token
        assert len(token.top_logprobs) == 3
        # at temperature 0 the chosen token is the most likely one
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    plain = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say yes."}], max_tokens=5, temperature=0
    )
    assert plain.choices[0].logprobs is None
    assert (
        plain.usage is not None and plain.usage.model_extra["cost_credits"] == reply.usage.model_extra["cost_credits"]
    )  # type: ignore[index]


async def test_completion_logprobs_whole_and_streamed(client: AsyncOpenAI) -> None:
    reply = await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.top_logprobs) == 4
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]
    stream = await client.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0, logprobs=2, stream=True
    )
    tokens: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.tokens:
            tokens += chunk.choices[0].logprobs.tokens
    assert len(tokens) == 4


def token_ids(text: str) -> list[int]:
    """`text`'s token ids under the default model's own vocabulary (llama.cpp, vocabulary only)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from llamakit.catalog import DEFAULT_MODEL, resolve_model

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = LlamaModel(path_model=str(resolve_model(DEFAULT_MODEL).path), params=params, verbose=False)
    try:
        ids: list[int] = model.tokenize(text.encode(), add_bos=False, special=False)
        return ids
    finally:
        model.close()  # type: ignore[no-untyped-call]


async def test_logit_bias_bans_and_forces_a_token(client: AsyncOpenAI) -> None:
    counting = "1, 2, 3, 4, 5, 6, 7, 8,"
    plain = await client.completions.create(model=MODEL, prompt=counting, max_tokens=2, temperature=0)
    assert plain.choices[0].text == " 9"
    [nine] = token_ids("9")
    banned = await client.completions.create(
        model=MODEL, prompt=counting, max_tokens=2, temperature=0, logit_bias={str(nine): -100}
    )
    assert banned.choices[0].text != " 9"
    forced = await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logit_bias={str(nine): 100}
    )
    assert forced.choices[0].text == "999"
    with pytest.raises(BadRequestError, match="vocabulary"):
        await client.completions.create(model=MODEL, prompt=counting, max_tokens=1, logit_bias={"999999": 5})


async def test_penalties_damp_a_repetition_loop(client: AsyncOpenAI) -> None:
    prompt = "ha ha ha ha ha ha ha"
    looping = (await client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)).choices[0]
    assert looping.text.count(" ha") >= 10, "without a penalty the model loops"
    for damp in ({"frequency_penalty": 2.0}, {"repeat_penalty": 2.0}, {"presence_penalty": 2.0}):
        damped = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body=damp
        )
        if "presence_penalty" in damp:
            # A flat penalty does not break this loop; whether it changes the greedy answer at all depends on the
            # CPU's kernels (the margin of " ha" over the next token), so only that it does not loop more holds.
            assert damped.choices[0].text.count(" ha") <= looping.text.count(" ha")
        else:
            assert damped.choices[0].text.count(" ha") < looping.text.count(" ha") / 2, damp


async def test_models_retrieve_and_request_ids(client: AsyncOpenAI) -> None:
    model = await client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(NotFoundError):
        await client.models.retrieve("no-such-model")
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert raw.headers["x-request-id"] == raw.headers["X-Llamakit-Request-Id"]
    assert raw.parse()._request_id == raw.headers["x-request-id"]


async def test_a_field_llamakit_does_not_act_on_is_refused_by_name(client: AsyncOpenAI, live_herd: LiveHerd) -> None:
    before = (await live_herd.admin.get("/admin/books")).json()
    for extra, says in [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"store": True}, "not stored"),
        ({"metadata": {"a": "b"}}, "metadata"),
    ]:
        with pytest.raises(BadRequestError, match=says):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=extra
            )
    after = (await live_herd.admin.get("/admin/books")).json()
    assert after["charges"] == before["charges"] and after["holds"] == 0
