"""Per-key limits in the ledger, on each backend: stored and changed, and the spend caps enforced in the hold's
own transaction (total, per UTC day, per UTC month), under races and across a crash recovery."""

from __future__ import annotations

import asyncio
import calendar

import pytest

from llamakit.router.ledger import (
    KeyLimits,
    KeyUse,
    Ledger,
    SpendCapExceeded,
    UnknownKey,
    hash_key,
    ledger_at,
)
from tests.router.ledger.test_contract import assert_balanced, snapshot


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def utc(text: str) -> float:
    """'2026-11-30 23:59:59' as epoch seconds."""
    import time

    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))


async def funded_key(ledger: Ledger, limits: KeyLimits, deposit: int = 10_000) -> tuple[int, str]:
    account = await ledger.create_account("alice")
    await ledger.deposit(account.id, deposit)
    return account.id, await ledger.create_key(account.id, limits=limits)


async def test_limits_are_stored_shown_and_changed(ledger: Ledger) -> None:
    account = await ledger.create_account("alice")
    limits = KeyLimits(spend_cap=500, rpm_limit=60, expires_at=2_000_000_000.0, models=("smol",))
    key = await ledger.create_key(account.id, limits=limits)
    plain = await ledger.create_key(account.id)
    shown = await ledger.find_key(key[:8])
    assert shown.limits == limits and shown.use == KeyUse()
    assert (await ledger.find_key(plain)).limits == KeyLimits()
    assert [k.limits for k in await ledger.list_keys(account.id)] == [limits, KeyLimits()]
    assert [k.prefix for k in await ledger.limited_keys()] == [key[:8]]  # the dashboard's: keys with a limit
    found = await ledger.authenticate_key(key)
    assert found is not None and found[0].id == account.id and found[1].limits == limits

    # Only the fields given change; null removes a limit.
    changed = await ledger.set_key_limits(key[:8], {"tpm_limit": 1000, "spend_cap": None, "models": ["a", "b"]})
    assert changed.limits == KeyLimits(rpm_limit=60, tpm_limit=1000, expires_at=2_000_000_000.0, models=("a", "b"))
    assert (await ledger.find_key(key)).limits == changed.limits

    with pytest.raises(ValueError, match="unknown limit 'rpm'"):
        await ledger.set_key_limits(key, {"rpm": 5})
    with pytest.raises(ValueError, match="rpm_limit must be 1 to"):
        await ledger.set_key_limits(key, {"rpm_limit": 0})
    with pytest.raises(ValueError, match="spend_cap must be a whole number"):
        await ledger.set_key_limits(key, {"spend_cap": 1.5})
    with pytest.raises(ValueError, match="at least one model"):
        await ledger.set_key_limits(key, {"models": []})
    with pytest.raises(ValueError, match="end of the year 9999"):
        await ledger.set_key_limits(key, {"expires_at": 1e300})
    with pytest.raises(UnknownKey, match="no API key has the prefix 'lk-nokey'"):
        await ledger.set_key_limits("lk-nokey", {"rpm_limit": 5})
    assert (await ledger.find_key(key)).limits == changed.limits


async def test_a_hold_past_the_spend_cap_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    account, key = await funded_key(ledger, KeyLimits(spend_cap=100))
    await ledger.hold(account, 60, request_id="r1", model="m", key_hash=hash_key(key))
    before = await snapshot(ledger, account)
    with pytest.raises(SpendCapExceeded) as refused:
        await ledger.hold(account, 50, request_id="r2", model="m", key_hash=hash_key(key))
    assert (refused.value.needed, refused.value.cap, refused.value.period, refused.value.available) == (
        50,
        100,
        "total",
        40,
    )
    assert await snapshot(ledger, account) == before
    assert (await ledger.find_key(key)).use == KeyUse(held=60)

    # Settling charges what was used: the rest of the hold is free again under the cap.
    await ledger.settle("r1", charge=30, node="n", prompt_tokens=3, completion_tokens=3)
    assert (await ledger.find_key(key)).use == KeyUse(spent=30, spent_day=30, spent_month=30, held=0)
    await ledger.hold(account, 70, request_id="r3", model="m", key_hash=hash_key(key))
    await ledger.release("r3")
    assert (await ledger.find_key(key)).use == KeyUse(spent=30, spent_day=30, spent_month=30, held=0)
    # Another key of the same account has its own caps (none).
    other = await ledger.create_key(account, limits=KeyLimits())
    await ledger.hold(account, 500, request_id="r4", model="m", key_hash=hash_key(other))
    await assert_balanced(ledger)


@pytest.mark.parametrize("period", ["day", "month"])
async def test_the_daily_and_monthly_caps_start_again_with_the_utc_day_and_month(url: str, period: str) -> None:
    clock = Clock(utc("2026-11-30 23:00:00"))
    async with ledger_at(url, clock=clock) as ledger:
        account, key = await funded_key(ledger, KeyLimits(**{f"spend_cap_{period}": 100}))  # type: ignore[arg-type]
        await ledger.hold(account, 80, request_id="r1", model="m", key_hash=hash_key(key))
        await ledger.settle("r1", charge=80, node="n", prompt_tokens=1, completion_tokens=1)
        with pytest.raises(SpendCapExceeded) as refused:
            await ledger.hold(account, 30, request_id="r2", model="m", key_hash=hash_key(key))
        assert (refused.value.period, refused.value.available) == (period, 20)
        clock.now = utc("2026-12-01 00:00:01")  # a new day and a new month
        await ledger.hold(account, 90, request_id="r3", model="m", key_hash=hash_key(key))
        await ledger.settle("r3", charge=90, node="n", prompt_tokens=1, completion_tokens=1)
        assert (await ledger.find_key(key)).use == KeyUse(spent=170, spent_day=90, spent_month=90)
        clock.now = utc("2026-12-02 00:00:01")  # a new day, the same month
        use = (await ledger.find_key(key)).use
        assert (use.spent_day, use.spent_month) == (0, 90)
        if period == "day":
            await ledger.hold(account, 100, request_id="r4", model="m", key_hash=hash_key(key))
        else:
            with pytest.raises(SpendCapExceeded):
                await ledger.hold(account, 11, request_id="r4", model="m", key_hash=hash_key(key))
        await assert_balanced(ledger)


async def test_racing_holds_never_pass_the_cap(ledger: Ledger) -> None:
    account, key = await funded_key(ledger, KeyLimits(spend_cap=500), deposit=100_000)
    results = await asyncio.gather(
        *(ledger.hold(account, 10, request_id=f"r{i}", model="m", key_hash=hash_key(key)) for i in range(120)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 50
    assert all(isinstance(r, SpendCapExceeded) for r in results if isinstance(r, BaseException))
    assert (await ledger.find_key(key)).use.held == 500
    assert (await ledger.account_state(account)).held == 500
    await assert_balanced(ledger)


async def test_recovery_gives_a_key_back_what_its_open_holds_kept(url: str) -> None:
    async with ledger_at(url) as ledger:
        account, key = await funded_key(ledger, KeyLimits(spend_cap=100))
        await ledger.hold(account, 100, request_id="r1", model="m", key_hash=hash_key(key))
    async with ledger_at(url) as ledger:  # the router starts again after dying with r1 in flight
        assert await ledger.recover() == 1
        assert (await ledger.find_key(key)).use == KeyUse()
        await ledger.hold(account, 100, request_id="r2", model="m", key_hash=hash_key(key))
        await assert_balanced(ledger)
