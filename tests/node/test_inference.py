"""The node with the real model: completions, chat, streaming, exact usage, grammars, slots, cancellation."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from llamakit.router.upstream import token_chunk
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

COUNTING = "Count from one to one thousand: 1, 2, 3, 4, 5, 6, 7,"


@pytest.fixture(scope="module")
def direct() -> Iterator[object]:
    """llama-cpp-python's own `Llama` on the same model: the reference for text and token counts. With flash
    attention, as the node: its default, `auto`, is on on every CPU, and flash attention adds attention's floats
    in another order than the plain kernels, so that at temperature 0 a near-tie could go the other way."""
    from llama_cpp import Llama

    from llamakit.catalog import DEFAULT_MODEL, resolve_model

    path = str(resolve_model(DEFAULT_MODEL).path)
    llama = Llama(model_path=path, n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    yield llama
    llama.close()


def sse_events(raw: str) -> list[dict[str, object]]:
    events = [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def metric(client: httpx.AsyncClient, name: str, labels: str = "") -> float:
    text = (await client.get("/metrics")).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_health_and_models(client: httpx.AsyncClient) -> None:
    health = (await client.get("/health")).json()
    assert health["status"] == "ready"
    assert health["model"] == "smollm2-135m-instruct"
    assert health["slots"] == 2 and health["busy"] == 0
    assert (health["backend"], health["gpu_layers"], health["flash_attn"]) == ("CPU", 0, "on")
    models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]


async def test_chat_matches_llama_cpp_python(client: httpx.AsyncClient, direct: object) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = await client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 24, "temperature": 0, "seed": 1}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert resp.headers["X-Llamakit-Request-Id"] == body["id"]
    ref = direct.create_chat_completion(messages=messages, max_tokens=24, temperature=0, seed=1)  # type: ignore[attr-defined]
    assert body["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert body["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


async def test_completion_usage_is_exact(client: httpx.AsyncClient, direct: object) -> None:
    resp = await client.post("/v1/completions", json={"prompt": COUNTING, "max_tokens": 12, "temperature": 0})
    body = resp.json()
    assert resp.status_code == 200, body
    assert body["usage"]["prompt_tokens"] == len(direct.tokenize(COUNTING.encode(), add_bos=True, special=True))  # type: ignore[attr-defined]
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"
    ref = direct.create_completion(COUNTING, max_tokens=12, temperature=0)  # type: ignore[attr-defined]
    assert body["choices"][0]["text"] == ref["choices"][0]["text"]


async def test_stream_joins_to_the_whole_text(client: httpx.AsyncClient) -> None:
    request = {
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_tokens": 40,
        "temperature": 0,
        "seed": 7,
    }
    # The stream is compared with a whole answer computed alike: both find the prompt in the slot's cache (the
    # first request put it there). A cold and a warm prompt are decoded in other batch shapes, which gives other
    # floats, and at a near-tie another token on some CPUs.
    await client.post("/v1/chat/completions", json=request)
    whole = (await client.post("/v1/chat/completions", json=request)).json()
    resp = await client.post(
        "/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(resp.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]  # type: ignore[index,union-attr]
    assert len([p for p in pieces if p]) > 5, "one chunk per token, not one blob"
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # the second found the prompt in its cache
    assert {k: chunks[-1]["usage"][k] for k in counts} == {k: whole["usage"][k] for k in counts}  # type: ignore[index]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]  # type: ignore[index]
    assert len(finishing) == 1


async def test_completion_stream_without_usage(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/completions", json={"prompt": COUNTING, "max_tokens": 6, "temperature": 0, "stream": True}
    )
    chunks = sse_events(resp.text)
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # type: ignore[index]


async def test_token_chunks_carry_their_counts_where_a_router_finds_them_unparsed(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 6, "temperature": 0, "stream": True},
        headers={"X-Llamakit-Request-Id": "req-counted"},
    )
    payloads = [line[6:].encode() for line in resp.text.splitlines() if line.startswith("data: {")]
    tokens = [p for p in payloads if json.loads(p)["choices"] and json.loads(p)["choices"][0]["delta"].get("content")]
    found = [token_chunk(p, b'{"id":"req-counted",') for p in tokens]
    assert tokens and None not in found, "every token chunk is passed on by a router without parsing"
    completions = [f[1].completion_tokens for f in found if f is not None]
    assert completions == sorted(completions) and completions[-1] <= 6
    assert all(
        json.loads(f[0]) == {k: v for k, v in json.loads(p).items() if k != "llamakit"}
        for f, p in zip(found, tokens, strict=True)
        if f
    )


async def test_grammar_forces_a_digit(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Rate the sentiment of 'I love it' from 1 to 5."}],
            "grammar": "root ::= [1-5]",
            "max_tokens": 4,
        },
    )
    body = resp.json()
    assert resp.status_code == 200, body
    assert re.fullmatch(r"[1-5]", body["choices"][0]["message"]["content"])
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_json_schema_yields_valid_json(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Give a city and its population as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
            "max_tokens": 120,
            "temperature": 0,
        },
    )
    body = resp.json()
    assert resp.status_code == 200, body
    data = json.loads(body["choices"][0]["message"]["content"])
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


async def test_stop_string_ends_generation(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/completions", json={"prompt": COUNTING, "max_tokens": 40, "temperature": 0, "stop": [" 10,"]}
    )
    body = resp.json()
    text = body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert " 10," not in text and text.rstrip().endswith("9,")


async def test_closed_stream_stops_generation(client: httpx.AsyncClient) -> None:
    before = await metric(client, "llamakit_node_completion_tokens_total")
    cancelled = await metric(client, "llamakit_node_requests_total", '{outcome="cancelled",route="completions"}')
    request = {"prompt": COUNTING, "max_tokens": 600, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=request) as resp:
        seen = 0
        async for line in resp.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    for _ in range(100):
        health = (await client.get("/health")).json()
        if health["busy"] == 0:
            break
        await asyncio.sleep(0.1)
    assert health["busy"] == 0, "the slot was not freed after the client went away"
    generated = await metric(client, "llamakit_node_completion_tokens_total") - before
    assert 3 <= generated < 100, f"generation went on for {generated} tokens after the stream was closed"
    assert (
        await metric(client, "llamakit_node_requests_total", '{outcome="cancelled",route="completions"}')
        == cancelled + 1
    )


async def test_abandoned_request_stops_generation(client: httpx.AsyncClient) -> None:
    before = await metric(client, "llamakit_node_completion_tokens_total")
    request = {"prompt": COUNTING, "max_tokens": 600, "temperature": 0}
    task = asyncio.create_task(client.post("/v1/completions", json=request))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if (await client.get("/health")).json()["busy"] == 0:
            break
        await asyncio.sleep(0.1)
    generated = await metric(client, "llamakit_node_completion_tokens_total") - before
    assert 0 < generated < 300


async def test_two_slots_serve_two_requests_at_once_and_a_third_gets_503(
    node: RunningServer, client: httpx.AsyncClient
) -> None:
    request = {"prompt": COUNTING, "max_tokens": 60, "temperature": 0, "stream": True}
    first_chunk: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]
    finished: list[bool] = [False, False]

    async def run(i: int) -> str:
        text = ""
        async with client.stream("POST", "/v1/completions", json=request) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    first_chunk[i].set()
                    choice = json.loads(line[6:])["choices"]
                    text += choice[0]["text"] if choice else ""
        finished[i] = True
        return text

    tasks = [asyncio.create_task(run(0)), asyncio.create_task(run(1))]
    await asyncio.wait_for(asyncio.gather(first_chunk[0].wait(), first_chunk[1].wait()), 60)
    assert not any(finished), "both streams were flowing at the same time"
    assert (await client.get("/health")).json()["busy"] == 2
    third = await client.post("/v1/completions", json={**request, "stream": False})
    assert third.status_code == 503
    assert third.headers["Retry-After"] == "1"
    assert third.json()["error"]["code"] == "slots_busy"
    texts = await asyncio.gather(*tasks)
    assert texts[0] == texts[1] and texts[0]


async def test_a_shared_prompt_prefix_is_served_from_the_slot_cache_and_still_counted(
    client: httpx.AsyncClient,
) -> None:
    system = {"role": "system", "content": "You answer in one short sentence. " * 16}

    async def ask(question: str) -> dict[str, int]:
        body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 6, "temperature": 0}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        usage: dict[str, int] = resp.json()["usage"]
        return {**usage, "cached": usage["prompt_tokens_details"]["cached_tokens"]}  # type: ignore[index]

    before = await metric(client, "llamakit_node_prompt_tokens_cached_total")
    await ask("What is the capital of Italy?")
    other = await ask("Which is the largest ocean?")
    again = await ask("Which is the largest ocean?")
    assert other["cached"] >= 16 * 7, "the system prompt (7 tokens a sentence) came from the cache"
    assert other["cached"] < other["prompt_tokens"], "the new question was decoded"
    assert again["cached"] == again["prompt_tokens"] - 1, "only the last token is decoded again, for its logits"
    assert again["prompt_tokens"] == other["prompt_tokens"] and again["total_tokens"] == other["total_tokens"]
    after = await metric(client, "llamakit_node_prompt_tokens_cached_total")
    assert after - before >= other["cached"] + again["cached"]
