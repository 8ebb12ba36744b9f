"""Cached prompt fees and model fallbacks with several routers on one PostgreSQL database: the cluster's dispatcher
refuses a model as the local one does, so a request goes on to its next model, and the ledger's settlement (the
database's own llamakit_close) keeps the served model, what was passed over and what the cache saved."""

from __future__ import annotations

from tests.scaleout.conftest import Routers
from tests.support.fake_node import FakeNode, Script

FEES = {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2, "cached_prompt_token_fee": 1}
BIG = {"base_fee": 100, "prompt_token_fee": 5, "completion_token_fee": 10}
PROMPT = "one two three four five six seven eight"  # 11 prompt tokens at the fake node
FIRST, AGAIN = 10 + 4 * 11 + 2 * 5, 10 + 4 * 3 + 1 * 8 + 2 * 5


async def test_a_fallback_and_a_cached_prompt_at_another_router(routers: Routers) -> None:
    await routers.add_node(FakeNode("n1", script=Script(tokens=5, cache=True)))
    a, b = await routers.start_router(), await routers.start_router()
    await routers.join(a, "n1")
    for url in (a, b):
        await routers.wait_nodes(url, {"n1": "ready"})
        admin = routers.admin(url)  # fees live in each router's memory
        assert (await admin.put("/admin/fees/fake-model", json=FEES)).status_code == 200
        assert (await admin.put("/admin/fees/big", params={"unserved": "true"}, json=BIG)).status_code == 200
    key = await routers.account("alice", 100_000)
    at_a, at_b = routers.client(a, key), routers.client(b, key)
    ask = {"prompt": PROMPT, "max_tokens": 5, "models": ["big", "fake-model"]}
    first = (await at_a.post("/v1/completions", json=ask)).json()
    again = (await at_b.post("/v1/completions", json=ask)).json()
    for answer in (first, again):
        assert answer["model"] == "fake-model" and [p["reason"] for p in answer["passed_over"]] == ["no_node"]
    assert (first["usage"]["cost_credits"], again["usage"]["cost_credits"]) == (FIRST, AGAIN)
    assert again["usage"]["cost_details"]["cache_discount_credits"] == FIRST - AGAIN
    records = (await at_b.get("/v1/account/usage")).json()["data"]
    assert [(r["model"], r["cost_credits"], r["cached_tokens"], r["cache_discount_credits"]) for r in records] == [
        ("fake-model", AGAIN, 8, FIRST - AGAIN), ("fake-model", FIRST, 0, 0),
    ]  # fmt: skip
    assert all([p["model"] for p in r["passed_over"]] == ["big"] for r in records)
    stats = (await routers.admin(a).get("/admin/stats")).json()
    assert (stats["fees"]["cached_tokens"], stats["fees"]["cache_discount"]) == (8, FIRST - AGAIN)  # herd-wide
    books = await routers.books()
    assert books["balanced"] and books["charges"] == FIRST + AGAIN
