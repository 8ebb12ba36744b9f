"""A herd of both kinds of node behind a real router: a node of llama-cpp-python and a node in front of llama.cpp's
own llama-server (the real one, see tests/support/llama_server.py). Paid requests served by the llama-server
node are charged for exactly the tokens llama-server counted; a client that leaves frees llama-server's slot; a
llama-server killed under a request sends it to the other node; the books balance throughout."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, HERD_TOKEN
from tests.support.llama_server import (
    LlamaServer,
    ended_on_eog,
    llama_server_or_skip,
    reported_usage,
    running_llama_server,
    spying,
    until_idle,
    until_processing,
)
from tests.support.ports import free_port
from tests.support.servers import PinnedServer, RunningServer

pytestmark = pytest.mark.model

FEES = {"base_fee": 10, "prompt_token_fee": 3, "completion_token_fee": 5}
LLAMA_SERVER_NODE, PYTHON_NODE = "llama-server-node", "python-node"
ENDLESS = "root ::= [a-z ]{300,}"  # no answer ends before 300 characters: one that is shorter was stopped


@dataclass
class MixedHerd:
    api: httpx.AsyncClient  # an account's client of the router
    admin: httpx.AsyncClient
    upstream: LlamaServer
    llama_server_node: RunningServer


@pytest.fixture(scope="module")
async def herd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MixedHerd]:
    binary = llama_server_or_skip()
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.node.llama_server_app import create_app as create_llama_server_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("llama-server-herd")
    with running_llama_server(binary, slots=2, n_ctx=1024) as upstream:
        # One slot here and two there: an idle router prefers the llama-server node (more free slots).
        python_node = await RunningServer(
            create_node(NodeSettings(slots=1, n_ctx=1024, herd_token=HERD_TOKEN, name=PYTHON_NODE, threads=1))
        ).start()
        settings = RouterSettings(
            db=tmp / "ledger.db",
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=[python_node.url],
            health_interval=0.2,
        )
        router = await RunningServer(create_router(settings)).start()
        port = free_port()  # the llama-server node joins the router itself, as any node with --router does
        llama_server_node = await PinnedServer(
            create_llama_server_node(
                NodeSettings(
                    llama_server=upstream.url,
                    llama_server_api_key=upstream.api_key,
                    herd_token=HERD_TOKEN,
                    name=LLAMA_SERVER_NODE,
                    router=router.url,
                    public_url=f"http://127.0.0.1:{port}",
                    heartbeat_seconds=0.2,
                )
            ),
            port,
        ).start()
        admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        for _ in range(1200):
            health = (await admin.get("/health")).json()
            if health["ready"] == 2:
                break
            await asyncio.sleep(0.05)
        assert health["ready"] == 2, health
        assert (await admin.put(f"/admin/fees/{health['models'][0]}", json=FEES)).status_code == 200
        key = (await admin.post("/admin/accounts", json={"name": "mixed", "deposit": 1_000_000})).json()["api_key"]
        api = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        yield MixedHerd(api, admin, upstream, llama_server_node)
        books = (await admin.get("/admin/books")).json()
        assert books["balanced"] and books["holds"] == 0, books
        for client in (api, admin):
            await client.aclose()
        await router.stop()
        await llama_server_node.stop()
        await python_node.stop()


def charge(usage: dict[str, Any]) -> int:
    """What FEES charge for `usage` at bid 1 (no fee of its own for cached prompt tokens: they cost as others)."""
    return math.ceil(FEES["base_fee"] + FEES["prompt_token_fee"] * usage["prompt_tokens"]
                     + FEES["completion_token_fee"] * usage["completion_tokens"])  # fmt: skip


async def balance(herd: MixedHerd) -> int:
    account: dict[str, Any] = (await herd.api.get("/v1/account")).json()
    value: int = account["balance"]
    return value


async def test_a_paid_chat_served_by_llama_server_is_charged_for_the_tokens_it_counted(herd: MixedHerd) -> None:
    before = await balance(herd)
    ask = {"messages": [{"role": "user", "content": "Name a river in France."}], "max_tokens": 8, "temperature": 0}
    async with spying(herd.llama_server_node) as seen:
        resp = await herd.api.post("/v1/chat/completions", json=ask)
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Llamakit-Node"] == LLAMA_SERVER_NODE
    usage, counted = resp.json()["usage"], reported_usage(seen)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        counted["prompt_tokens"],
        counted["completion_tokens"],
    )
    assert usage["prompt_tokens_details"]["cached_tokens"] == counted["prompt_tokens_details"]["cached_tokens"]
    assert usage["cost_credits"] == int(resp.headers["X-Llamakit-Cost-Credits"]) == charge(counted)
    assert before - await balance(herd) == charge(counted)
    print(f"\nwhole: {resp.headers['X-Llamakit-Node']} usage {usage} llama-server counted {counted}")


async def test_a_paid_stream_served_by_llama_server_is_charged_for_the_tokens_it_counted(herd: MixedHerd) -> None:
    before = await balance(herd)
    ask = {
        "messages": [{"role": "user", "content": "Name a mountain in Italy."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        spying(herd.llama_server_node) as seen,
        herd.api.stream("POST", "/v1/chat/completions", json=ask) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["X-Llamakit-Node"] == LLAMA_SERVER_NODE
        events = [json.loads(line[6:]) for line in [x async for x in resp.aiter_lines()] if line.startswith("data: {")]
    usage, counted = events[-1]["usage"], reported_usage(seen)
    assert all("llamakit" not in e for e in events)  # the node's running counts are the router's alone
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        counted["prompt_tokens"],
        counted["completion_tokens"],
    )
    assert usage["cost_credits"] == charge(counted)
    assert before - await balance(herd) == charge(counted)
    print(f"\nstream: usage {usage} llama-server counted {counted}")


async def test_a_client_that_leaves_a_paid_stream_frees_llama_servers_slot(herd: MixedHerd) -> None:
    before = await balance(herd)
    ask = {"prompt": "Letters:", "max_tokens": 400, "grammar": ENDLESS, "stream": True}
    async with herd.api.stream("POST", "/v1/completions", json=ask) as resp:
        assert resp.headers["X-Llamakit-Node"] == LLAMA_SERVER_NODE
        request_id = resp.headers["X-Llamakit-Request-Id"]
        pieces = 0
        async for line in resp.aiter_lines():
            pieces += line.startswith("data: {")
            if pieces == 3:
                break
    assert await until_idle(herd.upstream) == []  # llama-server stopped: its slot is free
    for _ in range(500):  # the router settles once its relay has seen the client go
        record = (await herd.api.get("/v1/account/usage")).json()["data"][0]
        if record["request_id"] == request_id:
            break
        await asyncio.sleep(0.02)
    assert record["request_id"] == request_id and record["status"] == "cut", record
    assert 0 < record["completion_tokens"] < 300  # stopped long before the grammar let it end
    assert before - await balance(herd) == record["cost_credits"] == charge(record)


async def test_a_paid_stream_cut_on_llama_server_pays_the_cached_fee_for_what_its_cache_held(
    herd: MixedHerd,
) -> None:
    model = (await herd.admin.get("/health")).json()["models"][0]
    cheaper = {**FEES, "cached_prompt_token_fee": 1}
    assert (await herd.admin.put(f"/admin/fees/{model}", json=cheaper)).status_code == 200
    try:
        ask = {"prompt": "Letters of the alphabet, in order, " * 8, "grammar": ENDLESS}
        warm = await herd.api.post("/v1/completions", json={**ask, "max_tokens": 2})
        assert warm.headers["X-Llamakit-Node"] == LLAMA_SERVER_NODE
        async with herd.api.stream("POST", "/v1/completions", json={**ask, "max_tokens": 400, "stream": True}) as resp:
            assert resp.headers["X-Llamakit-Node"] == LLAMA_SERVER_NODE
            request_id = resp.headers["X-Llamakit-Request-Id"]
            pieces = 0
            async for line in resp.aiter_lines():
                pieces += line.startswith("data: {")
                if pieces == 3:
                    break
        for _ in range(500):
            record = (await herd.api.get("/v1/account/usage")).json()["data"][0]
            if record["request_id"] == request_id:
                break
            await asyncio.sleep(0.02)
        assert record["request_id"] == request_id and record["status"] == "cut", record
        cached = record["cached_tokens"]
        assert cached >= record["prompt_tokens"] - 2, record  # the warm request's prompt, but its last token
        fresh = record["prompt_tokens"] - cached
        assert record["cost_credits"] == 10 + 3 * fresh + 1 * cached + 5 * record["completion_tokens"]
        assert record["cache_discount_credits"] == 2 * cached
    finally:
        assert (await herd.admin.put(f"/admin/fees/{model}", json=FEES)).status_code == 200


async def test_an_answer_that_ends_on_its_end_token_is_counted_alike_by_both_kinds_of_node(herd: MixedHerd) -> None:
    """llama-server counts the end-of-generation token among the completion tokens; the node in front of it takes
    it off, as the other kind of node never counts it: the same answer costs the same on either node."""
    ask = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 60, "temperature": 0}
    answers = {}
    for serving, drained in ((LLAMA_SERVER_NODE, PYTHON_NODE), (PYTHON_NODE, LLAMA_SERVER_NODE)):
        assert (await herd.admin.post(f"/admin/nodes/{drained}/drain")).status_code == 200
        try:
            async with spying(herd.llama_server_node) as seen:
                resp = await herd.api.post("/v1/chat/completions", json=ask)
        finally:
            assert (await herd.admin.post(f"/admin/nodes/{drained}/undrain")).status_code == 200
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Llamakit-Node"] == serving
        body = resp.json()
        assert body["choices"][0]["finish_reason"] == "stop"  # it ended on the end token, well before 60
        answers[serving] = (body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"])
        if serving == LLAMA_SERVER_NODE:
            assert ended_on_eog(seen)
            raw = next(e["usage"] for e in seen if e.get("usage"))
            assert body["usage"]["completion_tokens"] == raw["completion_tokens"] - 1
            assert int(resp.headers["X-Llamakit-Cost-Credits"]) == charge(body["usage"])
    (text, counted), (python_text, python_counted) = answers[LLAMA_SERVER_NODE], answers[PYTHON_NODE]
    # Both kinds of node run the same llama.cpp at temperature 0; where their floats agree on the answer (a prompt
    # read in other batches can round otherwise), they agree on its tokens.
    if text == python_text:
        assert counted == python_counted
    print(f"\nend token: llama-server node {answers[LLAMA_SERVER_NODE]}, python node {answers[PYTHON_NODE]}")


async def test_a_llama_server_killed_under_a_request_sends_it_to_the_other_node(herd: MixedHerd) -> None:
    before = await balance(herd)
    ask = {"prompt": "Letters:", "max_tokens": 60, "grammar": ENDLESS}
    answer = asyncio.create_task(herd.api.post("/v1/completions", json=ask))
    await until_processing(herd.upstream)
    herd.upstream.kill()
    resp = await answer
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Llamakit-Node"] == PYTHON_NODE  # failed over: nothing was delivered yet
    usage = resp.json()["usage"]
    assert usage["completion_tokens"] == 60 and before - await balance(herd) == charge(usage)
    for _ in range(500):  # the router's health check finds the llama-server node out of work
        nodes = (await herd.admin.get("/admin/stats")).json()["nodes"]
        state = {n["name"]: n for n in nodes}[LLAMA_SERVER_NODE]
        if state["state"] != "up":
            break
        await asyncio.sleep(0.02)
    assert state["state"] != "up", state
