"""Cached prompt tokens at their own fee: a model's `cached_prompt_token_fee`, where the operator sets it and where
clients read it, the hold that stays the worst case, the charge on the count the node reports, and every place that
says how many prompt tokens were cached and what that saved. The fake node's `Script(cache=True)` reports, as a real
node does, the words an earlier prompt of the same cache salt began with."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamakit.money.currency import CreditValue
from llamakit.money.fees import FeeSchedule, cache_discount, hold_amount, quote, settle_amount
from llamakit.router.pricing import PriceList
from llamakit.router.state import STATE
from tests.router.test_cli import llamakit
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

# base 10, a fresh prompt token 4, a cached one 1, a completion token 2
FEES = {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2, "cached_prompt_token_fee": 1}
PROMPT = "one two three four five six seven eight"  # 8 words: the fake node counts 8 + 3 = 11 prompt tokens
FIRST = 10 + 4 * 11 + 2 * 5  # nothing cached yet: 64
AGAIN = 10 + 4 * 3 + 1 * 8 + 2 * 5  # the 8 words cached, 3 prompt tokens fresh: 40
SAVED = FIRST - AGAIN  # 24


async def cached_herd(
    herd: Herd, *, fees: dict[str, int] | None = FEES, script: Script | None = None, **settings: Any
) -> None:
    await herd.add_node(FakeNode("n1", script=script or Script(tokens=5, cache=True)))
    await herd.start(**settings)
    assert herd.admin is not None
    if fees is not None:
        resp = await herd.admin.put("/admin/fees/fake-model", json=fees)
        assert resp.status_code == 200, resp.text


def sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# --- the arithmetic


def test_a_cached_token_costs_its_own_fee_and_the_discount_is_the_difference() -> None:
    fees = FeeSchedule(10, 4, 2, cached_prompt_token_fee=1)
    assert fees.cost(11, 5) == FIRST and fees.cost(11, 5, cached_tokens=8) == AGAIN
    assert quote(fees, "1.5", 11, 5, 8) == 60  # ceil(1.5 × 40)
    assert cache_discount(fees, "1.5", 11, 5, held=1000, cached_tokens=8) == 96 - 60
    # capped by the hold, as charges are: what the cache saved is what it took off the charge
    assert settle_amount(fees, 1, 11, 5, held=50, cached_tokens=8) == 40
    assert cache_discount(fees, 1, 11, 5, held=50, cached_tokens=8) == 50 - 40
    # unset, a cached token is a prompt token: nothing changes for a herd that does not set it
    plain = FeeSchedule(10, 4, 2)
    assert plain.cached_fee == 4 and plain.cost(11, 5, cached_tokens=8) == FIRST
    assert cache_discount(plain, 1, 11, 5, held=1000, cached_tokens=8) == 0
    assert plain.to_dict() == {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2}
    assert FeeSchedule.from_dict(FEES) == fees and fees.to_dict() == FEES
    # the hold is the worst case: every prompt token fresh
    assert hold_amount(fees, 1, 11, 5) == FIRST


@pytest.mark.parametrize(
    ("fees", "message"),
    [
        ({**FEES, "cached_prompt_token_fee": 5}, "may not be above prompt_token_fee"),
        ({**FEES, "cached_prompt_token_fee": -1}, "must be >= 0"),
        ({**FEES, "cached_prompt_token_fee": 0.5}, "must be a whole number"),
        ({**FEES, "cached_fee": 1}, "unknown cached_fee"),
    ],
)
def test_a_bad_cached_fee_is_refused_saying_why(fees: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FeeSchedule.from_dict(fees)


def test_cached_tokens_are_part_of_the_prompt() -> None:
    with pytest.raises(ValueError, match="part of prompt_tokens"):
        FeeSchedule(10, 4, 2, 1).cost(3, 1, cached_tokens=4)


def test_the_fee_file_takes_a_cached_fee(tmp_path: Path) -> None:
    path = tmp_path / "fees.json"
    path.write_text(json.dumps({"*": {"base_fee": 1, "prompt_token_fee": 2, "completion_token_fee": 3}, "m": FEES}))
    prices = PriceList.from_file(path, FeeSchedule(0, 0, 0))
    assert prices.fees("m").cached_fee == 1 and prices.fees("other").cached_fee == 2
    path.write_text(json.dumps({"m": {**FEES, "cached_prompt_token_fee": 9}}))
    with pytest.raises(ValueError, match="model 'm': cached_prompt_token_fee"):
        PriceList.from_file(path, FeeSchedule(0, 0, 0))


# --- the operator sets it, clients read it


async def test_the_operator_sets_the_cached_fee_and_clients_read_it_as_fees_and_prices(herd: Herd) -> None:
    await cached_herd(herd)
    assert herd.admin is not None
    assert (await herd.admin.get("/admin/fees")).json()["fake-model"] == FEES
    too_dear = await herd.admin.put("/admin/fees/fake-model", json={**FEES, "cached_prompt_token_fee": 5})
    assert too_dear.status_code == 400 and "may not be above prompt_token_fee" in too_dear.json()["error"]["message"]
    alice = await herd.account("alice", 1000)
    prices = {
        "currency": "USD", "per_request": 1e-05, "per_million_prompt_tokens": 4.0,
        "per_million_completion_tokens": 2.0, "per_million_cached_prompt_tokens": 1.0,
    }  # fmt: skip
    info = (await alice.get("/v1/info")).json()
    assert info["models"]["fake-model"]["fees"] == FEES and info["models"]["fake-model"]["prices"] == prices
    assert info["fees"]["fake-model"] == FEES and "cached_prompt_token_fee" not in info["fees"]["*"]
    [model] = (await alice.get("/v1/models")).json()["data"]
    assert model["fees"] == FEES and model["prices"] == prices
    # a model without a cached fee of its own says nothing of one: it is its prompt fee
    plain = {k: v for k, v in FEES.items() if k != "cached_prompt_token_fee"}
    await herd.admin.put("/admin/fees/fake-model", json=plain)
    [model] = (await alice.get("/v1/models")).json()["data"]
    assert "cached_prompt_token_fee" not in model["fees"] and "per_million_cached_prompt_tokens" not in model["prices"]


async def test_the_default_cached_fee_comes_from_the_flags(herd: Herd) -> None:
    await cached_herd(herd, fees=None, cached_prompt_token_fee=0)  # the herd's default prompt fee is 1
    alice = await herd.account("alice", 1000)
    first = (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()
    again = (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()
    assert first["usage"]["cost_credits"] == 10 + 11 + 2 * 5
    assert again["usage"]["cost_credits"] == 10 + 3 + 2 * 5  # the 8 cached tokens are free
    assert again["usage"]["cost_details"]["cache_discount_credits"] == 8


def test_the_router_refuses_a_default_cached_fee_above_the_prompt_fee(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "llamakit.router", "--db", str(tmp_path / "l.db"), "--prompt-token-fee", "2",
         "--cached-prompt-token-fee", "3", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "may not be above --prompt-token-fee" in run.stderr, run.stderr


async def test_llamakit_fees_sets_the_cached_fee(herd: Herd) -> None:
    await cached_herd(herd, fees=None)
    args = ["fake-model", "--base", "10", "--prompt", "4", "--completion", "2", "--cached-prompt", "1"]
    code, out = await llamakit(herd, "fees", *args)
    assert code == 0, out
    assert herd.admin is not None
    assert (await herd.admin.get("/admin/fees")).json()["fake-model"] == FEES
    code, out = await llamakit(herd, "fees", "fake-model", "--cached-prompt", "1")
    assert code != 0 and "give --base" in out


# --- the hold, the charge, and what says so


async def test_a_cached_prompt_is_charged_at_its_fee_and_every_view_says_what_it_saved(herd: Herd) -> None:
    await cached_herd(herd)
    alice = await herd.account("alice", 1000)
    first = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    again = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    assert first.json()["usage"]["cost_credits"] == FIRST
    assert first.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    usage = again.json()["usage"]
    assert usage == {
        "prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 8},
        "cost": AGAIN / 10**6, "cost_credits": AGAIN,
        "cost_details": {"cache_discount": SAVED / 10**6, "cache_discount_credits": SAVED},
    }  # fmt: skip
    assert again.headers["X-Llamakit-Cost-Credits"] == str(AGAIN)
    assert (await alice.get("/v1/account")).json()["spent"] == FIRST + AGAIN

    records = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(r["cached_tokens"], r["cost_credits"], r["cache_discount_credits"]) for r in records] == [
        (8, AGAIN, SAVED), (0, FIRST, 0),
    ]  # fmt: skip
    assert records[0]["cache_discount"] == SAVED / 10**6 and records[0]["passed_over"] == []

    assert herd.admin is not None
    stats = (await herd.admin.get("/admin/stats")).json()
    assert (stats["fees"]["cached_tokens"], stats["fees"]["cache_discount"]) == (8, SAVED)
    recent = stats["requests"]["recent"][-1]
    assert (recent["cached_tokens"], recent["cache_discount_credits"]) == (8, SAVED)

    assert herd.router is not None
    async with httpx.AsyncClient(base_url=herd.router.url) as plain:
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families((await plain.get("/metrics")).text)
            for s in family.samples
        }
    model = (("model", "fake-model"),)
    assert metrics[("llamakit_router_cache_discount_credits_total", model)] == SAVED
    assert metrics[("llamakit_router_tokens_total", (("kind", "prompt_cached"), *model))] == 8


async def test_a_stream_is_charged_on_the_cached_count_of_its_usage(herd: Herd) -> None:
    await cached_herd(herd)
    alice = await herd.account("alice", 1000)
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    await alice.post("/v1/completions", json=body)
    usage = sse((await alice.post("/v1/completions", json=body)).text)[-1]["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8} and usage["cost_credits"] == AGAIN
    assert usage["cost_details"]["cache_discount_credits"] == SAVED
    assert (await alice.get("/v1/account")).json()["spent"] == FIRST + AGAIN


async def test_a_response_reports_its_cached_input_and_what_it_saved(herd: Herd) -> None:
    await cached_herd(herd)
    alice = await herd.account("alice", 1000)
    body = {"model": "fake-model", "input": PROMPT, "max_output_tokens": 5}
    await alice.post("/v1/responses", json=body)
    usage = (await alice.post("/v1/responses", json=body)).json()["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] > 0
    assert usage["cost_details"]["cache_discount_credits"] == 3 * usage["input_tokens_details"]["cached_tokens"]


async def test_the_hold_stays_the_worst_case_every_prompt_token_fresh(herd: Herd) -> None:
    await cached_herd(herd)
    worst = hold_amount(FeeSchedule.from_dict(FEES), 1, len(PROMPT.encode()) + 4, 5)  # the prompt's bytes bound it
    alice = await herd.account("alice", worst)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).status_code == 200
    assert herd.admin is not None
    await herd.admin.post("/admin/accounts/alice/deposits", json={"amount": FIRST - 1})  # back to worst - 1
    short = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    # it would cost AGAIN once cached, but the hold counts every prompt token as fresh
    assert short.status_code == 402 and short.json()["error"]["needed"] == worst


async def test_a_herd_without_cached_fees_charges_cached_tokens_in_full(herd: Herd) -> None:
    await cached_herd(herd, fees=None)  # the herd fixture's 10, 1, 2
    alice = await herd.account("alice", 1000)
    await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    usage = (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 8}
    assert usage["cost_credits"] == 10 + 11 + 2 * 5
    assert usage["cost_details"] == {"cache_discount": 0.0, "cache_discount_credits": 0}


async def test_a_batch_line_pays_the_discount_of_the_charge_with_its_cached_fee(herd: Herd) -> None:
    """docs/money.md#batches: a line's charge is the interactive charge, cached fee included, at the discount."""
    await cached_herd(herd)
    alice = await herd.account("alice", 1000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).status_code == 200
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "fake-model", "prompt": PROMPT, "max_tokens": 5}}  # fmt: skip
    files = {"file": ("lines.jsonl", json.dumps(line).encode())}
    upload = (await alice.post("/v1/files", data={"purpose": "batch"}, files=files)).json()
    made = {"input_file_id": upload["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    batch = (await alice.post("/v1/batches", json=made)).json()
    for _ in range(1000):
        batch = (await alice.get(f"/v1/batches/{batch['id']}")).json()
        if batch["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    assert batch["status"] == "completed" and batch["usage"]["input_tokens_details"] == {"cached_tokens": 8}
    assert batch["usage"]["cost_credits"] == math.ceil(Decimal("0.5") * AGAIN) == 20


async def test_no_tenant_pays_the_cached_rate_for_another_accounts_cache(herd: Herd) -> None:
    """Caches are salted per account: alice's prompt in a node's cache is nothing to bob, who pays in full for
    the same prompt, and then the cached rate for his own repeat."""
    await cached_herd(herd)
    alice = await herd.account("alice", 1000)
    bob = await herd.account("bob", 1000)
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()["usage"][
        "cost_credits"
    ] == FIRST
    assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()["usage"][
        "cost_credits"
    ] == AGAIN
    bobs = (await bob.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()["usage"]
    assert bobs["prompt_tokens_details"] == {"cached_tokens": 0} and bobs["cost_credits"] == FIRST
    assert (await bob.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})).json()["usage"][
        "cost_credits"
    ] == AGAIN
    assert (await bob.get("/v1/account")).json()["spent"] == FIRST + AGAIN
    node = herd.nodes["n1"]
    assert len(set(node.cache_salts)) == 2  # one salt per account reached the node


async def test_the_usage_log_line_says_what_was_cached_and_saved(herd: Herd, tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    await cached_herd(herd, usage_log=log)
    alice = await herd.account("alice", 1000)
    for _ in range(2):
        await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["cached_tokens"], r["cost_credits"], r["cache_discount_credits"]) for r in lines] == [
        (0, FIRST, 0), (8, AGAIN, SAVED),
    ]  # fmt: skip
    assert lines[-1]["cache_discount"] == float(CreditValue().price(SAVED)) == float(Decimal(SAVED) / 10**6)


# --- streams that end without their usage (cut, broken) and checkpoints: the running counts say what was cached


def delivered_charge(completion_tokens: int) -> int:
    """What PROMPT costs with its 8 words cached and `completion_tokens` delivered: PaidRequest.charge(11, n, 8)."""
    return 10 + 4 * 3 + 1 * 8 + 2 * completion_tokens


async def warmed(herd: Herd, script: Script, **settings: Any) -> httpx.AsyncClient:
    """alice, whose PROMPT the node's cache holds (she paid FIRST for it)."""
    await cached_herd(herd, script=script, **settings)
    alice = await herd.account("alice", 10_000)
    warm = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5})
    assert warm.json()["usage"]["cost_credits"] == FIRST
    return alice


