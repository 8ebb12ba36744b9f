"""The hardening cases as a client meets them: a real router in front of a real node, each case's books checked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

HERD_TOKEN = "field-herd-token"
ADMIN_KEY = "field-admin-key"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
FEES = (10, 1, 2)  # base, prompt token, completion token


@dataclass
class Field:
    router: RunningServer
    node: RunningServer
    admin: httpx.AsyncClient
    client: httpx.AsyncClient
    key: str

    async def usage(self, request_id: str, *, within: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for record in (await self.client.get("/v1/account/usage")).json()["data"]:
                if record["request_id"] == request_id:
                    return dict(record)
            await asyncio.sleep(0.05)
        raise AssertionError(f"no usage record for {request_id}")

    async def node_busy(self) -> int:
        async with httpx.AsyncClient() as plain:
            busy: int = (await plain.get(f"{self.node.url}/health")).json()["busy"]
            return busy


@pytest.fixture(scope="module")
async def field(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Field]:
    """A router that gives a node 3 s of silence (LLAMAKIT_NODE_TIMEOUT=3) before it takes it for hung."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("field")
    node = await RunningServer(
        create_node(NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name="field-node", threads=1))
    ).start()
    settings = RouterSettings(
        db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url], health_interval=0.2,
        node_timeout=3.0, base_fee=FEES[0], prompt_token_fee=FEES[1], completion_token_fee=FEES[2],
    )  # fmt: skip
    router = await RunningServer(create_router(settings)).start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    for _ in range(600):
        if (await admin.get("/health")).json()["ready"] == 1:
            break
        await asyncio.sleep(0.1)
    key = (await admin.post("/admin/accounts", json={"name": "field", "deposit": 10_000_000})).json()["api_key"]
    client = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    yield Field(router, node, admin, client, key)
    await client.aclose()
    await admin.aclose()
    await router.stop()
    await node.stop()


@pytest.fixture(autouse=True)
async def books_balance_after_each_case(field: Field) -> AsyncIterator[None]:
    yield
    for _ in range(100):
        books = (await field.admin.get("/admin/books")).json()
        if books["holds"] == 0:
            break
        await asyncio.sleep(0.05)
    assert books["balanced"] and books["holds"] == 0, books


def cost(usage: dict[str, Any]) -> int:
    return FEES[0] + FEES[1] * int(usage["prompt_tokens"]) + FEES[2] * int(usage["completion_tokens"])


async def test_an_answer_longer_than_the_node_timeout_is_served_whole_and_the_node_keeps_working(
    field: Field,
) -> None:
    # 600 tokens take seconds on any CPU this runs on (SmolLM2 makes ~100 a second on two cores): far more than
    # the router's 3 s node timeout, which the node's keepalives reset while it makes tokens.
    body = {"prompt": COUNTING, "max_tokens": 600, "temperature": 0}
    resp = await field.client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    assert usage["completion_tokens"] == 600 and usage["cost_credits"] == cost(usage)
    nodes = (await field.admin.get("/admin/nodes")).json()["data"]
    assert [n["state"] for n in nodes] == ["ready"], "a node producing tokens is not rested"
    again = await field.client.post("/v1/completions", json={**body, "max_tokens": 5})
    assert again.status_code == 200, again.text


async def test_a_client_that_leaves_a_whole_request_stops_the_generation_and_pays_for_what_was_made(
    field: Field,
) -> None:
    body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0}
    impatient = httpx.AsyncClient(base_url=field.router.url, headers=field.client.headers, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        await impatient.post("/v1/completions", json=body)
    await impatient.aclose()
    for _ in range(40):  # the router notices within a poll, the node within a decode step
        if await field.node_busy() == 0:
            break
        await asyncio.sleep(0.05)
    assert await field.node_busy() == 0, "the slot is free long before 400 tokens could have been made"
    [record] = [r for r in (await field.client.get("/v1/account/usage")).json()["data"] if r["status"] == "cut"]
    assert 0 < record["completion_tokens"] < 300, record
    assert record["cost_credits"] == cost(record)


async def test_a_stream_client_that_leaves_before_its_first_token_stops_the_prompts_decoding(field: Field) -> None:
    body = {"prompt": "word " * 900, "max_tokens": 20, "temperature": 0, "stream": True}  # seconds of prompt
    impatient = httpx.AsyncClient(base_url=field.router.url, headers=field.client.headers, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        await impatient.post("/v1/completions", json=body)
    await impatient.aclose()
    left = time.monotonic()
    while await field.node_busy() and time.monotonic() - left < 10:
        await asyncio.sleep(0.05)
    assert await field.node_busy() == 0
    usage = (await field.client.get("/v1/account/usage")).json()["data"]
    assert (usage[0]["status"], usage[0]["cost_credits"]) == ("cancelled", 0), usage[0]


async def test_a_grammar_that_would_crash_llama_cpp_is_a_400_and_the_herd_serves_on(field: Field) -> None:
    grammar = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000
    before = (await field.client.get("/v1/account")).json()
    resp = await field.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "grammar": grammar}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_grammar", resp.text
    assert (await field.client.get("/v1/account")).json()["spent"] == before["spent"]
    resp = await field.client.post("/v1/completions", json={"prompt": COUNTING, "max_tokens": 3})
    assert resp.status_code == 200, resp.text


async def test_null_fields_mean_their_defaults_through_the_router(field: Field) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3}
    for name in ("temperature", "top_p", "n", "stream", "stop", "seed", "stream_options", "bid", "user"):
        resp = await field.client.post("/v1/chat/completions", json={**body, name: None})
        assert resp.status_code == 200, (name, resp.text)
        assert resp.json()["object"] == "chat.completion"


