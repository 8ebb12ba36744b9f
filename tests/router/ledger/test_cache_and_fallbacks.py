"""The ledger's part in cached prompt tokens and model fallbacks, on each backend: a settlement keeps the tokens a
node read from its cache and what their fee saved, and the model that served a request when its hold was taken for
another, with the models passed over before it."""

from __future__ import annotations

import pytest

from llamakit.router.ledger import AccountState, CacheSavings, Ledger
from tests.router.ledger.test_contract import assert_balanced


@pytest.fixture
async def funded(ledger: Ledger) -> int:
    account = await ledger.create_account("alice")
    await ledger.deposit(account.id, 1000)
    return account.id


PASSED = [
    {"model": "big", "reason": "no_node", "message": "no node is available for model 'big' right now"},
    {"model": "mid", "reason": "queue_full", "message": "the queue for 'mid' is full (2 waiting)"},
]


async def test_a_settlement_keeps_the_cached_tokens_and_their_discount(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 300, request_id="r1", model="smol")
    await ledger.settle("r1", charge=90, node="n", prompt_tokens=60, completion_tokens=10, cached_tokens=40,
                        cache_discount=30)  # fmt: skip
    usage = await ledger.find_usage("r1")
    assert usage is not None
    assert (usage.cost, usage.prompt_tokens, usage.cached_tokens, usage.cache_discount) == (90, 60, 40, 30)
    assert usage.passed_over == () and usage.model == "smol"
    await ledger.hold(funded, 100, request_id="r2", model="smol")
    await ledger.settle("r2", charge=50, node="n", prompt_tokens=5, completion_tokens=5)
    plain = await ledger.find_usage("r2")
    assert plain is not None and (plain.cached_tokens, plain.cache_discount) == (0, 0)
    assert await ledger.cache_savings() == CacheSavings(cached_tokens=40, discount=30)
    assert await ledger.account_state(funded) == AccountState(balance=860, held=0, spent=140, deposited=1000)
    await assert_balanced(ledger)


async def test_a_fallback_is_charged_and_recorded_as_the_model_that_served_it(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 500, request_id="r1", model="big", bid="2")
    await ledger.settle("r1", charge=120, node="n", prompt_tokens=10, completion_tokens=5, model="small",
                        passed_over=PASSED)  # fmt: skip
    usage = await ledger.find_usage("r1")
    assert usage is not None and (usage.model, usage.cost, usage.held, usage.bid) == ("small", 120, 500, "2")
    assert [dict(p) for p in usage.passed_over] == PASSED
    [listed] = await ledger.usage_records(funded)
    assert listed == usage
    await assert_balanced(ledger)


async def test_a_release_after_every_model_was_passed_over_names_the_last_tried(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 500, request_id="r1", model="big")
    await ledger.release("r1", status="no_node", error="no node", http_status=503, model="small",
                         passed_over=PASSED)  # fmt: skip
    usage = await ledger.find_usage("r1")
    assert usage is not None and (usage.model, usage.status, usage.cost, usage.http_status) == (
        "small", "no_node", 0, 503,
    )  # fmt: skip
    assert [p["reason"] for p in usage.passed_over] == ["no_node", "queue_full"]
    assert await ledger.account_state(funded) == AccountState(balance=1000, held=0, spent=0, deposited=1000)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cached_tokens": 11}, "part of prompt_tokens"),
        ({"cached_tokens": -1}, "cached_tokens must be >= 0"),
        ({"cache_discount": True}, "cache_discount must be an int"),
        ({"passed_over": [{"model": "a"}]}, "a passed_over entry"),
        ({"passed_over": [{"model": "a", "reason": 1, "message": ""}]}, "values are strings"),
        ({"passed_over": "big"}, "a list of at most"),
        ({"model": ""}, "model must be a non-empty string"),
    ],
)
async def test_settle_refuses_bad_cache_and_fallback_fields_before_touching_money(
    ledger: Ledger, funded: int, fields: dict[str, object], message: str
) -> None:
    await ledger.hold(funded, 300, request_id="r1", model="smol")
    with pytest.raises(ValueError, match=message):
        await ledger.settle("r1", charge=10, node="n", prompt_tokens=10, completion_tokens=1, **fields)  # type: ignore[arg-type]
    assert await ledger.account_state(funded) == AccountState(balance=700, held=300, spent=0, deposited=1000)
    await ledger.release("r1")
