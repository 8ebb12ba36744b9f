"""The operator's paged lists (accounts, keys with limits, nodes) and a snapshot that does not grow with tenants."""

from __future__ import annotations

from typing import Any

import httpx

from llamakit.router.stats import TOP_ACCOUNTS
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

ASK = {"prompt": "hello", "max_tokens": 2}


async def every_page(admin: httpx.AsyncClient, path: str, **params: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    after: str | None = None
    while True:
        query = {**params, **({"after": after} if after else {})}
        page = (await admin.get(path, params=query)).json()
        pages.append(page["data"])
        if not page["has_more"]:
            assert page["next_after"] is None
            return pages
        after = page["next_after"]


async def test_accounts_keys_and_nodes_come_a_page_at_a_time(herd: Herd) -> None:
    for name in ("n1", "n2", "n3"):
        await herd.add_node(FakeNode(name, script=Script(tokens=2)))
    await herd.start()
    admin = herd.admin
    assert admin is not None
    for i in range(7):
        made = await admin.post("/admin/accounts", json={"name": f"acct-{i}", "deposit": 1000,
                                                          "limits": {"rpm_limit": 60 + i}})  # fmt: skip
        assert made.status_code == 201
    spenders = []
    for name, requests in (("big", 3), ("small", 1)):
        client = await herd.account(name, 100_000)
        for _ in range(requests):
            assert (await client.post("/v1/completions", json=ASK)).status_code == 200
        spenders.append(client)

    pages = await every_page(admin, "/admin/accounts", limit="3")
    assert [len(p) for p in pages] == [3, 3, 3]
    names = [a["name"] for p in pages for a in p]
    assert names == sorted([f"acct-{i}" for i in range(7)] + ["big", "small"])
    big = next(a for p in pages for a in p if a["name"] == "big")
    assert big["today"]["requests"] == 3 and big["today"]["spent"] == big["spent"] > 0
    assert big["deposited"] == 100_000 and big["balance"] == 100_000 - big["spent"] and big["last_seen"]
    found = (await admin.get("/admin/accounts", params={"search": "ACCT-3"})).json()["data"]
    assert [a["name"] for a in found] == ["acct-3"]
    by_spend = await every_page(admin, "/admin/accounts", order="spent_today", limit="1")
    assert [a["name"] for p in by_spend for a in p] == ["big", "small"]
    assert (await admin.get("/admin/accounts", params={"order": "balance"})).status_code == 400
    assert (await admin.get("/admin/accounts", params={"order": "spent_today", "after": "x"})).status_code == 400
    assert (await admin.get("/admin/accounts", params={"limit": "0"})).status_code == 400

    keys = await every_page(admin, "/admin/keys", limit="4")
    assert [len(p) for p in keys] == [4, 3]
    assert sorted(k["limits"]["rpm_limit"] for p in keys for k in p) == [60 + i for i in range(7)]
    assert [k["account"] for k in (await admin.get("/admin/keys", params={"search": "acct-5"})).json()["data"]] == [
        "acct-5"
    ]
    assert (await admin.get("/admin/keys", params={"after": "nonsense"})).status_code == 400

    nodes = await every_page(admin, "/admin/nodes", limit="2")
    assert [[n["name"] for n in p] for p in nodes] == [["n1", "n2"], ["n3"]]
    assert [n["name"] for n in (await admin.get("/admin/nodes", params={"search": "2"})).json()["data"]] == ["n2"]
    assert len((await admin.get("/admin/nodes")).json()["data"]) == 3  # no limit: the whole herd, as before

    stats = (await admin.get("/admin/stats")).json()
    assert [a["name"] for a in stats["accounts"][:2]] == ["big", "small"]  # today's biggest spenders first
    assert stats["counts"]["accounts"] == 9 and stats["counts"]["accounts_active_today"] == 2
    assert stats["today"]["requests"] == 4 and stats["today"]["accounts"] == 2
    for client in spenders:
        await client.aclose()


async def test_the_snapshot_carries_the_top_accounts_not_every_one(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    admin = herd.admin
    assert admin is not None
    for i in range(TOP_ACCOUNTS + 10):
        assert (await admin.post("/admin/accounts", json={"name": f"idle-{i:03d}"})).status_code == 201
    spender = await herd.account("zz-spender", 10_000)  # last by name: shown for what it spent today
    assert (await spender.post("/v1/completions", json=ASK)).status_code == 200
    stats = (await admin.get("/admin/stats")).json()
    assert len(stats["accounts"]) == TOP_ACCOUNTS
    assert stats["accounts"][0]["name"] == "zz-spender" and stats["accounts"][0]["requests"] == 1
    assert stats["counts"]["accounts"] == TOP_ACCOUNTS + 11
    assert stats["counts"]["accounts_shown"] == TOP_ACCOUNTS
    await spender.aclose()
