"""Who may do what: API keys, the admin key and the herd token each open their own doors and no others."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from llamakit.router.ledger import ledger_at
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import ADMIN_KEY, Herd

PROMPT = "one two three four"


def _routes(prefix: str) -> list[tuple[str, str]]:
    """(method, path) of every route the router serves under `prefix`, with each {param} filled in. The HEAD
    route aiohttp adds beside each GET is left out: these tests read the error body, which HEAD has none of
    (tests/router/test_auth_by_construction.py tries every route, HEAD too)."""
    app = create_app(RouterSettings(db=":memory:"))
    return [
        (route.method, re.sub(r"\{[^}]+\}", "alice", route.resource.canonical))
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith(prefix) and route.method != "HEAD"
    ]


ADMIN_ROUTES = _routes("/admin/")
HERD_ROUTES = _routes("/herd/")


def test_the_route_tables_are_what_these_tests_cover() -> None:
    # A new admin or herd route is covered by the loops below without a change here; this only checks they loop.
    assert len(ADMIN_ROUTES) >= 17
    assert ("DELETE", "/admin/keys/alice") in ADMIN_ROUTES and ("PATCH", "/admin/keys/alice") in ADMIN_ROUTES
    assert {p for _, p in HERD_ROUTES} == {"/herd/join", "/herd/heartbeat", "/herd/leave"}


async def test_an_api_key_even_a_valid_one_cannot_reach_any_admin_route(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    router = await herd.start()
    alice = await herd.account("alice", 10_000)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as anonymous:
        for method, path in ADMIN_ROUTES:
            for client, headers in (
                (alice, {}),
                (anonymous, {}),
                (anonymous, {"Authorization": "Bearer lk-not-a-key"}),
                (anonymous, {"Authorization": f"Bearer {ADMIN_KEY}x"}),
                (anonymous, {"Authorization": f"Basic {ADMIN_KEY}"}),
            ):
                resp = await client.request(method, path, json={"amount": 5, "name": "x"}, headers=headers)
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.json()["error"]["type"] == "authentication_error"
    # Nothing the refused calls asked for happened.
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000
    assert (await alice.get("/v1/models")).status_code == 200, "alice's key was not revoked"
    assert [a["name"] for a in (await herd.admin.get("/admin/accounts")).json()["data"]] == ["alice"]  # type: ignore[union-attr]


async def test_the_admin_key_opens_the_admin_routes(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    assert herd.admin is not None
    for path in ("/admin/accounts", "/admin/fees", "/admin/nodes", "/admin/stats", "/admin/books", "/admin/usage"):
        resp = await herd.admin.get(path)
        assert resp.status_code == 200, (path, resp.text)
    resp = await herd.admin.post("/admin/accounts", json={"name": "bob", "deposit": 7})
    assert resp.status_code == 201 and resp.json()["balance"] == 7
    assert (await herd.admin.get("/admin/accounts/bob")).json()["balance"] == 7
    # The admin key is not an API key: it cannot buy completions.
    resp = await herd.admin.post("/v1/completions", json={"prompt": PROMPT})
    assert resp.status_code == 401


async def test_herd_routes_refuse_anything_without_the_herd_token(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.add_node(FakeNode("joiner", script=Script(tokens=1)), static=False)
    router = await herd.start()
    alice = await herd.account("alice", 10_000)
    alice_key = alice.headers["Authorization"]
    body = {"url": herd.node_url("joiner"), "name": "joiner", "models": ["fake-model"], "slots": 1}
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
        for method, path in HERD_ROUTES:
            for auth in (None, alice_key, f"Bearer {ADMIN_KEY}", f"Bearer {HERD_TOKEN}-", f"Token {HERD_TOKEN}"):
                headers = {} if auth is None else {"Authorization": auth}
                resp = await client.request(method, path, json={**body, "name": "n1"}, headers=headers)
                assert resp.status_code == 401, (path, auth, resp.text)
        # None of the refused calls changed the herd: n1 is still there, the joiner never got in.
        assert await herd.node_states() == {"n1": "ready"}
        resp = await client.post("/herd/join", json=body, headers={"Authorization": f"Bearer {HERD_TOKEN}"})
        assert resp.status_code == 201
        assert await herd.node_states() == {"n1": "ready", "joiner": "ready"}


async def test_one_accounts_key_never_shows_another_accounts_books(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    bob = await herd.account("bob", 555)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 200
    alice_request = resp.headers["X-Llamakit-Request-Id"]
    assert (await alice.post("/v1/events", json={"kind": "buy", "data": {"secret": "alice-only"}})).status_code == 201
    alice_account = (await alice.get("/v1/account")).json()
    alice_id = alice_account["id"]

    bob_account = (await bob.get("/v1/account")).json()
    assert (bob_account["name"], bob_account["balance"], bob_account["spent"]) == ("bob", 555, 0)
    # Query parameters that name another account are ignored, never obeyed.
    for query in ("", f"?account={alice_id}", "?account=alice", f"?account_id={alice_id}"):
        assert (await bob.get(f"/v1/account{query}")).json()["name"] == "bob"
        assert (await bob.get(f"/v1/account/usage{query}")).json()["data"] == []
        assert (await bob.get(f"/v1/events{query}")).json()["data"] == []
    everything = " ".join(
        [(await bob.get(p)).text for p in ("/v1/account", "/v1/account/usage", "/v1/events", "/v1/info")]
    )
    assert alice_request not in everything and "alice-only" not in everything and "alice" not in everything
    # And alice sees her own.
    assert [u["request_id"] for u in (await alice.get("/v1/account/usage")).json()["data"]] == [alice_request]
    assert [e["data"] for e in (await alice.get("/v1/events")).json()["data"]] == [{"secret": "alice-only"}]


def ledger_files_holding(directory: Path, secret: str) -> list[Path]:
    """The ledger's files (database, WAL, shared memory) whose bytes contain `secret`."""
    files = list(directory.glob("ledger.db*"))
    assert files
    return [file for file in files if secret.encode() in file.read_bytes()]


