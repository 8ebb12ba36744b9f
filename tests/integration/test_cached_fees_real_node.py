"""Cached prompt tokens at their own fee with a real node: the count its engine reports (a slot's cells kept from
the turn before) is what the router charges at the cached fee, and another account's same prompt finds nothing
of the first's in the cache and pays in full."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, HERD_TOKEN
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

FEES = {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2, "cached_prompt_token_fee": 1}
SYSTEM = {"role": "system", "content": "You answer questions about the rivers and mountains of Europe. " * 8}
ASK = {"messages": [SYSTEM, {"role": "user", "content": "Name one river."}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
async def herd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    """The operator's client of a router in front of one real node (one slot), and two accounts' keys."""
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node
    from llamakit.router import RouterSettings
    from llamakit.router import create_app as create_router

    tmp: Path = tmp_path_factory.mktemp("cached-fees")
    node = await RunningServer(
        create_node(NodeSettings(slots=1, n_ctx=1024, herd_token=HERD_TOKEN, name="real-node", threads=2))
    ).start()
    settings = RouterSettings(
        db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[node.url], health_interval=0.2
    )
    router = await RunningServer(create_router(settings)).start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    for _ in range(600):
        health = (await admin.get("/health")).json()
        if health["ready"] == 1:
            break
        await asyncio.sleep(0.1)
    assert (await admin.put(f"/admin/fees/{health['models'][0]}", json=FEES)).status_code == 200
    keys = [
        (await admin.post("/admin/accounts", json={"name": name, "deposit": 100_000})).json()["api_key"]
        for name in ("alice", "bob")
    ]
    yield admin, keys[0], keys[1]
    books = (await admin.get("/admin/books")).json()
    assert books["balanced"] and books["holds"] == 0, books
    await admin.aclose()
    await router.stop()
    await node.stop()


async def ask(admin: httpx.AsyncClient, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    resp = await admin.post("/v1/chat/completions", json=ASK, headers=headers)
    assert resp.status_code == 200, resp.text
    usage: dict[str, Any] = resp.json()["usage"]
    return usage


def charge(usage: dict[str, Any], cached: int) -> int:
    fresh = usage["prompt_tokens"] - cached
    return math.ceil(10 + 4 * fresh + 1 * cached + 2 * usage["completion_tokens"])


async def test_a_real_nodes_cached_tokens_are_charged_at_their_fee_and_only_for_the_same_account(
    herd: tuple[httpx.AsyncClient, str, str],
) -> None:
    admin, alice, bob = herd
    first = await ask(admin, alice)
    again = await ask(admin, alice)
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert cached >= again["prompt_tokens"] - 2, again  # the whole prompt but its last token came from the slot
    assert again["cost_credits"] == charge(again, cached)
    assert again["cost_details"]["cache_discount_credits"] == charge(again, 0) - charge(again, cached)
    assert first["cost_credits"] == charge(first, first["prompt_tokens_details"]["cached_tokens"])
    # bob's same prompt on the same slot: alice's cells are not his to reuse, so he pays for every token
    bobs = await ask(admin, bob)
    assert bobs["prompt_tokens_details"]["cached_tokens"] == 0 and bobs["cost_credits"] == charge(bobs, 0)
    assert bobs["cost_credits"] > again["cost_credits"]
