"""Delivery checkpoints on open holds: what a stream delivered, charged when its router dies before settling it.

Every test runs on SQLite and on PostgreSQL (see conftest.py), against the real database.
"""

from __future__ import annotations

import asyncio

import pytest

from llamakit.router.ledger import Delivered, Ledger, LedgerError, backend_of, ledger_at
from tests.router.ledger.test_contract import assert_balanced


async def _alice(ledger: Ledger, deposit: int = 1000) -> int:
    account = await ledger.create_account("alice")
    await ledger.deposit(account.id, deposit)
    return account.id


async def test_recovery_charges_the_latest_checkpoint_and_refunds_the_rest(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await _alice(ledger)
        await ledger.hold(alice, 300, request_id="streaming", model="smol", bid="1.5")
        await ledger.hold(alice, 200, request_id="whole", model="smol")
        before = await ledger.books()
        # Checkpoints queued without waiting, in one turn of the loop: one group commit, the latest one wins.
        written = [
            ledger.checkpoint("streaming", prompt_tokens=7, completion_tokens=n, charge=20 + 3 * n, model="smol",
                              node="n1")
            for n in (4, 8, 12)
        ]  # fmt: skip
        await asyncio.gather(*written)
        hold = await ledger.find_hold("streaming")
        assert hold is not None and hold.status == "open" and hold.delivered is not None
        assert hold.delivered == Delivered(7, 12, 56, "smol", "n1", hold.delivered.at)
        whole = await ledger.find_hold("whole")
        assert whole is not None and whole.delivered is None
        assert await ledger.books() == before  # a checkpoint moves no money
        await assert_balanced(ledger)

    async with ledger_at(url) as ledger:  # the next router on these books
        records = {r.request_id: r for r in await ledger.recover_usage()}
        streamed, unsent = records["streaming"], records["whole"]
        assert (streamed.status, streamed.prompt_tokens, streamed.completion_tokens, streamed.cost) == (
            "recovered", 7, 12, 56,
        )  # fmt: skip
        assert (streamed.node, streamed.model, streamed.bid, streamed.held) == ("n1", "smol", "1.5", 300)
        assert streamed.error is not None and "12 token(s) delivered" in streamed.error
        # A whole answer that never went out costs nothing.
        assert (unsent.status, unsent.completion_tokens, unsent.cost) == ("recovered", 0, 0)
        assert unsent.error is not None and unsent.error.endswith("refunded in full")
        state = await ledger.account_state(alice)
        assert (state.balance, state.held, state.spent) == (1000 - 56, 0, 56)
        assert await ledger.fees_by_node() == {"n1": 56}
        await assert_balanced(ledger)
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies
        assert await ledger.recover() == 0


async def test_a_checkpoints_cached_tokens_and_discount_reach_the_recovered_record_and_the_totals(url: str) -> None:
    """The same usage record a settled stream with cached prompt tokens gets (docs/money.md#cached-prompt-tokens),
    on both backends (a cluster's release of a lost router's holds: the test below)."""
    async with ledger_at(url) as ledger:
        alice = await _alice(ledger)
        await ledger.hold(alice, 300, request_id="cached", model="smol")
        await ledger.hold(alice, 300, request_id="fresh", model="smol")
        # 40 prompt tokens, 32 of them cached (fee 4, cached 1) and 6 completion tokens (fee 2), base 10
        await ledger.checkpoint("cached", prompt_tokens=40, completion_tokens=6, charge=10 + 4 * 8 + 32 + 12,
                                model="smol", node="n1", cached_tokens=32, cache_discount=3 * 32)  # fmt: skip
        await ledger.checkpoint("fresh", prompt_tokens=40, completion_tokens=6, charge=10 + 4 * 40 + 12,
                                model="smol", node="n1")  # fmt: skip
        hold = await ledger.find_hold("cached")
        assert hold is not None and hold.delivered is not None
        assert (hold.delivered.cached_tokens, hold.delivered.cache_discount, hold.delivered.charge) == (32, 96, 86)
    async with ledger_at(url) as ledger:
        records = {r.request_id: r for r in await ledger.recover_usage()}
        cached, fresh = records["cached"], records["fresh"]
        assert (cached.prompt_tokens, cached.cached_tokens, cached.completion_tokens) == (40, 32, 6)
        assert (cached.cost, cached.cache_discount) == (86, 96)
        assert (fresh.cached_tokens, fresh.cost, fresh.cache_discount) == (0, 182, 0)
        savings = await ledger.cache_savings()
        assert (savings.cached_tokens, savings.discount) == (32, 96)
        await assert_balanced(ledger)
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies


async def test_a_checkpoint_cannot_cache_more_than_its_prompt(url: str) -> None:
    async with ledger_at(url) as ledger:
        with pytest.raises(ValueError, match="part of prompt_tokens"):
            ledger.checkpoint("r", prompt_tokens=4, completion_tokens=1, charge=1, model="smol", node=None,
                              cached_tokens=5)  # fmt: skip
        with pytest.raises(ValueError, match="cache_discount"):
            ledger.checkpoint("r", prompt_tokens=4, completion_tokens=1, charge=1, model="smol", node=None,
                              cached_tokens=3, cache_discount=-1)  # fmt: skip


async def test_recovery_never_charges_more_than_the_hold(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await _alice(ledger)
        await ledger.hold(alice, 50, request_id="r", model="smol")
        await ledger.checkpoint("r", prompt_tokens=1, completion_tokens=100, charge=900, model="smol", node="n1")
        [record] = await ledger.recover_usage()
        assert (record.cost, record.held, record.completion_tokens) == (50, 50, 100)
        assert (await ledger.account_state(alice)).balance == 950
        await assert_balanced(ledger)


async def test_a_checkpoint_after_the_settlement_changes_nothing(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await _alice(ledger)
        await ledger.hold(alice, 100, request_id="r", model="smol")
        await ledger.checkpoint("r", prompt_tokens=1, completion_tokens=2, charge=15, model="smol", node="n1")
        await ledger.settle("r", charge=30, node="n1", prompt_tokens=1, completion_tokens=10)
        late = ledger.checkpoint("r", prompt_tokens=1, completion_tokens=12, charge=35, model="smol", node="n1")
        unknown = ledger.checkpoint("nope", prompt_tokens=1, completion_tokens=1, charge=5, model="smol", node=None)
        await asyncio.gather(late, unknown)
        hold = await ledger.find_hold("r")
        assert hold is not None and hold.status == "settled"
        assert hold.delivered is not None and hold.delivered.completion_tokens == 2
        assert await ledger.recover() == 0
        assert (await ledger.account_state(alice)).spent == 30
        await assert_balanced(ledger)


async def test_bad_checkpoints_are_refused_before_the_database(url: str) -> None:
    async with ledger_at(url) as ledger:
        for bad in ({"charge": -1}, {"completion_tokens": True}, {"prompt_tokens": 1.5}, {"model": ""}):
            fields = {"prompt_tokens": 1, "completion_tokens": 1, "charge": 1, "model": "smol", **bad}
            with pytest.raises(ValueError):
                ledger.checkpoint("r", node=None, **fields)  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="closed"):
        ledger.checkpoint("r", prompt_tokens=1, completion_tokens=1, charge=1, model="smol", node=None)


async def test_a_lost_routers_holds_are_charged_their_checkpoints(url: str) -> None:
    if backend_of(url) != "postgres":
        pytest.skip("routers share their holds only on PostgreSQL (--cluster)")
    from llamakit.router.ledger._postgres import PostgresLedger

    async with ledger_at(url) as dead:
        assert isinstance(dead, PostgresLedger)
        dead.router_id = "dead-router"
        alice = await _alice(dead)
        await dead.hold(alice, 300, request_id="streaming", model="smol")
        await dead.hold(alice, 100, request_id="whole", model="smol")
        await dead.checkpoint("streaming", prompt_tokens=5, completion_tokens=9, charge=33, model="big", node="n2",
                              cached_tokens=4, cache_discount=8)  # fmt: skip
    async with ledger_at(url) as survivor:
        assert isinstance(survivor, PostgresLedger)
        # No row in `routers` for dead-router: it holds no lease.
        records = {r.request_id: r for r in await survivor.release_lost(me="me", error="its router stopped")}
        streamed, whole = records["streaming"], records["whole"]
        assert (streamed.status, streamed.completion_tokens, streamed.cost, streamed.model, streamed.node) == (
            "router_lost", 9, 33, "big", "n2",
        )  # fmt: skip
        assert (streamed.cached_tokens, streamed.cache_discount) == (4, 8)
        assert streamed.error is not None and streamed.error.startswith("its router stopped; charged")
        assert (whole.status, whole.cost) == ("router_lost", 0)
        assert (await survivor.account_state(alice)).spent == 33
        await assert_balanced(survivor)