async def ended(client: httpx.AsyncClient, status: str) -> dict[str, Any]:
    """The account's latest usage record, once one of `status` is written (a cut stream settles as the router
    notices the client gone)."""
    for _ in range(400):
        records = (await client.get("/v1/account/usage")).json()["data"]
        if records and records[0]["status"] == status:
            record: dict[str, Any] = records[0]
            return record
        await asyncio.sleep(0.025)
    raise AssertionError(f"no {status} record: {records}")


async def test_a_stream_cut_by_its_client_pays_the_cached_fee_for_its_cached_tokens(herd: Herd) -> None:
    alice = await warmed(herd, Script(tokens=64, token_delay=0.01, cache=True))
    body = {"prompt": PROMPT, "max_tokens": 64, "stream": True}
    async with alice.stream("POST", "/v1/completions", json=body) as resp:
        read = 0
        async for line in resp.aiter_lines():
            read += line.startswith("data: {")
            if read == 3:
                break
    record = await ended(alice, "cut")
    delivered = record["completion_tokens"]
    assert 3 <= delivered < 64
    assert (record["prompt_tokens"], record["cached_tokens"]) == (11, 8)
    assert record["cost_credits"] == delivered_charge(delivered)  # a finished stream's rule, on what it delivered
    assert record["cache_discount_credits"] == SAVED  # the 8 cached tokens at 3 credits less each
    assert (await alice.get("/v1/account")).json()["spent"] == FIRST + delivered_charge(delivered)
    assert herd.admin is not None
    stats = (await herd.admin.get("/admin/stats")).json()
    assert (stats["fees"]["cached_tokens"], stats["fees"]["cache_discount"]) == (8, SAVED)
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0


