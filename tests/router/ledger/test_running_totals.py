"""Running totals, the audit that proves them, and archives, on each backend (see conftest.py).

The books, each account's figures, each node's fees and each day's and month's are running totals kept by the
transaction that changes them; the audit counts them again from the history, and says so when they differ,
changing nothing; an archive moves old records to a file and the books still add up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest

from llamakit.router.ledger import (
    ARCHIVE_COLUMNS,
    UNATTRIBUTED,
    AccountState,
    Books,
    CacheSavings,
    KeyLimits,
    Ledger,
    PeriodTotals,
    Remembered,
    hash_key,
    ledger_at,
)
from tests.router.ledger.conftest import execute
from tests.router.ledger.test_contract import CRASH, assert_balanced

DAY = 86_400.0
# 2026-11-30 12:00 UTC, and the next day at the same hour.
MONDAY = 1_796_040_000.0
TUESDAY = MONDAY + DAY


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def history(ledger: Ledger, clock: Clock) -> dict[str, int]:
    """Two accounts' deposits, settlements on two nodes and none, a release and refusals, on two days; the
    accounts' ids by name."""
    alice = await ledger.create_account("alice")
    bob = await ledger.create_account("bob", kind="agent")
    await ledger.deposit(alice.id, 10_000)
    await ledger.deposit(bob.id, 5_000)
    await ledger.deposit(bob.id, 500)
    key = await ledger.create_key(alice.id, limits=KeyLimits(spend_cap_day=5_000))
    for day in (MONDAY, TUESDAY):
        clock.now = day
        for i, (account, node, charge) in enumerate(
            [(alice.id, "n1", 120), (alice.id, "n2", 75), (bob.id, "n1", 300), (bob.id, None, 10)]
        ):
            rid = f"{day:.0f}-{i}"
            await ledger.hold(account, 400, request_id=rid, model="smol", key_hash=hash_key(key) if i == 0 else None)
            await ledger.settle(rid, charge=charge, node=node, prompt_tokens=3, completion_tokens=5,
                                cached_tokens=2 if i == 1 else 0, cache_discount=4 if i == 1 else 0)  # fmt: skip
        await ledger.hold(alice.id, 50, request_id=f"{day:.0f}-released", model="smol")
        await ledger.release(f"{day:.0f}-released", status="no_node", http_status=503)
        await ledger.refuse(bob.id, request_id=f"{day:.0f}-refused", model="smol", status="insufficient_funds",
                            http_status=402, error="too poor")  # fmt: skip
    await ledger.hold(alice.id, 200, request_id="open", model="smol")
    return {"alice": alice.id, "bob": bob.id}


async def test_running_totals_are_what_the_history_adds_up_to(url: str) -> None:
    clock = Clock(MONDAY)
    async with ledger_at(url, clock=clock) as ledger:
        ids = await history(ledger, clock)
        # Alice: 2 days × (120 + 75) charged, 200 held; Bob: 2 × 310 charged.
        assert await ledger.books() == Books(deposits=15_500, balances=15_500 - 200 - 1010, holds=200, charges=1010)
        assert await ledger.account_state(ids["alice"]) == AccountState(
            balance=10_000 - 390 - 200, held=200, spent=390, deposited=10_000
        )
        assert await ledger.account_state(ids["bob"]) == AccountState(
            balance=5_500 - 620, held=0, spent=620, deposited=5_500
        )
        assert await ledger.fees_by_node() == {"n1": 840, "n2": 150, UNATTRIBUTED: 20}
        assert await ledger.cache_savings() == CacheSavings(cached_tokens=4, discount=8)
        totals = await ledger.totals()
        assert (totals.accounts, totals.requests) == (2, 12)
        # Tuesday: four settlements, a release answered with a 503, a refusal; both accounts active.
        assert totals.today == PeriodTotals("2026-12-01", spent=505, requests=6, refusals=2, accounts=2)
        assert totals.month == PeriodTotals("2026-12", spent=505, requests=6, refusals=2, accounts=2)
        top = await ledger.top_accounts()
        assert [(a.name, a.spent, a.requests, a.refusals, a.held) for a in top] == [
            ("bob", 310, 3, 1, 0),
            ("alice", 195, 3, 1, 200),
        ]
        assert top[0].last_seen == TUESDAY
        clock.now = TUESDAY + DAY  # a new day: nobody has spent anything in it yet
        assert await ledger.top_accounts() == []
        assert (await ledger.totals()).today == PeriodTotals("2026-12-02")
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies
        assert audit.scanned == 3 + 8 + 12  # deposits, charges and usage records


