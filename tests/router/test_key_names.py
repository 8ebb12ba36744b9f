"""API key names at the router: given, changed and removed by the operator (admin routes), shown to the
operator and to the key's holder (`/v1/key`, `/v1/account`); a bad name is a 400 that changes nothing."""

from __future__ import annotations

import httpx

from tests.support.herd import Herd


async def test_the_operator_names_renames_and_unnames_a_key_and_its_holder_sees_the_name(herd: Herd) -> None:
    await herd.start()
    admin = herd.admin
    assert admin is not None and herd.router is not None
    await herd.account("alice", 1_000)
    made = await admin.post("/admin/accounts/alice/keys", json={"name": "  ci runner ", "limits": {"rpm_limit": 60}})
    assert made.status_code == 201, made.text
    assert made.json()["key"]["name"] == "ci runner" and made.json()["key"]["limits"]["rpm_limit"] == 60
    api_key = made.json()["api_key"]
    prefix = api_key[:8]
    assert (await admin.get(f"/admin/keys/{prefix}")).json()["name"] == "ci runner"
    listed = (await admin.get("/admin/accounts/alice/keys")).json()["data"]
    assert [k["name"] for k in listed] == [None, "ci runner"]  # the account's first key has none
    watched = (await admin.get("/admin/stats")).json()["keys"]  # the dashboard's keys with a limit
    assert [(k["account"], k["name"]) for k in watched] == [("alice", "ci runner")]

    async with httpx.AsyncClient(base_url=herd.router.url, headers={"Authorization": f"Bearer {api_key}"}) as key:
        shown = (await key.get("/v1/key")).json()
        assert shown["name"] == "ci runner" and shown["prefix"] == prefix and shown["account"] == "alice"
        assert (await key.get("/v1/account")).json()["key"]["name"] == "ci runner"

        renamed = await admin.patch(f"/admin/keys/{prefix}", json={"name": "nightly build"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["name"] == "nightly build" and renamed.json()["limits"]["rpm_limit"] == 60
        assert (await key.get("/v1/key")).json()["name"] == "nightly build"  # at once, for the holder too

        both = await admin.patch(f"/admin/keys/{api_key}", json={"name": "batch", "limits": {"rpm_limit": 5}})
        assert both.status_code == 200 and (both.json()["name"], both.json()["limits"]["rpm_limit"]) == ("batch", 5)
        # Changing only the limits keeps the name.
        limited = await admin.patch(f"/admin/keys/{prefix}", json={"limits": {"tpm_limit": 100}})
        assert limited.json()["name"] == "batch" and limited.json()["limits"]["rpm_limit"] == 5

        removed = await admin.patch(f"/admin/keys/{prefix}", json={"name": None})
        assert removed.status_code == 200 and removed.json()["name"] is None
        assert (await key.get("/v1/key")).json()["name"] is None
        assert (await key.get("/v1/account")).json()["key"]["name"] is None
        await admin.patch(f"/admin/keys/{prefix}", json={"name": "again"})
        assert (await admin.patch(f"/admin/keys/{prefix}", json={"name": "   "})).json()["name"] is None

    # A key made without a body, or with an explicit null name, has none.
    plain = await admin.post("/admin/accounts/alice/keys")
    assert plain.status_code == 201 and plain.json()["key"]["name"] is None
    assert (await admin.post("/admin/accounts/alice/keys", json={"name": None})).json()["key"]["name"] is None


async def test_a_bad_name_or_body_is_a_400_that_changes_nothing(herd: Herd) -> None:
    await herd.start()
    admin = herd.admin
    assert admin is not None
    await herd.account("alice", 1_000)
    made = (await admin.post("/admin/accounts/alice/keys", json={"name": "kept", "limits": {"rpm_limit": 7}})).json()
    prefix = made["api_key"][:8]

    def refused(resp: httpx.Response, param: str | None, words: str) -> bool:
        error = resp.json()["error"]
        return resp.status_code == 400 and error["param"] == param and words in error["message"]

    for name, words in [
        ("x" * 101, "at most 100 characters, got 101"),
        ("two\nlines", "control or invisible characters, got U+000A"),
        ("nul\u0000", "U+0000"),
        ("flip\u202etxt.exe", "U+202E"),
        (42, "must be a string"),
        (["ci"], "must be a string"),
        ({"first": "ci"}, "must be a string"),
        (True, "must be a string"),
    ]:
        resp = await admin.post("/admin/accounts/alice/keys", json={"name": name})
        assert refused(resp, "name", words), (name, resp.text)
        resp = await admin.patch(f"/admin/keys/{prefix}", json={"name": name})
        assert refused(resp, "name", words), (name, resp.text)
    # A lone surrogate, which no database can store, sent as JSON escapes.
    raw = b'{"name": "half \\ud800 a character"}'
    headers = {"Content-Type": "application/json"}
    assert refused(await admin.post("/admin/accounts/alice/keys", content=raw, headers=headers), "name", "U+D800")
    assert refused(await admin.patch(f"/admin/keys/{prefix}", content=raw, headers=headers), "name", "U+D800")

    # A name and a limit together: either one bad and neither changes.
    resp = await admin.patch(f"/admin/keys/{prefix}", json={"name": "new", "limits": {"rpm_limit": 0}})
    assert refused(resp, "limits", "rpm_limit")
    resp = await admin.patch(f"/admin/keys/{prefix}", json={"name": "a\tb", "limits": {"rpm_limit": 9}})
    assert refused(resp, "name", "U+0009")
    resp = await admin.patch(f"/admin/keys/{prefix}", json={"name": "new", "limits": None})
    assert refused(resp, "limits", "send {'limits'")
    resp = await admin.patch(f"/admin/keys/{prefix}", json={"nmae": "new"})
    assert refused(resp, "nmae", "unknown field 'nmae'")
    resp = await admin.patch(f"/admin/keys/{prefix}", json={})
    assert refused(resp, None, "to rename the key")
    assert refused(await admin.patch(f"/admin/keys/{prefix}", json=["name"]), None, "must be a JSON object")
    assert refused(await admin.patch(f"/admin/keys/{prefix}", content=b"{", headers=headers), None, "not valid JSON")

    shown = (await admin.get(f"/admin/keys/{prefix}")).json()
    assert (shown["name"], shown["limits"]["rpm_limit"]) == ("kept", 7)
    assert [k["name"] for k in (await admin.get("/admin/accounts/alice/keys")).json()["data"]] == [None, "kept"]
    missing = await admin.patch("/admin/keys/lk-nokey", json={"name": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"
    assert (await admin.patch("/admin/keys/lk", json={"name": "x"})).status_code == 400