async def test_a_broken_stream_pays_the_cached_fee_for_its_cached_tokens(herd: Herd) -> None:
    alice = await warmed(herd, Script(tokens=64, die_after=4, cache=True))
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 64, "stream": True})
    assert sse(resp.text)[-1]["error"]["code"] == "node_failed"
    record = await ended(alice, "broken")
    assert (record["prompt_tokens"], record["cached_tokens"], record["completion_tokens"]) == (11, 8, 4)
    assert (record["cost_credits"], record["cache_discount_credits"]) == (delivered_charge(4), SAVED)
    assert (await alice.get("/v1/account")).json()["spent"] == FIRST + delivered_charge(4)


async def test_a_streams_checkpoints_charge_its_cached_tokens_at_their_fee(herd: Herd) -> None:
    """What a crash of the router would charge (docs/money.md#a-router-crash) is what a cut would."""
    alice = await warmed(herd, Script(tokens=10, cache=True), checkpoint_tokens=3, checkpoint_ms=60_000)
    body = {"prompt": PROMPT, "max_tokens": 10, "stream": True}
    async with alice.stream("POST", "/v1/completions", json=body) as resp:
        request_id = resp.headers["X-Llamakit-Request-Id"]
        assert "data: [DONE]" in [line async for line in resp.aiter_lines()]
    assert herd.router is not None
    hold = await herd.router.app[STATE].ledger.find_hold(request_id)
    assert hold is not None and hold.delivered is not None
    checkpointed = hold.delivered
    assert 3 <= checkpointed.completion_tokens <= 9
    assert (checkpointed.prompt_tokens, checkpointed.cached_tokens, checkpointed.cache_discount) == (11, 8, SAVED)
    assert checkpointed.charge == delivered_charge(checkpointed.completion_tokens)
