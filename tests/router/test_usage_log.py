"""The JSONL usage log: exactly one complete line per settled or refunded request, agreeing with the ledger."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from llamakit.router.ledger import ledger_at
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"
FIELDS = {
    "time",
    "request_id",
    "account",
    "model",
    "node",
    "status",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost",
    "cost_credits",
    "cache_discount",
    "cache_discount_credits",
    "currency",
    "held",
    "bid",
    "latency_ms",
    "queue_ms",
    "ttft_ms",
    "overhead_ms",
    "error",
    "user",
    "key_prefix",
    "http_status",
    "passed_over",
}


def read_log(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "the last line is complete"
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert set(line) == FIELDS, line
    return lines


async def all_usage(herd: Herd, count: int) -> list[dict[str, Any]]:
    """The ledger's usage records once there are `count` of them (a cut stream settles a moment later)."""
    assert herd.admin is not None
    for _ in range(200):
        usage: list[dict[str, Any]] = (await herd.admin.get("/admin/usage")).json()["data"]
        if len(usage) >= count:
            return usage
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} usage records, have {usage}")


def agree(lines: list[dict[str, Any]], usage: list[dict[str, Any]], accounts: dict[int, str]) -> None:
    """Each request is one line, and its line says what the ledger says."""
    ids = [line["request_id"] for line in lines]
    assert len(ids) == len(set(ids)), "no request is logged twice"
    assert set(ids) == {u["request_id"] for u in usage}
    by_id = {line["request_id"]: line for line in lines}
    for u in usage:
        line = by_id[u["request_id"]]
        keys = ("model", "node", "status", "prompt_tokens", "completion_tokens", "cost", "cost_credits", "currency")
        for key in (*keys, "held", "bid"):
            assert line[key] == u[key], (key, line, u)
        assert line["account"] == accounts[u["account_id"]]


async def test_every_settled_or_refunded_request_is_one_complete_line(herd: Herd, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "usage.jsonl"
    gate = asyncio.Event()
    await herd.add_node(FakeNode("good", slots=2, script=Script(tokens=4, token_delay=0.005)))
    await herd.add_node(FakeNode("picky", model="m-picky", script=Script(fail_status=400)))
    await herd.add_node(FakeNode("dies", model="m-dies", script=Script(tokens=10, die_after=3)))
    await herd.add_node(FakeNode("slow", model="m-slow", slots=1, script=Script(tokens=1, gate=gate)))
    await herd.start(usage_log=log, max_queue=1)
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    bob = await herd.account("bob", 100_000)
    poor = await herd.account("poor", 50)

    responses = [
        await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}),
        await bob.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}], "bid": 1.7}),
        await alice.post(
            "/v1/completions",
            json={"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4},
        ),
        await alice.post("/v1/completions", json={"prompt": PROMPT, "model": "m-picky"}),  # refused by the node
        await bob.post("/v1/completions", json={"prompt": PROMPT, "model": "m-dies", "stream": True}),  # broken
        await poor.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 100}),  # 402: no hold, a refusal
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 400, 200, 402]
    # A stream the client cuts after two tokens.
    async with alice.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: {")
            if seen == 2:
                break
    # One request in flight on the slow node, one queued behind it, one turned away: the queue is full.
    slow = {"prompt": PROMPT, "model": "m-slow", "max_tokens": 1}
    in_flight = asyncio.create_task(bob.post("/v1/completions", json=slow))
    queued = asyncio.create_task(bob.post("/v1/completions", json=slow))
    while (await bob.get("/v1/info")).json()["queue_length"] != 1:
        await asyncio.sleep(0.01)
    assert (await bob.post("/v1/completions", json=slow)).status_code == 429
    gate.set()
    assert [r.status_code for r in await asyncio.gather(in_flight, queued)] == [200, 200]

    usage = await all_usage(herd, 10)
    assert sorted(u["status"] for u in usage) == sorted(
        ["ok", "ok", "ok", "rejected", "broken", "cut", "ok", "ok", "queue_full", "insufficient_funds"]
    )
    accounts = {a["id"]: a["name"] for a in (await herd.admin.get("/admin/accounts")).json()["data"]}
    lines = read_log(log)
    agree(lines, usage, accounts)
    [refused] = [line for line in lines if line["account"] == "poor"]  # refused before a hold: no money moved
    assert (refused["status"], refused["http_status"], refused["cost_credits"]) == ("insufficient_funds", 402, 0)
    # The money in the log is the money in the books.
    assert sum(line["cost_credits"] for line in lines) == (await herd.books())["charges"]
    for name, client in (("alice", alice), ("bob", bob)):
        mine = (await client.get("/v1/account/usage")).json()["data"]
        assert sorted((u["request_id"], u["cost_credits"], u["total_tokens"]) for u in mine) == sorted(
            (line["request_id"], line["cost_credits"], line["prompt_tokens"] + line["completion_tokens"])
            for line in lines
            if line["account"] == name
        )
    # What the clients were told they paid is what the log says.
    told = {r.headers["X-Llamakit-Request-Id"]: int(r.headers["X-Llamakit-Cost-Credits"]) for r in responses[:2]}
    assert {i: c for i, c in ((line["request_id"], line["cost_credits"]) for line in lines) if i in told} == told


async def test_the_log_is_appended_to_across_restarts_and_includes_recovered_requests(
    herd: Herd, tmp_path: Path
) -> None:
    log = tmp_path / "usage.jsonl"
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    router = await herd.start(usage_log=log)
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})).status_code == 200
    await herd.admin.aclose()  # type: ignore[union-attr]
    await router.stop()
    assert len(read_log(log)) == 1

    # A router killed mid-request leaves a hold open; the next one releases it, and that is a refund too.
    async with ledger_at(tmp_path / "ledger.db") as ledger:
        account = await ledger.account_by_name("alice")
        await ledger.hold(account.id, 500, request_id="req-died", model="fake-model", bid="2")
    router = await herd.start(usage_log=log)
    alice = httpx.AsyncClient(base_url=router.url, headers=alice.headers)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert resp.status_code == 200

    usage = await all_usage(herd, 3)
    lines = read_log(log)
    agree(lines, usage, {account.id: "alice"})
    recovered = next(line for line in lines if line["request_id"] == "req-died")
    assert (recovered["status"], recovered["cost_credits"], recovered["held"], recovered["bid"]) == (
        "recovered",
        0,
        500,
        "2",
    )
    assert recovered["node"] is None and recovered["error"]
    assert (await alice.get("/v1/account")).json()["balance"] == 10_000 - sum(line["cost_credits"] for line in lines)
    await alice.aclose()
