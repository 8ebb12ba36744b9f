"""What an operator sees: refusals counted and recorded, latency histograms, node gauges, usage by user, pages."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"


async def samples(herd: Herd) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the router's /metrics, parsed with prometheus_client's own parser."""
    assert herd.router is not None
    async with httpx.AsyncClient(base_url=herd.router.url) as plain:
        text = (await plain.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


async def test_every_refusal_is_counted_and_a_known_accounts_refusals_are_usage_records(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=2)))
    await herd.start()
    assert herd.admin is not None and herd.router is not None
    before = await samples(herd)
    assert value(before, "llamakit_router_refusals_total", status="402", code="insufficient_funds") == 0
    poor = await herd.account("poor", 20)
    for _ in range(5):
        resp = await poor.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100, "user": "end-user-7"})
        assert resp.status_code == 402
    assert (await poor.post("/v1/completions", json={"prompt": PROMPT, "model": "nope"})).status_code == 404
    assert (await poor.post("/v1/completions", json={"prompt": PROMPT, "temperature": 9})).status_code == 400
    async with httpx.AsyncClient(base_url=herd.router.url) as stranger:
        bad = await stranger.post("/v1/completions", json={}, headers={"Authorization": "Bearer lk-not-a-key"})
        assert bad.status_code == 401
    after = await samples(herd)
    assert value(after, "llamakit_router_refusals_total", status="402", code="insufficient_funds") == 5
    assert value(after, "llamakit_router_refusals_total", status="404", code="model_not_found") == 1
    assert value(after, "llamakit_router_refusals_total", status="400", code="invalid_value") == 1
    assert value(after, "llamakit_router_refusals_total", status="401", code="invalid_api_key") == 1
    # The account's refusals are in its usage, newest first, each under the id its error response named.
    usage = (await poor.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["http_status"], u["cost_credits"]) for u in usage] == [
        ("invalid_value", 400, 0),
        ("model_not_found", 404, 0),
        *[("insufficient_funds", 402, 0)] * 5,
    ]
    assert {u["user"] for u in usage if u["status"] == "insufficient_funds"} == {"end-user-7"}
    # The unknown key is only counted: no account, no record.
    everyone = (await herd.admin.get("/admin/usage")).json()["data"]
    assert {u["account"] for u in everyone} == {"poor"}
    books = await herd.books()
    assert books["balanced"] and books["charges"] == 0 and books["holds"] == 0


async def test_refusals_after_the_hold_are_recorded_with_their_code_and_status(herd: Herd) -> None:
    # A node's 400 (a prompt longer than its context) and a 503 no_node come after the hold, unlike the refusals
    # above; the operator sees them the same way: code and status in the usage record, stats and metrics agree.
    await herd.add_node(FakeNode("small", script=Script(fail_status=400, fail_code="context_length_exceeded")))
    await herd.add_node(FakeNode("gone", model="other-model", script=Script(fail_status=500)))
    await herd.start(max_attempts=1)
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    long = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    none = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "model": "other-model"})
    assert none.status_code == 503 and none.json()["error"]["code"] == "no_node", none.text
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["http_status"], u["cost_credits"]) for u in usage] == [
        ("no_node", 503, 0),
        ("context_length_exceeded", 400, 0),
    ]
    stats = (await herd.admin.get("/admin/stats")).json()
    assert stats["refusals"]["by_status"] == {"context_length_exceeded": 1, "no_node": 1}
    assert stats["refusals"]["http_status"] == {"context_length_exceeded": 400, "no_node": 503}
    assert stats["refusals"]["today"] == 2
    after = await samples(herd)
    assert value(after, "llamakit_router_refusals_total", status="400", code="context_length_exceeded") == 1
    assert value(after, "llamakit_router_refusals_total", status="503", code="no_node") == 1
    assert (await alice.get("/v1/account")).json()["balance"] == 100_000
    assert (await herd.books())["balanced"]


async def test_text_no_database_stores_in_an_error_or_a_user_neither_keeps_a_hold_nor_loses_a_record(
    herd: Herd,
) -> None:
    # A node's 400 quotes what it was sent (a JSON schema's "$ref": "#/\ud800"); a lone surrogate cannot be
    # written as UTF-8. Before, the release failed on it: a 500, and the hold stayed open until the next start.
    quoting = Script(fail_status=400, fail_code="invalid_schema", fail_message="cannot resolve $ref '#/\ud800'")
    await herd.add_node(FakeNode("n1", script=quoting))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    quoted = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert quoted.status_code == 400 and quoted.json()["error"]["code"] == "invalid_schema", quoted.text
    # Refused before the hold, with the surrogate in the OpenAI user the record keeps.
    odd_user = await alice.post(
        "/v1/completions",
        content=json.dumps({"prompt": PROMPT, "max_tokens": 3, "user": "\ud800"}),  # ASCII: the surrogate escaped
        headers={"Content-Type": "application/json"},
    )
    assert odd_user.status_code == 400, odd_user.text
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["http_status"]) for u in usage] == [("invalid_value", 400), ("invalid_schema", 400)]
    assert usage[1]["error"] == "cannot resolve $ref '#/\\ud800'"
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0, books
    assert (await alice.get("/v1/account")).json()["balance"] == 100_000