async def test_accounts_are_paged_by_name_or_by_spend_and_found_by_name(ledger: Ledger) -> None:
    for i in range(12):
        account = await ledger.create_account(f"Tenant-{i:02d}")
        await ledger.deposit(account.id, 1_000)
        if i % 3 == 0:
            await ledger.hold(account.id, 100, request_id=f"r{i}", model="smol")
            await ledger.settle(f"r{i}", charge=10 * i + 5, node="n", prompt_tokens=1, completion_tokens=1)
    first = await ledger.accounts_page(limit=5)
    assert [a.name for a in first] == [f"Tenant-{i:02d}" for i in range(5)]
    second = await ledger.accounts_page(limit=5, after=first[-1].name)
    assert [a.name for a in second] == [f"Tenant-{i:02d}" for i in range(5, 10)]
    assert [a.name for a in await ledger.accounts_page(search="ANT-1")] == ["Tenant-10", "Tenant-11"]
    spenders = await ledger.accounts_page(order="spent_today", limit=2)
    assert [(a.name, a.spent) for a in spenders] == [("Tenant-09", 95), ("Tenant-06", 65)]
    cursor = f"{spenders[-1].spent}:{spenders[-1].id}"
    rest = await ledger.accounts_page(order="spent_today", after=cursor)
    assert [(a.name, a.spent) for a in rest] == [("Tenant-03", 35), ("Tenant-00", 5)]
    assert await ledger.account_names([first[0].id, first[1].id, 999]) == {first[0].id: "Tenant-00",
                                                                            first[1].id: "Tenant-01"}  # fmt: skip
    with pytest.raises(ValueError, match="order"):
        await ledger.accounts_page(order="balance")
    with pytest.raises(ValueError, match="cursor"):
        await ledger.accounts_page(order="spent_today", after="lots")


async def test_keys_with_limits_are_paged(ledger: Ledger) -> None:
    accounts = [await ledger.create_account(f"a{i}") for i in range(3)]
    for account in accounts:
        await ledger.create_key(account.id)  # no limit: never listed
        for rpm in (10, 20):
            await ledger.create_key(account.id, limits=KeyLimits(rpm_limit=rpm))
    everything = await ledger.limited_keys()
    assert len(everything) == 6
    page = await ledger.limited_keys(limit=4)
    last = page[-1]
    rest = await ledger.limited_keys(limit=4, after=(last.account_id, last.created, last.prefix))
    assert page + rest == everything
    mine = await ledger.limited_keys(accounts=[accounts[1].id])
    assert {k.account_id for k in mine} == {accounts[1].id} and len(mine) == 2


async def test_totals_survive_a_crash_and_the_recovery_that_follows(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 1000)
    crashed = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASH, url, cwd=Path(__file__).parents[3])
    assert await crashed.wait() == -signal.SIGKILL
    async with ledger_at(url) as ledger:
        assert await ledger.books() == Books(deposits=1000, balances=620, holds=350, charges=30)
        assert (await ledger.audit()).ok
        assert await ledger.recover() == 2
        assert await ledger.books() == Books(deposits=1000, balances=970, holds=0, charges=30)
        assert await ledger.account_state(alice.id) == AccountState(balance=970, held=0, spent=30, deposited=1000)
        assert (await ledger.totals()).requests == 3
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies
        await assert_balanced(ledger)