async def test_an_answer_is_whole_with_a_stop_string_that_never_comes(field: Field) -> None:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 40}
    plain = (await field.client.post("/v1/chat/completions", json=body)).json()
    stopped = (await field.client.post("/v1/chat/completions", json={**body, "stop": [".#@!"]})).json()
    assert stopped["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert stopped["usage"]["cost_credits"] == plain["usage"]["cost_credits"]


async def test_a_long_prompt_is_work_not_a_hang(field: Field, tmp_path: Path) -> None:
    """A router that allows 1 s of silence, and a 900-token prompt the node decodes in 512-token steps of more
    than a second each: the node's keepalives during a step keep the request alive, and the node is not rested."""
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    settings = RouterSettings(
        db=tmp_path / "strict.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[field.node.url],
        health_interval=0.2, node_timeout=1.0,
    )  # fmt: skip
    strict = await RunningServer(create_router(settings)).start()
    admin = httpx.AsyncClient(base_url=strict.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    try:
        for _ in range(100):
            if (await admin.get("/health")).json()["ready"] == 1:
                break
            await asyncio.sleep(0.1)
        key = (await admin.post("/admin/accounts", json={"name": "strict", "deposit": 100_000})).json()["api_key"]
        async with httpx.AsyncClient(base_url=strict.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            for stream in (False, True):
                body = {"prompt": "word " * 900 + str(stream), "max_tokens": 3, "temperature": 0, "stream": stream}
                resp = await c.post("/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
        nodes = (await admin.get("/admin/nodes")).json()["data"]
        assert [n["state"] for n in nodes] == ["ready"]
        books = (await admin.get("/admin/books")).json()
        assert books["balanced"] and books["holds"] == 0
    finally:
        await admin.aclose()
        await strict.stop()


async def test_a_prompt_larger_than_the_context_is_a_400_that_costs_nothing_not_a_402(field: Field) -> None:
    # The hold covers at most the prompt tokens the node's context leaves beside max_tokens: a client with a
    # few thousand credits who sends half a megabyte learns that it does not fit, not that it must pay more.
    made = await field.admin.post("/admin/accounts", json={"name": "modest", "deposit": 5_000})
    headers = {"Authorization": f"Bearer {made.json()['api_key']}"}
    async with httpx.AsyncClient(base_url=field.router.url, headers=headers, timeout=120) as modest:
        huge = {"messages": [{"role": "user", "content": "word " * 100_000}], "max_tokens": 16}
        resp = await modest.post("/v1/chat/completions", json=huge)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded", resp.text
        assert "does not fit the context of 1024 tokens" in resp.json()["error"]["message"]
        too_long = await modest.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1024})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
        assert "holds 1024 tokens per request" in too_long.json()["error"]["message"]
        account = (await modest.get("/v1/account")).json()
        assert (account["balance"], account["held"], account["spent"]) == (5_000, 0, 0)
        usage = (await modest.get("/v1/account/usage")).json()["data"]
        # The node's refusal after the hold: recorded with its code and status, as a refusal before it is.
        assert (
            (usage[-1]["status"], usage[-1]["http_status"]) == ("context_length_exceeded", 400)
            and usage[-1]["held"] <= 5_000
            and usage[-1]["cost_credits"] == 0
        )
