"""Cached prompt tokens at their own fee with a real node: the count its engine reports (a slot's cells kept from
the turn before) is what the router charges at the cached fee, for a whole answer and for a stream its client cut
(from the running counts of its token chunks), and another account's same prompt finds nothing of the first's in
the cache and pays in full."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamakit.money.fees import FeeSchedule
from llamakit.router.ledger import Account
from llamakit.router.paid.request import PaidRequest
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


async def test_a_stream_its_client_cut_pays_the_cached_fee_for_the_prefix_the_node_reused(
    herd: tuple[httpx.AsyncClient, str, str],
) -> None:
    admin, alice, _ = herd
    headers = {"Authorization": f"Bearer {alice}"}
    long = {"role": "user", "content": "Name every river of Europe you know, one per line."}
    body = {"messages": [SYSTEM, long], "temperature": 0}
    warm = await admin.post("/v1/chat/completions", json={**body, "max_tokens": 2}, headers=headers)
    assert warm.status_code == 200, warm.text
    read = 0
    async with admin.stream(
        "POST", "/v1/chat/completions", json={**body, "max_tokens": 300, "stream": True}, headers=headers
    ) as resp:
        request_id = resp.headers["X-Llamakit-Request-Id"]
        async for line in resp.aiter_lines():
            read += line.startswith("data: {") and '"content":"' in line and '"content":""' not in line
            if read == 3:
                break  # the client cuts the stream after three tokens
    for _ in range(600):
        record = next((r for r in (await admin.get("/admin/usage")).json()["data"] if r["request_id"] == request_id),
                      None)  # fmt: skip
        if record is not None:
            break
        await asyncio.sleep(0.05)
    assert record is not None and record["status"] == "cut", record
    prompt, cached, delivered = record["prompt_tokens"], record["cached_tokens"], record["completion_tokens"]
    assert 3 <= delivered < 300
    assert cached >= prompt - 2, record  # all of the warm request's prompt but its last token, from the slot
    paid = PaidRequest(
        id=request_id, account=Account(1, "alice", "user", 0, 0.0), model=record["model"], path="/v1/chat/completions",
        body={}, bid=Decimal(1), fees=FeeSchedule.from_dict(FEES), held=record["held"], stream=True,
        include_usage=False, arrived=0.0,
    )  # fmt: skip
    assert record["cost_credits"] == paid.charge(prompt, delivered, cached) == charge(record, cached)
    assert record["cache_discount_credits"] == paid.charge(prompt, delivered) - paid.charge(prompt, delivered, cached)
    assert record["cache_discount_credits"] == 3 * cached > 0
