"""Per-key limits at the router: spend caps (402), rates and concurrency (429 with Retry-After), expiry (401),
allowed models (403); nothing held or queued for a refusal; limits and use visible to the key's holder."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.router.test_refusals_and_metrics import samples, value
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

ASK = {"prompt": "one two three four", "max_tokens": 2}


async def key_client(
    herd: Herd, account: str, limits: dict[str, Any] | None, deposit: int = 1_000_000
) -> httpx.AsyncClient:
    """A new key of `account` (made with `deposit` if it does not exist) with `limits`."""
    assert herd.admin is not None and herd.router is not None
    if (await herd.admin.get(f"/admin/accounts/{account}")).status_code == 404:
        await herd.account(account, deposit)
    resp = await herd.admin.post(f"/admin/accounts/{account}/keys", json={"limits": limits})
    assert resp.status_code == 201, resp.text
    assert resp.json()["key"]["limits"] == {**NO_LIMITS, **(limits or {})}
    return httpx.AsyncClient(
        base_url=herd.router.url, headers={"Authorization": f"Bearer {resp.json()['api_key']}"}, timeout=30
    )


NO_LIMITS = dict.fromkeys(
    ["spend_cap", "spend_cap_day", "spend_cap_month", "rpm_limit", "tpm_limit", "max_parallel_requests", "expires_at",
     "models"]
)  # fmt: skip


def key_prefix_of(client: httpx.AsyncClient) -> str:
    return str(client.headers["Authorization"]).removeprefix("Bearer ")[:8]


async def assert_nothing_held(herd: Herd) -> None:
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0, books


async def test_a_key_spends_up_to_its_cap_and_then_gets_402_with_needed_and_the_cap(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "alice", {"spend_cap": 300})
    statuses = []
    for _ in range(60):
        resp = await client.post("/v1/completions", json=ASK)
        statuses.append(resp.status_code)
        if resp.status_code != 200:
            break
    refused = resp.json()["error"]
    assert statuses[-1] == 402 and set(statuses[:-1]) == {200}, statuses
    assert refused["code"] == "spend_cap_exceeded" and refused["cap"] == 300 and refused["period"] == "total"
    assert "spend cap of 300 credits" in refused["message"] and refused["needed"] > refused["available"]
    key = (await client.get("/v1/key")).json()
    spent = key["spend"]["total"]
    assert 0 < spent <= 300 and key["spend"]["held"] == 0 and key["remaining"]["total"] == 300 - spent
    account = (await client.get("/v1/account")).json()
    assert account["spent"] == spent and account["key"]["limits"]["spend_cap"] == 300
    usage = (await client.get("/v1/account/usage")).json()["data"]
    assert usage[0]["status"] == "spend_cap_exceeded" and usage[0]["http_status"] == 402
    assert {u["key_prefix"] for u in usage} == {key_prefix_of(client)}  # refusals and charges alike
    assert sum(u["cost_credits"] for u in usage) == spent
    await assert_nothing_held(herd)

    # The operator raises the cap: the same key goes on at once.
    prefix = key["prefix"]
    raised = await herd.admin.patch(f"/admin/keys/{prefix}", json={"limits": {"spend_cap": 1000}})  # type: ignore[union-attr]
    assert raised.status_code == 200 and raised.json()["limits"]["spend_cap"] == 1000
    assert (await client.post("/v1/completions", json=ASK)).status_code == 200


async def test_over_requests_per_minute_a_key_gets_429_with_retry_after_and_nothing_is_held(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "alice", {"rpm_limit": 3})
    other = await key_client(herd, "alice", None)  # the account's other key has no limit
    for _ in range(3):
        assert (await client.post("/v1/completions", json=ASK)).status_code == 200
    before = len(node.received)
    resp = await client.post("/v1/completions", json=ASK)
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["limit"] == "rpm_limit" and error["limit_value"] == 3
    assert "3 requests per minute (rpm_limit)" in error["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert len(node.received) == before
    assert (await other.post("/v1/completions", json=ASK)).status_code == 200
    counted = await samples(herd)
    assert value(counted, "llamakit_router_refusals_total", status="429", code="rate_limit_exceeded") == 1
    assert value(counted, "llamakit_router_refusals_total", status="402", code="spend_cap_exceeded") == 0
    assert "rates" not in (await other.get("/v1/key")).json()  # a key without a rate limit is not counted
    rates = (await client.get("/v1/key")).json()["rates"]
    assert rates == {
        "requests_last_minute": 3,
        "tokens_last_minute": rates["tokens_last_minute"],
        "requests_in_flight": 0,
    }
    await assert_nothing_held(herd)


async def test_over_tokens_per_minute_a_key_gets_429_naming_the_limit(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "alice", {"tpm_limit": 5})
    first = (await client.post("/v1/completions", json=ASK)).json()
    assert first["usage"]["total_tokens"] >= 5
    resp = await client.post("/v1/completions", json=ASK)
    assert resp.status_code == 429 and resp.json()["error"]["limit"] == "tpm_limit"
    assert "5 tokens per minute (tpm_limit)" in resp.json()["error"]["message"]
    assert (await client.get("/v1/key")).json()["rates"]["tokens_last_minute"] == first["usage"]["total_tokens"]


async def test_requests_sent_together_count_their_max_tokens_against_tokens_per_minute(herd: Herd) -> None:
    # Before, only finished requests counted: 20 sent at once were all let in, 5 times over the limit.
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=32, script=Script(tokens=40, gate=gate)))
    await herd.start()
    client = await key_client(herd, "alice", {"tpm_limit": 100})
    body = {"prompt": "one two", "max_tokens": 40}
    sent = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(20)]
    for _ in range(200):
        if sum(t.done() for t in sent) + len(node.received) == 20:
            break
        await asyncio.sleep(0.02)
    gate.set()
    answers = await asyncio.gather(*sent)
    served = [a for a in answers if a.status_code == 200]
    refused = [a.json()["error"] for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 20 and 1 <= len(served) <= 2, [a.status_code for a in answers]
    assert all(e["limit"] == "tpm_limit" and "requests in flight" in e["message"] for e in refused), refused[:1]
    used = sum(a.json()["usage"]["total_tokens"] for a in served)
    assert (await client.get("/v1/key")).json()["rates"]["tokens_last_minute"] == used
    await assert_nothing_held(herd)


async def test_a_key_over_its_concurrent_requests_gets_429_until_one_finishes(herd: Herd) -> None:
    gate = asyncio.Event()
    node = await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=1, gate=gate)))
    await herd.start()
    client = await key_client(herd, "alice", {"max_parallel_requests": 2})
    running = [asyncio.create_task(client.post("/v1/completions", json=ASK)) for _ in range(2)]
    for _ in range(100):
        if len(node.received) == 2:
            break
        await asyncio.sleep(0.02)
    third = await client.post("/v1/completions", json={**ASK, "stream": True})
    assert third.status_code == 429 and third.json()["error"]["limit"] == "max_parallel_requests"
    assert third.headers["Retry-After"] == "1"
    assert (await client.get("/v1/key")).json()["rates"]["requests_in_flight"] == 2
    gate.set()
    assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200]
    assert (await client.post("/v1/completions", json=ASK)).status_code == 200
    assert len(node.received) == 3


async def test_an_expired_key_gets_401_and_a_model_not_allowed_403(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "alice", {"models": ["fake-model"], "expires_at": time.time() + 3600})
    assert (await client.post("/v1/completions", json=ASK)).status_code == 200
    narrow = await key_client(herd, "alice", {"models": ["another-model"]})
    resp = await narrow.post("/v1/completions", json=ASK)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "model_not_allowed"
    assert "may not use model 'fake-model'" in resp.json()["error"]["message"]
    embeddings = await narrow.post("/v1/embeddings", json={"input": "a cat"})
    assert embeddings.status_code == 403
    assert (await narrow.get("/v1/models")).json()["data"] == []  # it lists only the models the key may use
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["fake-model"]

    prefix = (await client.get("/v1/key")).json()["prefix"]
    assert herd.admin is not None
    await herd.admin.patch(f"/admin/keys/{prefix}", json={"limits": {"expires_at": time.time() - 1}})
    resp = await client.post("/v1/completions", json=ASK)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "expired_api_key"
    assert (await client.get("/v1/account")).status_code == 401
    await assert_nothing_held(herd)


async def test_a_model_the_key_may_not_use_is_not_found_one_by_one_as_in_the_list(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", model="gemma-3-270m"))
    await herd.add_node(FakeNode("n2", model="smollm2-135m-instruct"))
    await herd.start()
    narrow = await key_client(herd, "alice", {"models": ["gemma-3-270m"]})
    assert [m["id"] for m in (await narrow.get("/v1/models")).json()["data"]] == ["gemma-3-270m"]
    assert (await narrow.get("/v1/models/gemma-3-270m")).json()["id"] == "gemma-3-270m"
    hidden = await narrow.get("/v1/models/smollm2-135m-instruct")
    unknown = await narrow.get("/v1/models/no-such-model")
    assert hidden.status_code == unknown.status_code == 404  # as OpenAI answers for a model the key cannot use
    shape = {"type": "not_found_error", "code": "model_not_found", "param": "model"}
    assert {k: hidden.json()["error"][k] for k in shape} == {k: unknown.json()["error"][k] for k in shape} == shape
    assert "may not use model 'smollm2-135m-instruct'" in hidden.json()["error"]["message"]
    broad = await key_client(herd, "alice", None)
    assert (await broad.get("/v1/models/smollm2-135m-instruct")).status_code == 200


async def test_the_operator_sees_and_changes_a_keys_limits(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "alice", {"spend_cap_day": 500, "rpm_limit": 60})
    await client.post("/v1/completions", json=ASK)
    prefix = (await client.get("/v1/key")).json()["prefix"]
    admin = herd.admin
    assert admin is not None
    shown = (await admin.get(f"/admin/keys/{prefix}")).json()
    assert shown["limits"]["spend_cap_day"] == 500 and shown["spend"]["today"] > 0
    assert shown["remaining"]["today"] == 500 - shown["spend"]["today"]
    watched = (await admin.get("/admin/stats")).json()["keys"]  # the dashboard's: every key with a limit
    assert [(k["account"], k["prefix"], k["spend"]["today"]) for k in watched] == [
        ("alice", prefix, shown["spend"]["today"])
    ]
    listed = (await admin.get("/admin/accounts/alice/keys")).json()["data"]
    assert [k["prefix"] for k in listed][-1] == prefix and listed[-1]["limits"]["rpm_limit"] == 60

    cleared = (await admin.patch(f"/admin/keys/{prefix}", json={"limits": {"rpm_limit": None}})).json()
    assert cleared["limits"]["rpm_limit"] is None and cleared["limits"]["spend_cap_day"] == 500
    bad = await admin.patch(f"/admin/keys/{prefix}", json={"limits": {"rpm": 5}})
    assert bad.status_code == 400 and "unknown limit 'rpm'" in bad.json()["error"]["message"]
    negative = await admin.post("/admin/accounts/alice/keys", json={"limits": {"spend_cap": -1}})
    assert negative.status_code == 400 and "spend_cap" in negative.json()["error"]["message"]
    assert (await admin.get("/admin/keys/lk-nokey")).status_code == 404
    assert (await admin.patch("/admin/keys/lk-nokey", json={"limits": {"rpm_limit": 1}})).status_code == 404
    # An account made with limits gives its first key those limits.
    made = await admin.post("/admin/accounts", json={"name": "bob", "deposit": 100, "limits": {"tpm_limit": 10}})
    assert made.status_code == 201
    key = (await admin.get(f"/admin/keys/{made.json()['api_key']}")).json()
    assert key["limits"]["tpm_limit"] == 10
    refused = await admin.post("/admin/accounts", json={"name": "carol", "limits": {"tpm_limit": 0}})
    assert refused.status_code == 400
    assert (await admin.get("/admin/accounts/carol")).status_code == 404


async def test_a_request_refused_for_money_counts_towards_no_rate(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    client = await key_client(herd, "poor", {"rpm_limit": 2}, deposit=60)
    for _ in range(3):  # each holds more than the balance: 402, and the key's minute stays unused
        assert (await client.post("/v1/completions", json={**ASK, "max_tokens": 100})).status_code == 402
    assert (await client.get("/v1/key")).json()["rates"]["requests_last_minute"] == 0
    assert (await client.post("/v1/completions", json=ASK)).status_code == 200
