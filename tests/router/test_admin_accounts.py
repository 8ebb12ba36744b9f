"""The admin routes find an account by id or by name; a number too large to be an id is a 404, never a 500."""

from __future__ import annotations

import pytest

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

HUGE = [
    "999999999999999999999999999999",  # past SQLite's 2^63
    "9999999999999999999999",
    str(10**15 + 1),  # past the largest id the ledger takes
    "9" * 5000,  # past the digits Python converts to an int
    "²",  # a digit, but not an ASCII one
]


@pytest.mark.parametrize("ref", HUGE)
async def test_a_number_that_cannot_be_an_id_is_account_not_found(herd: Herd, ref: str) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    await herd.account("alice", 100)
    for method, path, body in [
        ("GET", f"/admin/accounts/{ref}", None),
        ("GET", f"/admin/accounts/{ref}/keys", None),
        ("POST", f"/admin/accounts/{ref}/keys", {}),
        ("POST", f"/admin/accounts/{ref}/deposits", {"amount": 5}),
        ("GET", f"/admin/usage?account={ref}", None),
    ]:
        resp = await herd.admin.request(method, path, json=body)
        assert resp.status_code == 404, (method, path[:60], resp.text)
        assert resp.json()["error"]["code"] == "account_not_found", resp.text
    assert (await herd.books())["deposits"] == 100


async def test_usage_takes_an_account_id_or_name(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 10_000)
    bob = await herd.account("bob", 10_000)
    # A name of digits too long to be an id is a name.
    digits = await herd.account("12345678901234567890", 10_000)
    try:
        body = {"prompt": "one", "max_tokens": 1}
        for client, times in ((alice, 1), (bob, 2), (digits, 3)):
            for _ in range(times):
                assert (await client.post("/v1/completions", json=body)).status_code == 200
        ids = {a["name"]: a["id"] for a in (await herd.admin.get("/admin/accounts")).json()["data"]}
        assert ids["bob"] == 2
        for ref, name, count in [
            ("2", "bob", 2),
            ("bob", "bob", 2),
            (str(ids["alice"]), "alice", 1),
            ("12345678901234567890", "12345678901234567890", 3),
        ]:
            resp = await herd.admin.get("/admin/usage", params={"account": ref})
            assert resp.status_code == 200, resp.text
            assert [r["account"] for r in resp.json()["data"]] == [name] * count
        resp = await herd.admin.get("/admin/accounts/12345678901234567890")
        assert resp.status_code == 200 and resp.json()["name"] == "12345678901234567890"
        missing = await herd.admin.get("/admin/usage", params={"account": "99"})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "account"
    finally:
        for client in (alice, bob, digits):
            await client.aclose()
