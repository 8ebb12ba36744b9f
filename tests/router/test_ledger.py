"""The ledger on a real SQLite file: accounts, keys, holds and settlements, crash recovery, concurrency."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamakit.router.ledger import (
    MAX_AMOUNT,
    UNATTRIBUTED,
    AccountExists,
    AccountState,
    HoldClosed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    UnknownAccount,
)


def assert_balanced(ledger: Ledger) -> None:
    """Deposits = balances + open holds + charges, for the whole ledger and for every account."""
    books = ledger.books()
    assert books.balanced, books
    assert books.deposits == books.balances + books.holds + books.charges
    for account in ledger.list_accounts():
        state = ledger.account_state(account.id)
        assert state.balance >= 0
        assert state.deposited == state.balance + state.held + state.spent, (account, state)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path: Path) -> Iterator[Ledger]:
    with Ledger(path) as ledger:
        yield ledger


@pytest.fixture
def funded(ledger: Ledger) -> int:
    """An account with 1000 credits."""
    account = ledger.create_account("alice")
    ledger.deposit(account.id, 1000, note="initial")
    return account.id


def snapshot(ledger: Ledger, account_id: int) -> tuple[AccountState, object, int]:
    return ledger.account_state(account_id), ledger.books(), len(ledger.all_usage(1000))


# -- accounts ---------------------------------------------------------------------------------------


def test_create_and_look_up_accounts(ledger: Ledger) -> None:
    alice = ledger.create_account("alice")
    bot = ledger.create_account("bot", kind="agent")
    assert (alice.name, alice.kind, alice.balance) == ("alice", "user", 0)
    assert bot.kind == "agent"
    assert ledger.get_account(bot.id) == bot
    assert ledger.account_by_name("alice") == alice
    assert ledger.list_accounts() == [alice, bot]
    assert_balanced(ledger)


def test_duplicate_names_unknown_accounts_and_bad_kinds_are_refused(ledger: Ledger) -> None:
    ledger.create_account("alice")
    with pytest.raises(AccountExists, match="'alice' already exists"):
        ledger.create_account("alice", kind="dev")
    with pytest.raises(UnknownAccount, match="id 99"):
        ledger.get_account(99)
    with pytest.raises(UnknownAccount, match="'bob'"):
        ledger.account_by_name("bob")
    with pytest.raises(ValueError, match="kind must be one of"):
        ledger.create_account("carol", kind="admin")
    with pytest.raises(ValueError, match="name"):
        ledger.create_account("  ")
    assert [a.name for a in ledger.list_accounts()] == ["alice"]


def test_accounts_survive_reopening(path: Path) -> None:
    with Ledger(path) as ledger:
        account = ledger.create_account("alice")
        ledger.deposit(account.id, 42)
    with Ledger(path) as ledger:
        assert ledger.account_by_name("alice").balance == 42
        assert_balanced(ledger)


def test_a_newer_schema_is_refused(path: Path) -> None:
    Ledger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger(path)


def test_a_closed_ledger_refuses_calls(path: Path) -> None:
    ledger = Ledger(path)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.list_accounts()


def test_in_memory_ledger_works() -> None:
    with Ledger(":memory:") as ledger:
        account = ledger.create_account("alice")
        assert ledger.deposit(account.id, 5) == 5
        assert_balanced(ledger)


# -- keys -------------------------------------------------------------------------------------------


def test_keys_authenticate_and_are_never_stored(path: Path) -> None:
    ledger = Ledger(path)
    alice = ledger.create_account("alice")
    bob = ledger.create_account("bob")
    key = ledger.create_key(alice.id)
    other = ledger.create_key(bob.id)
    assert key.startswith("lk-") and len(key) > 40
    assert key != other
    assert ledger.authenticate(key) == alice
    assert ledger.authenticate(other) == bob
    assert ledger.authenticate(key + "x") is None
    assert ledger.authenticate(key[:-1]) is None
    assert ledger.authenticate("") is None
    assert ledger.authenticate("Bearer " + key) is None
    [info] = ledger.list_keys(alice.id)
    assert info.prefix == key[:8] and info.active

    stored = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))
    # The hash is there (so we are reading the right bytes), the key itself is not.
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored
    assert key.encode() not in stored
    assert key[8:].encode() not in stored
    ledger.close()
    stored = path.read_bytes()
    assert key.encode() not in stored and other.encode() not in stored


def test_revoked_keys_fail(ledger: Ledger) -> None:
    alice = ledger.create_account("alice")
    by_prefix = ledger.create_key(alice.id)
    whole = ledger.create_key(alice.id)
    assert ledger.revoke_key(by_prefix[:8]) == 1
    assert ledger.authenticate(by_prefix) is None
    assert ledger.authenticate(whole) == ledger.get_account(alice.id)
    assert ledger.revoke_key(whole) == 1
    assert ledger.authenticate(whole) is None
    assert ledger.revoke_key(whole) == 0
    assert ledger.revoke_key("lk-nope!") == 0
    assert not any(key.active for key in ledger.list_keys(alice.id))
    with pytest.raises(ValueError, match="prefix"):
        ledger.revoke_key("lk-")
    with pytest.raises(UnknownAccount):
        ledger.create_key(99)


def test_an_ambiguous_prefix_revokes_nothing(path: Path, ledger: Ledger) -> None:
    alice = ledger.create_account("alice")
    first = ledger.create_key(alice.id)
    second = ledger.create_key(alice.id)
    with sqlite3.connect(path) as conn:  # force a prefix collision
        conn.execute("UPDATE api_keys SET prefix = 'lk-same1'")
    with pytest.raises(ValueError, match="matches 2 active keys"):
        ledger.revoke_key("lk-same1")
    assert ledger.authenticate(first) is not None
    assert ledger.authenticate(second) is not None


# -- deposits, holds, settlements -------------------------------------------------------------------


def test_deposit_returns_the_new_balance(ledger: Ledger) -> None:
    alice = ledger.create_account("alice")
    assert ledger.deposit(alice.id, 100) == 100
    assert ledger.deposit(alice.id, 23, note="top-up") == 123
    assert ledger.account_state(alice.id) == AccountState(balance=123, held=0, spent=0, deposited=123)
    assert_balanced(ledger)


@pytest.mark.parametrize("amount", [0, -5, True, 1.5, "10", None])
def test_deposit_refuses_anything_but_a_positive_int(ledger: Ledger, amount: object) -> None:
    alice = ledger.create_account("alice")
    with pytest.raises(ValueError, match="amount"):
        ledger.deposit(alice.id, amount)  # type: ignore[arg-type]
    assert ledger.books().deposits == 0


def test_amounts_stay_within_sqlite_integers(ledger: Ledger) -> None:
    alice = ledger.create_account("alice")
    with pytest.raises(ValueError, match="at most"):
        ledger.deposit(alice.id, MAX_AMOUNT + 1)
    ledger.deposit(alice.id, MAX_AMOUNT)
    with pytest.raises(ValueError, match="balance can be at most"):
        ledger.deposit(alice.id, 1)
    with pytest.raises(ValueError, match="at most"):
        ledger.hold(alice.id, 10**20, request_id="big", model="smol")
    assert ledger.account_state(alice.id).balance == MAX_AMOUNT
    assert_balanced(ledger)


def test_deposit_to_an_unknown_account(ledger: Ledger) -> None:
    with pytest.raises(UnknownAccount):
        ledger.deposit(7, 10)
    assert ledger.books().deposits == 0


def test_hold_then_settle_moves_exactly_the_charge(ledger: Ledger, funded: int) -> None:
    hold = ledger.hold(funded, 300, request_id="r1", model="smol", bid="1.5")
    assert (hold.amount, hold.status, hold.model) == (300, "open", "smol")
    assert ledger.account_state(funded) == AccountState(balance=700, held=300, spent=0, deposited=1000)
    assert_balanced(ledger)

    settlement = ledger.settle(
        "r1", charge=120, node="node-a", prompt_tokens=30, completion_tokens=20, latency_ms=12.5, queue_ms=3
    )
    assert (settlement.held, settlement.charged, settlement.refunded, settlement.balance) == (300, 120, 180, 880)
    assert settlement.node == "node-a"
    assert ledger.account_state(funded) == AccountState(balance=880, held=0, spent=120, deposited=1000)
    assert ledger.fees_by_node() == {"node-a": 120}
    assert ledger.fees_total() == 120
    hold_after = ledger.find_hold("r1")
    assert hold_after is not None and hold_after.status == "settled"

    usage = ledger.find_usage("r1")
    assert usage is not None
    assert (usage.status, usage.cost, usage.held, usage.node, usage.model) == ("ok", 120, 300, "node-a", "smol")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 20, 50)
    assert usage.bid == "1.5"  # taken from the hold when settle does not give one
    assert (usage.latency_ms, usage.queue_ms) == (12.5, 3.0)
    assert_balanced(ledger)


def test_release_refunds_the_whole_hold(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 400, request_id="r1", model="smol")
    ledger.release("r1", error="node failed before the first token", queue_ms=8.0)
    assert ledger.account_state(funded) == AccountState(balance=1000, held=0, spent=0, deposited=1000)
    usage = ledger.find_usage("r1")
    assert usage is not None
    assert (usage.status, usage.cost, usage.held, usage.error) == (
        "refunded",
        0,
        400,
        "node failed before the first token",
    )
    assert usage.queue_ms == 8.0
    assert ledger.fees_total() == 0
    assert_balanced(ledger)


def test_insufficient_funds_changes_nothing(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 600, request_id="r1", model="smol")
    before = snapshot(ledger, funded)
    with pytest.raises(InsufficientFunds) as caught:
        ledger.hold(funded, 401, request_id="r2", model="smol")
    assert (caught.value.needed, caught.value.balance) == (401, 400)
    assert "needs a hold of 401" in str(caught.value) and "balance is 400" in str(caught.value)
    assert snapshot(ledger, funded) == before
    assert ledger.find_hold("r2") is None
    # The exact balance is enough, and the refused request id was not used up.
    ledger.hold(funded, 400, request_id="r2", model="smol")
    assert ledger.account_state(funded).balance == 0
    assert_balanced(ledger)


def test_a_zero_hold_is_allowed_and_a_negative_one_is_not(ledger: Ledger) -> None:
    broke = ledger.create_account("broke")
    ledger.hold(broke.id, 0, request_id="free", model="smol")
    ledger.settle("free", charge=0, node="n", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(ValueError, match="amount"):
        ledger.hold(broke.id, -1, request_id="neg", model="smol")
    assert_balanced(ledger)


def test_duplicate_request_ids_are_refused(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 100, request_id="r1", model="smol")
    before = snapshot(ledger, funded)
    with pytest.raises(ValueError, match="already been used"):
        ledger.hold(funded, 100, request_id="r1", model="smol")
    ledger.settle("r1", charge=1, node="n", prompt_tokens=1, completion_tokens=0)
    with pytest.raises(ValueError, match="already been used"):
        ledger.hold(funded, 100, request_id="r1", model="smol")
    assert ledger.account_state(funded).balance == before[0].balance + 99
    assert_balanced(ledger)


def test_settle_caps_the_charge_at_the_hold(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 300, request_id="r1", model="smol")
    settlement = ledger.settle("r1", charge=10_000, node="node-a", prompt_tokens=9000, completion_tokens=9000)
    assert (settlement.charged, settlement.refunded) == (300, 0)
    assert ledger.account_state(funded) == AccountState(balance=700, held=0, spent=300, deposited=1000)
    usage = ledger.find_usage("r1")
    assert usage is not None and usage.cost == 300
    assert_balanced(ledger)


def test_a_hold_closes_only_once(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 300, request_id="settled", model="smol")
    ledger.hold(funded, 200, request_id="released", model="smol")
    ledger.settle("settled", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    ledger.release("released")
    before = snapshot(ledger, funded)
    with pytest.raises(HoldClosed, match="already settled") as caught:
        ledger.settle("settled", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    assert caught.value.status == "settled"
    with pytest.raises(HoldClosed, match="already settled"):
        ledger.release("settled")
    with pytest.raises(HoldClosed, match="already released"):
        ledger.settle("released", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(HoldClosed, match="already released"):
        ledger.release("released")
    with pytest.raises(HoldClosed, match="no hold") as unknown:
        ledger.settle("nope", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    assert unknown.value.status is None
    assert snapshot(ledger, funded) == before
    assert ledger.account_state(funded) == AccountState(balance=900, held=0, spent=100, deposited=1000)
    assert_balanced(ledger)


def test_settle_validates_before_touching_money(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 300, request_id="r1", model="smol")
    before = snapshot(ledger, funded)
    for bad in (
        {"charge": -1},
        {"charge": 1.5},
        {"prompt_tokens": -1},
        {"latency_ms": float("nan")},
        {"status": ""},
    ):
        arguments: dict[str, object] = {
            "charge": 1,
            "node": "n",
            "prompt_tokens": 1,
            "completion_tokens": 1,
            **bad,
        }
        with pytest.raises(ValueError):
            ledger.settle("r1", **arguments)  # type: ignore[arg-type]
    assert snapshot(ledger, funded) == before
    assert ledger.find_hold("r1") is not None


def test_a_failure_inside_settle_rolls_everything_back(
    ledger: Ledger, funded: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger.hold(funded, 300, request_id="r1", model="smol")
    before = snapshot(ledger, funded)

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    # The charge and the refund are written before the usage row; the failure must undo them.
    monkeypatch.setattr(Ledger, "_insert_usage", staticmethod(explode))
    with pytest.raises(RuntimeError, match="disk on fire"):
        ledger.settle("r1", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    assert snapshot(ledger, funded) == before
    assert ledger.fees_total() == 0
    monkeypatch.undo()
    ledger.settle("r1", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    assert ledger.account_state(funded).spent == 100
    assert_balanced(ledger)


def test_fees_are_attributed_to_nodes(ledger: Ledger, funded: int) -> None:
    for i, (node, charge) in enumerate([("a", 10), ("b", 20), ("a", 5), (None, 7)]):
        ledger.hold(funded, 50, request_id=f"r{i}", model="smol")
        ledger.settle(f"r{i}", charge=charge, node=node, prompt_tokens=1, completion_tokens=1)
    ledger.hold(funded, 50, request_id="refunded", model="smol")
    ledger.release("refunded")
    assert ledger.fees_by_node() == {"a": 15, "b": 20, UNATTRIBUTED: 7}
    assert ledger.fees_total() == 42 == sum(ledger.fees_by_node().values())
    assert_balanced(ledger)


# -- crash recovery ---------------------------------------------------------------------------------

CRASH = """
import os, sys
from llamakit.router.ledger import Ledger
ledger = Ledger(sys.argv[1])
account = ledger.account_by_name("alice")
ledger.hold(account.id, 100, request_id="in-flight-1", model="smol")
ledger.hold(account.id, 250, request_id="in-flight-2", model="smol")
ledger.hold(account.id, 50, request_id="done", model="smol")
ledger.settle("done", charge=30, node="n", prompt_tokens=3, completion_tokens=3)
os._exit(9)  # die without closing anything
"""


def test_recover_releases_the_holds_of_a_crashed_router(path: Path) -> None:
    with Ledger(path) as ledger:
        alice = ledger.create_account("alice")
        ledger.deposit(alice.id, 1000)

    crashed = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True, text=True)
    assert crashed.returncode == 9, crashed.stderr

    with Ledger(path) as ledger:
        # The holds are still there, and the books still balance with them.
        assert ledger.account_state(alice.id) == AccountState(balance=620, held=350, spent=30, deposited=1000)
        assert_balanced(ledger)
        assert ledger.recover() == 2
        assert ledger.account_state(alice.id) == AccountState(balance=970, held=0, spent=30, deposited=1000)
        for request_id in ("in-flight-1", "in-flight-2"):
            usage = ledger.find_usage(request_id)
            assert usage is not None and (usage.status, usage.cost) == ("recovered", 0)
        done = ledger.find_usage("done")
        assert done is not None and (done.status, done.cost) == ("ok", 30)
        assert ledger.recover() == 0
        assert_balanced(ledger)


def test_recover_after_a_close_without_settling(path: Path) -> None:
    ledger = Ledger(path)
    alice = ledger.create_account("alice")
    ledger.deposit(alice.id, 500)
    ledger.hold(alice.id, 200, request_id="r1", model="smol")
    ledger.close()
    with Ledger(path) as reopened:
        assert reopened.account_state(alice.id).held == 200
        assert reopened.recover() == 1
        assert reopened.account_state(alice.id) == AccountState(balance=500, held=0, spent=0, deposited=500)
        with pytest.raises(HoldClosed):
            reopened.settle("r1", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
        assert_balanced(reopened)


# -- usage and events -------------------------------------------------------------------------------


def test_usage_is_paged_newest_first(ledger: Ledger, funded: int) -> None:
    other = ledger.create_account("bob")
    ledger.deposit(other.id, 100)
    ledger.hold(other.id, 10, request_id="bob-1", model="smol")
    ledger.settle("bob-1", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    for i in range(25):
        ledger.hold(funded, 10, request_id=f"r{i:02}", model="smol")
        if i % 5 == 0:
            ledger.release(f"r{i:02}")
        else:
            ledger.settle(f"r{i:02}", charge=i % 10, node="n", prompt_tokens=i, completion_tokens=1)

    pages = []
    before = None
    while True:
        page = ledger.usage_records(funded, limit=10, before=before)
        if not page:
            break
        pages.append(page)
        before = page[-1].id
    assert [len(page) for page in pages] == [10, 10, 5]
    records = [record for page in pages for record in page]
    assert [r.request_id for r in records] == [f"r{i:02}" for i in reversed(range(25))]
    assert all(r.account_id == funded for r in records)
    assert [r.id for r in records] == sorted((r.id for r in records), reverse=True)
    assert sum(r.status == "refunded" for r in records) == 5

    assert len(ledger.usage_records(funded, limit=0)) == 1
    assert len(ledger.usage_records(funded, limit=-3)) == 1
    assert len(ledger.usage_records(funded, limit=10**6)) == 25
    assert len(ledger.all_usage(1000)) == 26
    assert ledger.all_usage(1)[0].request_id == "r24"
    assert ledger.find_usage("missing") is None
    with pytest.raises(UnknownAccount):
        ledger.usage_records(99)
    assert_balanced(ledger)


def test_event_summary_counts_kinds_and_keeps_the_latest_position(ledger: Ledger) -> None:
    bot = ledger.create_account("trader", kind="agent")
    quiet = ledger.create_account("quiet", kind="agent")
    other = ledger.create_account("other", kind="agent")
    ledger.record_event(bot.id, "request", {})
    ledger.record_event(bot.id, "buy", {"position": 1, "pnl": 0.0})
    ledger.record_event(bot.id, "buy", {"position": 2, "pnl": -1.5})
    ledger.record_event(bot.id, "skip", {"reason": "negative"})
    last_id = ledger.record_event(bot.id, "error", {"position": None, "pnl": "n/a"})
    ledger.record_event(other.id, "buy", {"position": 7})

    summary = ledger.event_summary()
    assert set(summary) == {"trader", "other"}
    trader = summary["trader"]
    assert trader["counts"] == {"request": 1, "buy": 2, "skip": 1, "error": 1}
    assert trader["total"] == 5
    # The last event has no numeric position or PnL, so the latest numeric ones are reported.
    assert (trader["position"], trader["pnl"]) == (2, -1.5)
    assert (summary["other"]["position"], summary["other"]["pnl"]) == (7, None)

    events = ledger.events(bot.id, limit=2)
    assert [e.kind for e in events] == ["error", "skip"]
    assert events[0].id == last_id and events[0].data == {"position": None, "pnl": "n/a"}
    assert ledger.events(quiet.id) == []


def test_events_must_be_json_objects(ledger: Ledger) -> None:
    bot = ledger.create_account("bot", kind="agent")
    with pytest.raises(ValueError, match="JSON"):
        ledger.record_event(bot.id, "buy", {"pnl": float("nan")})
    with pytest.raises(ValueError, match="JSON"):
        ledger.record_event(bot.id, "buy", {"when": object()})
    with pytest.raises(ValueError, match="JSON object"):
        ledger.record_event(bot.id, "buy", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        ledger.record_event(bot.id, "", {})
    with pytest.raises(UnknownAccount):
        ledger.record_event(99, "buy", {})
    assert ledger.events(bot.id) == []
    assert ledger.event_summary() == {}


# -- concurrency ------------------------------------------------------------------------------------


def test_concurrent_holds_never_overdraw(ledger: Ledger) -> None:
    amount, threads, per_thread, affordable = 7, 8, 50, 150
    account = ledger.create_account("hot")
    deposit = amount * affordable + 3
    ledger.deposit(account.id, deposit)
    successes: list[str] = []
    refusals: list[InsufficientFunds] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)
    record = threading.Lock()

    def worker(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            request_id = f"t{t}-{i}"
            try:
                ledger.hold(account.id, amount, request_id=request_id, model="smol")
            except InsufficientFunds as exc:
                with record:
                    refusals.append(exc)
            except BaseException as exc:
                with record:
                    errors.append(exc)
            else:
                with record:
                    successes.append(request_id)
            if ledger.account_state(account.id).balance < 0:
                errors.append(AssertionError("negative balance"))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()

    assert errors == []
    assert len(successes) == affordable
    assert len(refusals) == threads * per_thread - affordable
    assert all(exc.balance < amount for exc in refusals)
    state = ledger.account_state(account.id)
    assert state.balance == 3
    assert len(successes) * amount + state.balance == deposit
    assert state.held == len(successes) * amount
    assert_balanced(ledger)


def test_concurrent_settles_of_one_hold_charge_once(ledger: Ledger, funded: int) -> None:
    ledger.hold(funded, 100, request_id="r1", model="smol")
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def close(i: int) -> None:
        start.wait()
        try:
            if i % 2:
                ledger.settle("r1", charge=60, node=f"n{i}", prompt_tokens=1, completion_tokens=1)
            else:
                ledger.release("r1")
        except HoldClosed:
            outcomes.append("closed")
        else:
            outcomes.append("won")

    pool = [threading.Thread(target=close, args=(i,)) for i in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert sorted(outcomes) == ["closed"] * 7 + ["won"]
    state = ledger.account_state(funded)
    assert state.held == 0
    assert state.spent in (0, 60)
    assert len(ledger.all_usage(100)) == 1
    assert_balanced(ledger)