@pytest.mark.parametrize(
    ("corruption", "named"),
    [
        ("UPDATE ledger_totals SET charges = charges + 7, balances = balances - 7", "totals: charges"),
        ("UPDATE accounts SET spent = spent + 3 WHERE name = 'bob'", "account 2 (bob): spent"),
        ("UPDATE accounts SET balance = balance + 5 WHERE name = 'alice'", "books: deposits"),
        ("UPDATE node_fees SET charged = charged - 1 WHERE node = 'n2'", "node 'n2': fees"),
        ("UPDATE account_periods SET requests = requests + 1 WHERE period = '2026-12-01' AND account_id = 1",
         "account 1 in 2026-12-01: requests"),
        ("UPDATE ledger_periods SET accounts = 1 WHERE period = '2026-12'", "ledger in 2026-12: accounts"),
        ("UPDATE api_keys SET held = 40", ": held"),
        ("UPDATE ledger_totals SET cache_discount = cache_discount + 1", "totals: cache_discount"),
    ],
)  # fmt: skip
async def test_an_audit_that_disagrees_is_an_alarm_and_changes_nothing(url: str, corruption: str, named: str) -> None:
    clock = Clock(MONDAY)
    async with ledger_at(url, clock=clock) as ledger:
        await history(ledger, clock)
        assert (await ledger.audit()).ok
        books, fees, top = await ledger.books(), await ledger.fees_by_node(), await ledger.top_accounts()
    await execute(url, corruption)  # behind the ledger's back
    async with ledger_at(url, clock=clock) as ledger:
        corrupted = (await ledger.books(), await ledger.fees_by_node(), await ledger.top_accounts())
        audit = await ledger.audit()
        assert not audit.ok
        assert any(named in d.what for d in audit.discrepancies), audit.discrepancies
        assert all(d.kept != d.counted for d in audit.discrepancies)
        # Nothing fixed: the figures read the same after the audit, and a second audit finds the same.
        assert (await ledger.books(), await ledger.fees_by_node(), await ledger.top_accounts()) == corrupted
        assert (await ledger.audit()).discrepancies == audit.discrepancies
    if "SET charges" in corruption:
        assert corrupted[0] != books
    if "node_fees" in corruption:
        assert corrupted[1] != fees
    if "account_periods" in corruption:
        assert corrupted[2] != top