async def test_latency_histograms_node_gauges_and_process_metrics(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=4, token_delay=0.01)))
    await herd.add_node(FakeNode("n2", slots=1, script=Script(tokens=4)))
    await herd.start()
    assert herd.admin is not None
    first = await samples(herd)
    assert value(first, "llamakit_router_queue_depth", model="fake-model") == 0, "present before any queueing"
    assert value(first, "llamakit_router_node_state", node="n1", state="ready") == 1
    assert value(first, "llamakit_router_node_state", node="n1", state="down") == 0
    assert value(first, "llamakit_router_node_slots", node="n2") == 1
    assert value(first, "process_cpu_seconds_total") is not None
    alice = await herd.account("alice", 100_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})).status_code == 200
    stream = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True})
    assert stream.status_code == 200
    await herd.admin.post("/admin/nodes/n2/drain")
    found = await samples(herd)
    assert value(found, "llamakit_router_request_duration_seconds_count", model="fake-model") == 2
    assert value(found, "llamakit_router_time_to_first_token_seconds_count", model="fake-model") == 1
    assert value(found, "llamakit_router_queue_wait_seconds_count", model="fake-model") == 2
    assert value(found, "llamakit_router_completion_tokens_per_second_count", model="fake-model") == 2
    assert value(found, "llamakit_router_node_state", node="n2", state="draining") == 1
    assert value(found, "llamakit_router_node_up", node="n2") == 1


async def test_usage_pages_end_where_the_records_end_and_filter_by_user_and_time(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    for i in range(4):
        body = {"prompt": PROMPT, "max_tokens": 1, "user": "u-even" if i % 2 == 0 else "u-odd"}
        assert (await alice.post("/v1/completions", json=body)).status_code == 200
    page = (await alice.get("/v1/account/usage", params={"limit": 2})).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    last = (await alice.get("/v1/account/usage", params={"limit": 2, "before": page["next_before"]})).json()
    assert len(last["data"]) == 2 and last["has_more"] is False and last["next_before"] is None
    evens = (await alice.get("/v1/account/usage", params={"user": "u-even"})).json()["data"]
    assert len(evens) == 2 and {u["user"] for u in evens} == {"u-even"}
    later = (await alice.get("/v1/account/usage", params={"since": str(time.time() + 60)})).json()["data"]
    assert later == []
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert len((await alice.get("/v1/account/usage", params={"since": today})).json()["data"]) == 4
    for params, says in [
        ({"limit": "0"}, "between 1 and 1000"),
        ({"limit": "1001"}, "between 1 and 1000"),
        ({"before": "0"}, "'before' must be between 1"),
        ({"since": "yesterday"}, "ISO 8601"),
    ]:
        resp = await alice.get("/v1/account/usage", params=params)
        assert resp.status_code == 400 and says in resp.json()["error"]["message"], resp.text
    assert herd.admin is not None
    mine = (await herd.admin.get("/admin/usage", params={"account": "alice", "user": "u-odd"})).json()
    assert len(mine["data"]) == 2 and {u["account"] for u in mine["data"]} == {"alice"}
    missing = await herd.admin.get("/admin/usage", params={"account": "nobody"})
    assert missing.status_code == 404


async def test_since_that_is_not_a_finite_time_is_refused_naming_it(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})).status_code == 200
    assert herd.admin is not None
    # nan compares false with every record's time, so it filtered nothing out: every record came back
    for raw in ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400"]:
        for client, path in [(alice, "/v1/account/usage"), (herd.admin, "/admin/usage")]:
            resp = await client.get(path, params={"since": raw})
            assert resp.status_code == 400, (path, raw, resp.text)
            assert resp.json()["error"]["param"] == "since" and "'since'" in resp.json()["error"]["message"]
    assert len((await alice.get("/v1/account/usage", params={"since": "0"})).json()["data"]) == 1


async def test_a_request_with_a_user_keeps_it_through_a_stream(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    body = {"prompt": PROMPT, "max_tokens": 2, "stream": True, "user": "u-stream"}
    assert (await alice.post("/v1/completions", json=body)).status_code == 200
    for _ in range(50):
        usage = (await alice.get("/v1/account/usage")).json()["data"]
        if usage:
            break
        await asyncio.sleep(0.02)
    assert usage[0]["user"] == "u-stream" and usage[0]["status"] == "ok"
