"""Each usage record keeps the money it was priced at, on each backend: the credit value and currency of the
ledger that wrote it, whatever the ledger is opened with later; records from before that stay priced at the
value of the day."""

from __future__ import annotations

import sqlite3
from decimal import Decimal

from llamakit.money.currency import CreditValue
from llamakit.router.ledger import Ledger, backend_of, latest, ledger_at
from llamakit.router.ledger._migrations import migrations
from tests.router.ledger.conftest import execute, undo_delivery_checkpoints, undo_running_totals

EUROS = CreditValue(Decimal("0.0025"), "EUR")
DOLLARS = CreditValue(Decimal("0.01"), "USD")


async def prices(ledger: Ledger) -> dict[str, tuple[str | None, str | None]]:
    return {r.request_id: (r.credit_value, r.currency) for r in await ledger.all_usage(1000)}


async def test_every_usage_record_keeps_the_credit_value_it_was_made_at(url: str) -> None:
    async with ledger_at(url, money=EUROS) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 1_000)
        await ledger.hold(alice.id, 100, request_id="settled", model="smol")
        await ledger.settle("settled", charge=27, node="n", prompt_tokens=7, completion_tokens=10)
        await ledger.hold(alice.id, 100, request_id="released", model="smol")
        await ledger.release("released", error="node failed")
        await ledger.refuse(alice.id, request_id="refused", model="smol", status="x", http_status=400, error="bad")
        await ledger.hold(alice.id, 100, request_id="left-open", model="smol")
    # The operator restarts with another credit value: what was sold keeps its price.
    async with ledger_at(url, money=DOLLARS) as ledger:
        assert len(await ledger.recover_usage()) == 1
        await ledger.hold(alice.id, 100, request_id="later", model="smol")
        await ledger.settle("later", charge=27, node="n", prompt_tokens=7, completion_tokens=10)
        assert await prices(ledger) == {
            "settled": ("0.0025", "EUR"),
            "released": ("0.0025", "EUR"),
            "refused": ("0.0025", "EUR"),
            "left-open": ("0.01", "USD"),  # released now, at today's value (it charged nothing)
            "later": ("0.01", "USD"),
        }
        settled = await ledger.find_usage("settled")
        assert settled is not None and settled.priced_at(DOLLARS) == (EUROS, False)
        assert settled.priced_at(DOLLARS)[0].price(settled.cost) == Decimal("0.0675")
        assert (await ledger.books()).balanced
    # A ledger opened without a router's money (a script, a test) writes no price.
    async with ledger_at(url) as ledger:
        await ledger.hold(alice.id, 100, request_id="scripted", model="smol")
        await ledger.settle("scripted", charge=1, node=None, prompt_tokens=1, completion_tokens=0)
        scripted = await ledger.find_usage("scripted")
        assert scripted is not None and (scripted.credit_value, scripted.currency) == (None, None)
        assert scripted.priced_at(DOLLARS) == (DOLLARS, True)


async def test_a_ledger_from_before_prices_upgrades_in_place(url: str) -> None:
    """A ledger at version 8 (no prices on usage records) keeps its records, priced at the value of the day,
    and its holds still open are closed with a price after the upgrade."""
    async with ledger_at(url) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 1_000)
        await ledger.hold(alice.id, 100, request_id="old", model="smol")
        await ledger.settle("old", charge=40, node="n", prompt_tokens=1, completion_tokens=1)
        await ledger.hold(alice.id, 100, request_id="open", model="smol")
    await undo_delivery_checkpoints(url)  # version 14's
    await undo_running_totals(url)  # version 13's
    later = ("credit_value", "currency", "overhead_ms", "cached_tokens", "cache_discount", "passed_over")
    for later_column in later:  # versions 9's, 11's and 12's
        await execute(url, f"ALTER TABLE usage DROP COLUMN {later_column}")
    if backend_of(url) == "sqlite":
        await execute(url, "PRAGMA user_version = 8")
    else:
        # Version 8's llamakit_close, which knows nothing of prices: the upgrade must replace it.
        v6 = migrations("postgres")[5].sql
        await execute(url, v6[v6.index("CREATE OR REPLACE FUNCTION llamakit_close") :])
        await execute(url, "UPDATE llamakit_schema SET version = 8")

    async with ledger_at(url, money=EUROS) as ledger:
        old = await ledger.find_usage("old")
        assert old is not None and (old.cost, old.credit_value, old.currency) == (40, None, None)
        assert old.priced_at(EUROS) == (EUROS, True)
        assert [r.request_id for r in await ledger.recover_usage()] == ["open"]
        await ledger.hold(alice.id, 100, request_id="new", model="smol")
        await ledger.settle("new", charge=30, node="n", prompt_tokens=1, completion_tokens=1)
        assert await prices(ledger) == {"old": (None, None), "open": ("0.0025", "EUR"), "new": ("0.0025", "EUR")}
        assert (await ledger.books()).balanced
    if backend_of(url) == "sqlite":
        with sqlite3.connect(url) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == latest("sqlite")
        conn.close()