async def test_an_archive_moves_old_records_to_a_file_pandas_reads_and_the_books_still_add_up(
    url: str, tmp_path: Path
) -> None:
    clock = Clock(MONDAY)
    async with ledger_at(url, clock=clock) as ledger:
        ids = await history(ledger, clock)
        alice = ids["alice"]
        clock.now = MONDAY + 3600
        await ledger.hold(alice, 100, request_id="remembered", model="smol")
        await ledger.settle("remembered", charge=20, node="n2", prompt_tokens=1, completion_tokens=1,
                            remember=Remembered("idem-1", "fp", '{"answer": 1}'))  # fmt: skip
        clock.now = TUESDAY + 60
        before = (await ledger.books(), await ledger.fees_by_node(), await ledger.totals())
        savings = await ledger.cache_savings()
        states = {name: await ledger.account_state(i) for name, i in ids.items()}
        tuesday_usage = await ledger.all_usage(1000, since=TUESDAY - 12 * 3600)
        midnight = TUESDAY - 12 * 3600  # 2026-12-01 00:00 UTC

        report = await ledger.archive(midnight, tmp_path / "monday.jsonl.gz")
        assert report.records == 7  # Monday: four settlements, a release, a refusal, the remembered one
        assert report.charged == 505 + 20
        frame = pd.read_json(tmp_path / "monday.jsonl.gz", lines=True)
        assert list(frame.columns) == list(ARCHIVE_COLUMNS)
        assert len(frame) == 7 and frame["created"].max() < midnight
        assert frame["charged"].sum() == 525 and frame["cost_credits"].sum() == 525
        assert set(frame["account"]) == {"alice", "bob"}
        assert frame.loc[frame["request_id"] == "remembered", "idempotency_key"].item() == "idem-1"
        refused = frame.loc[frame["status"] == "insufficient_funds"].iloc[0]
        assert refused["http_status"] == 402 and pd.isna(refused["hold_status"])

        # The running totals are what they were; the audit still balances, with the archive carried.
        assert (await ledger.books(), await ledger.fees_by_node(), await ledger.totals()) == (
            before[0],
            before[1],
            dataclasses.replace(before[2], archived_before=midnight),
        )
        assert {name: await ledger.account_state(i) for name, i in ids.items()} == states
        assert await ledger.cache_savings() == savings and frame["cached_tokens"].sum() == 2
        audit = await ledger.audit()
        assert audit.ok, audit.discrepancies
        await assert_balanced(ledger)
        # What stays: Tuesday's records, and the hold still open, however old.
        assert await ledger.all_usage(1000) == tuesday_usage
        assert await ledger.find_usage(f"{MONDAY:.0f}-0") is None
        assert (await ledger.find_hold("open")) is not None
        assert await ledger.recall(alice, "idem-1") is None

        # Life goes on: new requests, a second archive with nothing to move, the audit still balances.
        await ledger.hold(alice, 100, request_id="after", model="smol")
        await ledger.settle("after", charge=33, node="n1", prompt_tokens=1, completion_tokens=1)
        again = await ledger.archive(midnight, tmp_path / "nothing.jsonl.gz")
        assert again.records == 0 and pd.read_json(tmp_path / "nothing.jsonl.gz", lines=True).empty
        with pytest.raises(ValueError, match="exists"):
            await ledger.archive(midnight, tmp_path / "monday.jsonl.gz")
        assert (await ledger.audit()).ok
        assert (await ledger.books()).charges == before[0].charges + 33

    async with ledger_at(url, clock=clock) as reopened:
        assert (await reopened.audit()).ok
    await execute(url, "UPDATE archived_accounts SET charged = charged + 1")
    async with ledger_at(url, clock=clock) as reopened:
        audit = await reopened.audit()
        assert not audit.ok and any("spent" in d.what for d in audit.discrepancies)


async def test_several_routers_on_one_database_keep_the_totals_exact(url: str) -> None:
    """Routers selling to the same accounts at once (a cluster's, on PostgreSQL): no total is lost or doubled."""
    ledgers = [ledger_at(url) for _ in range(4)]
    await asyncio.gather(*(ledger.open() for ledger in ledgers))
    try:
        accounts = [await ledgers[0].create_account(f"shared-{i}") for i in range(3)]
        for account in accounts:
            await ledgers[1].deposit(account.id, 1_000_000)

        async def sell(ledger: Ledger, router: int) -> int:
            charged = 0
            for batch in range(10):
                ids = [(f"{router}-{batch}-{i}", accounts[i % 3].id) for i in range(20)]
                await asyncio.gather(*(ledger.hold(a, 50, request_id=r, model="m") for r, a in ids))
                done = await asyncio.gather(
                    *(ledger.settle(r, charge=i % 7, node=f"n{router}", prompt_tokens=1, completion_tokens=1)
                      for i, (r, _) in enumerate(ids) if i % 5)
                )  # fmt: skip
                for i, (r, _) in enumerate(ids):
                    if not i % 5:
                        await ledger.release(r)
                charged += sum(s.charged for s in done)
            return charged

        charged = await asyncio.gather(*(sell(ledger, n) for n, ledger in enumerate(ledgers)))
        books = await ledgers[2].books()
        assert books == Books(deposits=3_000_000, balances=3_000_000 - sum(charged), holds=0, charges=sum(charged))
        assert await ledgers[3].fees_by_node() == {f"n{n}": c for n, c in enumerate(charged)}
        totals = await ledgers[0].totals()
        assert totals.requests == 4 * 10 * 20 and totals.today.accounts == 3
        audit = await ledgers[0].audit()
        assert audit.ok, audit.discrepancies
    finally:
        await asyncio.gather(*(ledger.close() for ledger in ledgers))
