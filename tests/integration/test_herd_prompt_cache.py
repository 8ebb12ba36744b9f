"""Two real nodes behind a real router: a conversation's next turn goes back to the node whose slot holds its
history, and that node decodes only the new turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, HERD_TOKEN
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

SYSTEM = {"role": "system", "content": "You are a helpful assistant that answers questions about geography. " * 10}


@pytest.fixture(scope="module")
async def two_nodes(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A funded client and the operator's, of a router in front of two real nodes."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("two-nodes")
    nodes = [
        await RunningServer(
            create_node(NodeSettings(slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name=name, threads=1))
        ).start()
        for name in ("n-a", "n-b")
    ]
    settings = RouterSettings(
        db=tmp / "ledger.db",
        admin_key=ADMIN_KEY,
        herd_token=HERD_TOKEN,
        nodes=[n.url for n in nodes],
        health_interval=0.2,
    )
    router = await RunningServer(create_router(settings)).start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    for _ in range(600):
        if (await admin.get("/health")).json()["ready"] == 2:
            break
        await asyncio.sleep(0.1)
    key = (await admin.post("/admin/accounts", json={"name": "chatter", "deposit": 1_000_000})).json()["api_key"]
    client = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    yield client, admin
    await client.aclose()
    books = (await admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0, books
    await admin.aclose()
    await router.stop()
    for node in nodes:
        await node.stop()


async def chat(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> tuple[str, dict[str, Any], str]:
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    return resp.headers["X-Llamakit-Node"], answer["usage"], answer["choices"][0]["message"]["content"]


async def idle(admin: httpx.AsyncClient) -> None:
    """Wait until the router sees no request running on any node."""
    for _ in range(600):
        if all(n["busy"] == 0 for n in (await admin.get("/admin/nodes")).json()["data"]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the nodes stayed busy")


async def test_the_next_turn_goes_to_the_node_that_holds_the_history(
    two_nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    client, admin = two_nodes
    # Keep n-a (first by name when both are idle) busy, so that the first turn is served by n-b.
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as story:
        assert story.headers["X-Llamakit-Node"] == "n-a"
        lines = story.aiter_lines()
        while not (await anext(lines)).startswith("data: "):
            pass
        first = [SYSTEM, {"role": "user", "content": "What is the capital of Peru?"}]
        node, usage, answer = await chat(client, first)
        assert node == "n-b"
    # Both nodes are free now, and n-a would win the tie; the history is on n-b.
    await idle(admin)
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Chile?"}]
    node, usage2, _ = await chat(client, second)
    assert node == "n-b"
    cached = usage2["prompt_tokens_details"]["cached_tokens"]
    assert cached >= usage["prompt_tokens"], "the whole first turn came from n-b's cache"
    assert usage2["prompt_tokens"] > cached, "the new turn was decoded"