async def test_the_plaintext_api_key_is_never_stored_logged_or_echoed(
    herd: Herd, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.add_node(FakeNode("broken", script=Script(fail_status=500)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 200)
    key = alice.headers["Authorization"].removeprefix("Bearer ")
    second = (await herd.admin.post("/admin/accounts/alice/keys")).json()["api_key"]
    bodies: list[str] = []
    for method, path, kwargs in [
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": 2}}),  # ok (maybe via failover)
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "max_tokens": 5000}}),  # 402
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "model": "nope"}}),  # 404
        ("POST", "/v1/completions", {"json": {"prompt": PROMPT, "bid": "x"}}),  # 400
        ("POST", "/v1/completions", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v1/chat/completions", {"json": {"messages": "no"}}),  # 400
        ("GET", "/v1/account/usage?limit=x", {}),  # 400
        ("POST", "/v1/events", {"json": {"kind": ""}}),  # 400
        ("GET", "/admin/stats", {}),  # 401
        ("POST", "/herd/join", {"json": {}}),  # 401
        ("GET", "/no/such/route", {}),  # 404
        ("PATCH", "/v1/account", {}),  # 405
    ]:
        resp = await alice.request(method, path, **kwargs)  # type: ignore[arg-type]
        bodies.append(resp.text)
        if resp.status_code >= 400:
            assert "error" in resp.json(), (path, resp.text)
    # A wrong key that is *almost* right is not echoed either.
    resp = await alice.get("/v1/account", headers={"Authorization": f"Bearer {key[:-1]}"})
    assert resp.status_code == 401
    bodies.append(resp.text)
    stats = (await herd.admin.get("/admin/stats")).text
    keys = (await herd.admin.get("/admin/accounts/alice")).text + (await herd.admin.get("/admin/usage")).text
    # Stop the router so the ledger is closed and its WAL checkpointed into the file; the books are then
    # checked below rather than by the fixture, which needs a running router.
    await herd.admin.aclose()
    await herd.router.stop()  # type: ignore[union-attr]
    herd.router = herd.admin = None

    for secret in (key, second, key[:-1]):
        for body in [*bodies, stats, keys]:
            assert secret not in body
        assert secret not in caplog.text
        assert ledger_files_holding(tmp_path, secret) == []
    assert "POST /v1/completions" in caplog.text, "the access log was captured"

    async with ledger_at(tmp_path / "ledger.db") as ledger:
        books = await ledger.books()
        assert books.balanced and books.holds == 0
        account = await ledger.account_by_name("alice")
        assert await ledger.authenticate(key) == account and await ledger.authenticate(second) == account


async def test_a_revoked_key_stops_working_and_the_others_do_not(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 10_000)
    key = alice.headers["Authorization"].removeprefix("Bearer ")
    second = (await herd.admin.post("/admin/accounts/alice/keys")).json()["api_key"]
    bob = await herd.account("bob", 10_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})).status_code == 200

    resp = await herd.admin.delete(f"/admin/keys/{key[:8]}")
    assert resp.status_code == 200 and resp.json() == {"revoked": 1}
    for method, path in (("GET", "/v1/account"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        resp = await alice.request(method, path, json={"prompt": PROMPT, "max_tokens": 1})
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"
    # Revoking again finds nothing; the account's other key and other accounts still work.
    assert (await herd.admin.delete(f"/admin/keys/{key[:8]}")).status_code == 404
    resp = await alice.get("/v1/account", headers={"Authorization": f"Bearer {second}"})
    assert resp.status_code == 200 and resp.json()["name"] == "alice"
    assert (await bob.get("/v1/account")).status_code == 200
    # The account and its money are untouched by the revocation.
    assert resp.json()["balance"] == 10_000 - resp.json()["spent"] and resp.json()["spent"] > 0
