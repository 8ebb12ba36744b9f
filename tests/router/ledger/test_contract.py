"""The ledger's contract, on each backend: accounts, keys, holds and settlements, crash recovery, concurrency.

Every test runs on SQLite and on PostgreSQL (see conftest.py), against the real database.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
import uuid
from pathlib import Path

import pytest

from llamakit.router.ledger import (
    MAX_AMOUNT,
    MAX_EVENT_BYTES,
    UNATTRIBUTED,
    AccountExists,
    AccountState,
    HoldClosed,
    InsufficientFunds,
    Ledger,
    LedgerError,
    Remembered,
    UnknownAccount,
    backend_of,
    ledger_at,
)
from tests.router.ledger.conftest import execute, stored_bytes


async def assert_balanced(ledger: Ledger) -> None:
    """Deposits = balances + open holds + charges, for the whole ledger and for every account."""
    books = await ledger.books()
    assert books.balanced, books
    assert books.deposits == books.balances + books.holds + books.charges
    for account in await ledger.list_accounts():
        state = await ledger.account_state(account.id)
        assert state.balance >= 0
        assert state.deposited == state.balance + state.held + state.spent, (account, state)


@pytest.fixture
async def funded(ledger: Ledger) -> int:
    """An account with 1000 credits."""
    account = await ledger.create_account("alice")
    await ledger.deposit(account.id, 1000, note="initial")
    return account.id


async def snapshot(ledger: Ledger, account_id: int) -> tuple[AccountState, object, int]:
    return await ledger.account_state(account_id), await ledger.books(), len(await ledger.all_usage(1000))


# -- accounts ---------------------------------------------------------------------------------------


async def test_create_and_look_up_accounts(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    bot = await ledger.create_account("bot", kind="agent")
    assert (alice.name, alice.kind, alice.balance) == ("alice", "user", 0)
    assert bot.kind == "agent"
    assert await ledger.get_account(bot.id) == bot
    assert await ledger.account_by_name("alice") == alice
    assert await ledger.list_accounts() == [alice, bot]
    await assert_balanced(ledger)


async def test_duplicate_names_unknown_accounts_and_bad_kinds_are_refused(ledger: Ledger) -> None:
    await ledger.create_account("alice")
    with pytest.raises(AccountExists, match="'alice' already exists"):
        await ledger.create_account("alice", kind="dev")
    with pytest.raises(UnknownAccount, match="id 99"):
        await ledger.get_account(99)
    with pytest.raises(UnknownAccount, match="'bob'"):
        await ledger.account_by_name("bob")
    with pytest.raises(ValueError, match="kind must be one of"):
        await ledger.create_account("carol", kind="admin")
    with pytest.raises(ValueError, match="name"):
        await ledger.create_account("  ")
    assert [a.name for a in await ledger.list_accounts()] == ["alice"]


async def test_accounts_survive_reopening(url: str) -> None:
    async with ledger_at(url) as ledger:
        account = await ledger.create_account("alice")
        await ledger.deposit(account.id, 42)
    async with ledger_at(url) as ledger:
        assert (await ledger.account_by_name("alice")).balance == 42
        await assert_balanced(ledger)


async def test_a_newer_schema_is_refused(url: str) -> None:
    async with ledger_at(url):
        pass
    if backend_of(url) == "sqlite":
        await execute(url, "PRAGMA user_version = 99")
    else:
        await execute(url, "UPDATE llamakit_schema SET version = 99")
    with pytest.raises(LedgerError, match="schema version 99"):
        await ledger_at(url).open()


async def test_a_closed_ledger_refuses_calls(url: str) -> None:
    ledger = ledger_at(url)
    with pytest.raises(LedgerError, match="not open"):
        await ledger.list_accounts()
    await ledger.open()
    await ledger.close()
    await ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        await ledger.list_accounts()
    with pytest.raises(LedgerError, match="closed"):
        await ledger.hold(1, 1, request_id="r", model="m")


async def test_in_memory_ledger_works() -> None:
    async with ledger_at(":memory:") as ledger:
        account = await ledger.create_account("alice")
        assert await ledger.deposit(account.id, 5) == 5
        await assert_balanced(ledger)


# -- keys -------------------------------------------------------------------------------------------


async def test_keys_authenticate_and_are_never_stored(url: str) -> None:
    ledger = await ledger_at(url).__aenter__()
    alice = await ledger.create_account("alice")
    bob = await ledger.create_account("bob")
    key = await ledger.create_key(alice.id)
    other = await ledger.create_key(bob.id)
    assert key.startswith("lk-") and len(key) > 40
    assert key != other
    assert await ledger.authenticate(key) == alice
    assert await ledger.authenticate(other) == bob
    assert await ledger.authenticate(key + "x") is None
    assert await ledger.authenticate(key[:-1]) is None
    assert await ledger.authenticate("") is None
    assert await ledger.authenticate("Bearer " + key) is None
    [info] = await ledger.list_keys(alice.id)
    assert info.prefix == key[:8] and info.active

    stored = await stored_bytes(url)
    # The hash is there (so we are reading the right bytes), the key itself is not.
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored
    assert key.encode() not in stored
    assert key[8:].encode() not in stored
    await ledger.close()
    stored = await stored_bytes(url)
    assert key.encode() not in stored and other.encode() not in stored


async def test_revoked_keys_fail(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    by_prefix = await ledger.create_key(alice.id)
    whole = await ledger.create_key(alice.id)
    assert await ledger.revoke_key(by_prefix[:8]) == 1
    assert await ledger.authenticate(by_prefix) is None
    assert await ledger.authenticate(whole) == await ledger.get_account(alice.id)
    assert await ledger.revoke_key(whole) == 1
    assert await ledger.authenticate(whole) is None
    assert await ledger.revoke_key(whole) == 0
    assert await ledger.revoke_key("lk-nope!") == 0
    assert not any(key.active for key in await ledger.list_keys(alice.id))
    with pytest.raises(ValueError, match="prefix"):
        await ledger.revoke_key("lk-")
    with pytest.raises(UnknownAccount):
        await ledger.create_key(99)


async def test_an_ambiguous_prefix_revokes_nothing(url: str, ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    first = await ledger.create_key(alice.id)
    second = await ledger.create_key(alice.id)
    await execute(url, "UPDATE api_keys SET prefix = 'lk-same1'")  # force a prefix collision
    with pytest.raises(ValueError, match="matches 2 active keys"):
        await ledger.revoke_key("lk-same1")
    assert await ledger.authenticate(first) is not None
    assert await ledger.authenticate(second) is not None


# -- deposits, holds, settlements -------------------------------------------------------------------


async def test_deposit_returns_the_new_balance(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    assert await ledger.deposit(alice.id, 100) == 100
    assert await ledger.deposit(alice.id, 23, note="top-up") == 123
    assert await ledger.account_state(alice.id) == AccountState(balance=123, held=0, spent=0, deposited=123)
    await assert_balanced(ledger)


@pytest.mark.parametrize("amount", [0, -5, True, 1.5, "10", None])
async def test_deposit_refuses_anything_but_a_positive_int(ledger: Ledger, amount: object) -> None:
    alice = await ledger.create_account("alice")
    with pytest.raises(ValueError, match="amount"):
        await ledger.deposit(alice.id, amount)  # type: ignore[arg-type]
    assert (await ledger.books()).deposits == 0


async def test_amounts_stay_within_sqlite_integers(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    with pytest.raises(ValueError, match="at most"):
        await ledger.deposit(alice.id, MAX_AMOUNT + 1)
    await ledger.deposit(alice.id, MAX_AMOUNT)
    with pytest.raises(ValueError, match="balance can be at most"):
        await ledger.deposit(alice.id, 1)
    with pytest.raises(ValueError, match="at most"):
        await ledger.hold(alice.id, 10**20, request_id="big", model="smol")
    assert (await ledger.account_state(alice.id)).balance == MAX_AMOUNT
    await assert_balanced(ledger)


async def test_deposit_to_an_unknown_account(ledger: Ledger) -> None:
    with pytest.raises(UnknownAccount):
        await ledger.deposit(7, 10)
    assert (await ledger.books()).deposits == 0


async def test_hold_then_settle_moves_exactly_the_charge(ledger: Ledger, funded: int) -> None:
    hold = await ledger.hold(funded, 300, request_id="r1", model="smol", bid="1.5")
    assert (hold.amount, hold.status, hold.model) == (300, "open", "smol")
    assert await ledger.account_state(funded) == AccountState(balance=700, held=300, spent=0, deposited=1000)
    await assert_balanced(ledger)

    settlement = await ledger.settle(
        "r1", charge=120, node="node-a", prompt_tokens=30, completion_tokens=20, latency_ms=12.5, queue_ms=3
    )
    assert (settlement.held, settlement.charged, settlement.refunded, settlement.balance) == (300, 120, 180, 880)
    assert settlement.node == "node-a"
    assert await ledger.account_state(funded) == AccountState(balance=880, held=0, spent=120, deposited=1000)
    assert await ledger.fees_by_node() == {"node-a": 120}
    assert await ledger.fees_total() == 120
    hold_after = await ledger.find_hold("r1")
    assert hold_after is not None and hold_after.status == "settled"

    usage = await ledger.find_usage("r1")
    assert usage is not None
    assert (usage.status, usage.cost, usage.held, usage.node, usage.model) == ("ok", 120, 300, "node-a", "smol")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (30, 20, 50)
    assert usage.bid == "1.5"  # taken from the hold when settle does not give one
    assert (usage.latency_ms, usage.queue_ms) == (12.5, 3.0)
    await assert_balanced(ledger)


async def test_release_refunds_the_whole_hold(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 400, request_id="r1", model="smol")
    await ledger.release("r1", error="node failed before the first token", queue_ms=8.0)
    assert await ledger.account_state(funded) == AccountState(balance=1000, held=0, spent=0, deposited=1000)
    usage = await ledger.find_usage("r1")
    assert usage is not None
    assert (usage.status, usage.cost, usage.held, usage.error) == (
        "refunded",
        0,
        400,
        "node failed before the first token",
    )
    assert usage.queue_ms == 8.0
    assert await ledger.fees_total() == 0
    await assert_balanced(ledger)


async def test_usage_records_keep_the_routers_overhead(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 300, request_id="settled", model="smol")
    await ledger.settle("settled", charge=10, node="n", prompt_tokens=1, completion_tokens=2, overhead_ms=0.375)
    await ledger.hold(funded, 300, request_id="released", model="smol")
    await ledger.release("released", status="no_node", http_status=503, overhead_ms=1.5)
    await ledger.hold(funded, 300, request_id="untimed", model="smol")
    await ledger.settle("untimed", charge=10, node="n", prompt_tokens=1, completion_tokens=2)
    found = {r: await ledger.find_usage(r) for r in ("settled", "released", "untimed")}
    assert {r: u.overhead_ms for r, u in found.items() if u is not None} == {
        "settled": 0.375,
        "released": 1.5,
        "untimed": None,
    }
    assert [u.overhead_ms for u in await ledger.usage_records(funded)] == [None, 1.5, 0.375]
    await ledger.hold(funded, 10, request_id="bad", model="smol")
    with pytest.raises(ValueError, match="overhead_ms"):
        await ledger.settle("bad", charge=1, node="n", prompt_tokens=1, completion_tokens=1, overhead_ms=-1)
    await ledger.release("bad")
    await assert_balanced(ledger)


async def test_text_no_database_stores_is_kept_escaped_and_the_money_still_moves(ledger: Ledger, funded: int) -> None:
    # A lone surrogate is valid in a Python str (and in JSON's \\u escapes) but not in UTF-8; PostgreSQL's text
    # refuses NUL. Clients put both in an OpenAI user, a model name, or a prompt an error quotes: a write that
    # failed on them left the hold open, or the refusal unrecorded.
    odd = "a\ud800b\x00c"
    await ledger.hold(funded, 300, request_id="r1", model=odd, user=odd)
    await ledger.release("r1", status="invalid_schema", error=f"bad $ref {odd}", http_status=400)
    await ledger.hold(funded, 300, request_id="r2", model="smol", user=odd)
    await ledger.settle("r2", charge=120, node=odd, prompt_tokens=3, completion_tokens=4, error=odd)
    await ledger.refuse(funded, request_id="r3", model=odd, status="model_not_found", http_status=404, error=odd,
                        user=odd)  # fmt: skip
    await ledger.record_event(funded, "k\ud800", {"note": odd})
    escaped = "a\\ud800b\\x00c"
    first, second, third = [await ledger.find_usage(r) for r in ("r1", "r2", "r3")]
    assert first is not None and second is not None and third is not None
    assert (first.model, first.user, first.error, first.http_status) == (escaped, escaped, f"bad $ref {escaped}", 400)
    assert (second.node, second.user, second.error, second.cost) == (escaped, escaped, escaped, 120)
    assert (third.model, third.user, third.error, third.http_status) == (escaped, escaped, escaped, 404)
    assert [(e.kind, e.data) for e in await ledger.events(funded)] == [("k\\ud800", {"note": escaped})]
    assert await ledger.account_state(funded) == AccountState(balance=880, held=0, spent=120, deposited=1000)
    await assert_balanced(ledger)
    with pytest.raises(ValueError, match="U\\+D800"):  # a name is refused, not stored other than as given
        await ledger.create_account("bob\ud800")


async def test_insufficient_funds_changes_nothing(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 600, request_id="r1", model="smol")
    before = await snapshot(ledger, funded)
    with pytest.raises(InsufficientFunds) as caught:
        await ledger.hold(funded, 401, request_id="r2", model="smol")
    assert (caught.value.needed, caught.value.balance) == (401, 400)
    assert "needs a hold of 401" in str(caught.value) and "balance is 400" in str(caught.value)
    assert await snapshot(ledger, funded) == before
    assert await ledger.find_hold("r2") is None
    # The exact balance is enough, and the refused request id was not used up.
    await ledger.hold(funded, 400, request_id="r2", model="smol")
    assert (await ledger.account_state(funded)).balance == 0
    await assert_balanced(ledger)


async def test_a_zero_hold_is_allowed_and_a_negative_one_is_not(ledger: Ledger) -> None:
    broke = await ledger.create_account("broke")
    await ledger.hold(broke.id, 0, request_id="free", model="smol")
    await ledger.settle("free", charge=0, node="n", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(ValueError, match="amount"):
        await ledger.hold(broke.id, -1, request_id="neg", model="smol")
    await assert_balanced(ledger)


async def test_duplicate_request_ids_are_refused(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 100, request_id="r1", model="smol")
    before = await snapshot(ledger, funded)
    with pytest.raises(ValueError, match="already been used"):
        await ledger.hold(funded, 100, request_id="r1", model="smol")
    await ledger.settle("r1", charge=1, node="n", prompt_tokens=1, completion_tokens=0)
    with pytest.raises(ValueError, match="already been used"):
        await ledger.hold(funded, 100, request_id="r1", model="smol")
    assert (await ledger.account_state(funded)).balance == before[0].balance + 99
    await assert_balanced(ledger)


async def test_settle_caps_the_charge_at_the_hold(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 300, request_id="r1", model="smol")
    settlement = await ledger.settle("r1", charge=10_000, node="node-a", prompt_tokens=9000, completion_tokens=9000)
    assert (settlement.charged, settlement.refunded) == (300, 0)
    assert await ledger.account_state(funded) == AccountState(balance=700, held=0, spent=300, deposited=1000)
    usage = await ledger.find_usage("r1")
    assert usage is not None and usage.cost == 300
    await assert_balanced(ledger)


async def test_a_hold_closes_only_once(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 300, request_id="settled", model="smol")
    await ledger.hold(funded, 200, request_id="released", model="smol")
    await ledger.settle("settled", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    await ledger.release("released")
    before = await snapshot(ledger, funded)
    with pytest.raises(HoldClosed, match="already settled") as caught:
        await ledger.settle("settled", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    assert caught.value.status == "settled"
    with pytest.raises(HoldClosed, match="already settled"):
        await ledger.release("settled")
    with pytest.raises(HoldClosed, match="already released"):
        await ledger.settle("released", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    with pytest.raises(HoldClosed, match="already released"):
        await ledger.release("released")
    with pytest.raises(HoldClosed, match="no hold") as unknown:
        await ledger.settle("nope", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    assert unknown.value.status is None
    assert await snapshot(ledger, funded) == before
    assert await ledger.account_state(funded) == AccountState(balance=900, held=0, spent=100, deposited=1000)
    await assert_balanced(ledger)


async def test_settle_validates_before_touching_money(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 300, request_id="r1", model="smol")
    before = await snapshot(ledger, funded)
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
            await ledger.settle("r1", **arguments)  # type: ignore[arg-type]
    assert await snapshot(ledger, funded) == before
    assert await ledger.find_hold("r1") is not None


async def test_a_failure_inside_settle_rolls_everything_back(ledger: Ledger, funded: int) -> None:
    # A real database failure, not a mock: the idempotency key is taken, and it is written last, after the
    # charge, the refund and the usage row; the failure must undo all of them.
    await ledger.hold(funded, 100, request_id="first", model="smol")
    await ledger.settle(
        "first", charge=10, node="n", prompt_tokens=1, completion_tokens=1, remember=Remembered("k", "fp", "{}")
    )
    await ledger.hold(funded, 300, request_id="r1", model="smol")
    before = await snapshot(ledger, funded)
    with pytest.raises(LedgerError, match="ledger database error"):
        await ledger.settle(
            "r1", charge=100, node="n", prompt_tokens=1, completion_tokens=1, remember=Remembered("k", "fp2", "{}")
        )
    assert await snapshot(ledger, funded) == before
    assert await ledger.fees_total() == 10
    hold = await ledger.find_hold("r1")
    assert hold is not None and hold.status == "open"
    await ledger.settle("r1", charge=100, node="n", prompt_tokens=1, completion_tokens=1)
    assert (await ledger.account_state(funded)).spent == 110
    remembered = await ledger.recall(funded, "k")
    assert remembered == Remembered("k", "fp", "{}")
    await assert_balanced(ledger)


async def test_fees_are_attributed_to_nodes(ledger: Ledger, funded: int) -> None:
    for i, (node, charge) in enumerate([("a", 10), ("b", 20), ("a", 5), (None, 7)]):
        await ledger.hold(funded, 50, request_id=f"r{i}", model="smol")
        await ledger.settle(f"r{i}", charge=charge, node=node, prompt_tokens=1, completion_tokens=1)
    await ledger.hold(funded, 50, request_id="refunded", model="smol")
    await ledger.release("refunded")
    assert await ledger.fees_by_node() == {"a": 15, "b": 20, UNATTRIBUTED: 7}
    assert await ledger.fees_total() == 42 == sum((await ledger.fees_by_node()).values())
    await assert_balanced(ledger)


# -- crash recovery ---------------------------------------------------------------------------------

CRASH = """
import asyncio, os, signal, sys
from llamakit.router.ledger import ledger_at

async def main() -> None:
    ledger = ledger_at(sys.argv[1])
    await ledger.open()
    account = await ledger.account_by_name("alice")
    await ledger.hold(account.id, 100, request_id="in-flight-1", model="smol")
    await ledger.hold(account.id, 250, request_id="in-flight-2", model="smol")
    await ledger.hold(account.id, 50, request_id="done", model="smol")
    await ledger.settle("done", charge=30, node="n", prompt_tokens=3, completion_tokens=3)
    os.kill(os.getpid(), signal.SIGKILL)  # die without closing anything

asyncio.run(main())
"""

# Requests without end on one ledger, 64 at a time: hold, then settle or release, as a busy router does.
LOAD = """
import asyncio, itertools, random, sys
from llamakit.router.ledger import InsufficientFunds, ledger_at

async def main() -> None:
    async with ledger_at(sys.argv[1]) as ledger:
        account = await ledger.account_by_name("alice")
        ids = itertools.count()
        print("ready", flush=True)

        async def client(c: int) -> None:
            while True:
                request_id = f"{sys.argv[2]}-{next(ids)}"
                try:
                    await ledger.hold(account.id, random.randint(1, 50), request_id=request_id, model="smol")
                except InsufficientFunds:
                    continue
                await asyncio.sleep(random.random() / 100)
                if random.random() < 0.8:
                    await ledger.settle(request_id, charge=random.randint(0, 60), node=f"n{c % 3}",
                                        prompt_tokens=1, completion_tokens=1)
                else:
                    await ledger.release(request_id)

        await asyncio.gather(*(client(c) for c in range(64)))

asyncio.run(main())
"""


async def test_recover_releases_the_holds_of_a_crashed_router(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 1000)

    crashed = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASH, url, cwd=Path(__file__).parents[3])
    assert await crashed.wait() == -signal.SIGKILL

    async with ledger_at(url) as ledger:
        # The holds are still there, and the books still balance with them.
        assert await ledger.account_state(alice.id) == AccountState(balance=620, held=350, spent=30, deposited=1000)
        await assert_balanced(ledger)
        assert await ledger.recover() == 2
        assert await ledger.account_state(alice.id) == AccountState(balance=970, held=0, spent=30, deposited=1000)
        for request_id in ("in-flight-1", "in-flight-2"):
            usage = await ledger.find_usage(request_id)
            assert usage is not None and (usage.status, usage.cost) == ("recovered", 0)
        done = await ledger.find_usage("done")
        assert done is not None and (done.status, done.cost) == ("ok", 30)
        assert await ledger.recover() == 0
        await assert_balanced(ledger)


async def test_sigkill_under_load_at_random_moments_leaves_the_books_balanced(url: str) -> None:
    import random

    async with ledger_at(url) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 100_000)
    for round_ in range(3):
        postgres = url.startswith("postgresql")
        name = f"llamakit-load-{uuid.uuid4().hex[:8]}"
        loaded = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LOAD, f"{url}&application_name={name}" if postgres else url, f"round{round_}",
            stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[3],
        )  # fmt: skip
        assert loaded.stdout is not None
        assert await asyncio.wait_for(loaded.stdout.readline(), 30) == b"ready\n"
        await asyncio.sleep(random.uniform(0.4, 1.0))
        loaded.kill()
        assert await loaded.wait() == -signal.SIGKILL
        if postgres:
            # PostgreSQL finishes the statement a killed client's backend was running (a batch may still commit)
            # until it notices the client is gone: the books are read once those backends have ended.
            await _ended(url, name)
        async with ledger_at(url) as ledger:
            await assert_balanced(ledger)  # open holds and all
            books = await ledger.books()
            released = await ledger.recover_usage()
            assert sum(r.held for r in released) == books.holds
            after = await ledger.books()
            assert after.holds == 0 and after.balanced and after.charges == books.charges
            assert len(await ledger.all_usage(1000)) > 0
            await assert_balanced(ledger)


async def _ended(url: str, application_name: str) -> None:
    """Wait until no backend of the database serves a client that connected as `application_name`."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for _ in range(600):
            alive = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
                application_name,
            )
            if not alive:
                return
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                               application_name)  # fmt: skip
            await asyncio.sleep(0.05)
        raise AssertionError(f"the killed client's backends ({application_name}) did not end")
    finally:
        await conn.close()


async def test_recover_after_a_close_without_settling(url: str) -> None:
    async with ledger_at(url) as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 500)
        await ledger.hold(alice.id, 200, request_id="r1", model="smol")
    async with ledger_at(url) as reopened:
        assert (await reopened.account_state(alice.id)).held == 200
        assert await reopened.recover() == 1
        assert await reopened.account_state(alice.id) == AccountState(balance=500, held=0, spent=0, deposited=500)
        with pytest.raises(HoldClosed):
            await reopened.settle("r1", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
        await assert_balanced(reopened)


# -- usage and events -------------------------------------------------------------------------------


async def test_usage_is_paged_newest_first(ledger: Ledger, funded: int) -> None:
    other = await ledger.create_account("bob")
    await ledger.deposit(other.id, 100)
    await ledger.hold(other.id, 10, request_id="bob-1", model="smol")
    await ledger.settle("bob-1", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    for i in range(25):
        await ledger.hold(funded, 10, request_id=f"r{i:02}", model="smol")
        if i % 5 == 0:
            await ledger.release(f"r{i:02}")
        else:
            await ledger.settle(f"r{i:02}", charge=i % 10, node="n", prompt_tokens=i, completion_tokens=1)

    pages = []
    before = None
    while True:
        page = await ledger.usage_records(funded, limit=10, before=before)
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

    assert len(await ledger.usage_records(funded, limit=0)) == 1
    assert len(await ledger.usage_records(funded, limit=-3)) == 1
    assert len(await ledger.usage_records(funded, limit=10**6)) == 25
    assert len(await ledger.all_usage(1000)) == 26
    assert (await ledger.all_usage(1))[0].request_id == "r24"
    assert await ledger.find_usage("missing") is None
    with pytest.raises(UnknownAccount):
        await ledger.usage_records(99)
    await assert_balanced(ledger)


async def test_event_summary_counts_kinds_and_keeps_the_latest_position(ledger: Ledger) -> None:
    bot = await ledger.create_account("trader", kind="agent")
    quiet = await ledger.create_account("quiet", kind="agent")
    other = await ledger.create_account("other", kind="agent")
    await ledger.record_event(bot.id, "request", {})
    await ledger.record_event(bot.id, "buy", {"position": 1, "pnl": 0.0})
    await ledger.record_event(bot.id, "buy", {"position": 2, "pnl": -1.5})
    await ledger.record_event(bot.id, "skip", {"reason": "negative"})
    last_id = await ledger.record_event(bot.id, "error", {"position": None, "pnl": "n/a"})
    await ledger.record_event(other.id, "buy", {"position": 7})

    summary = await ledger.event_summary()
    assert set(summary) == {"trader", "other"}
    trader = summary["trader"]
    assert trader["counts"] == {"request": 1, "buy": 2, "skip": 1, "error": 1}
    assert trader["total"] == 5
    # The last event has no numeric position or PnL, so the latest numeric ones are reported.
    assert (trader["position"], trader["pnl"]) == (2, -1.5)
    assert (summary["other"]["position"], summary["other"]["pnl"]) == (7, None)

    events = await ledger.events(bot.id, limit=2)
    assert [e.kind for e in events] == ["error", "skip"]
    assert events[0].id == last_id and events[0].data == {"position": None, "pnl": "n/a"}
    assert await ledger.events(quiet.id) == []


async def test_events_must_be_json_objects(ledger: Ledger) -> None:
    bot = await ledger.create_account("bot", kind="agent")
    with pytest.raises(ValueError, match="JSON"):
        await ledger.record_event(bot.id, "buy", {"pnl": float("nan")})
    with pytest.raises(ValueError, match="JSON"):
        await ledger.record_event(bot.id, "buy", {"when": object()})
    with pytest.raises(ValueError, match="JSON object"):
        await ledger.record_event(bot.id, "buy", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        await ledger.record_event(bot.id, "", {})
    with pytest.raises(UnknownAccount):
        await ledger.record_event(99, "buy", {})
    assert await ledger.events(bot.id) == []
    assert await ledger.event_summary() == {}


async def test_event_data_is_bounded_and_an_account_keeps_its_latest_events(ledger: Ledger) -> None:
    bot = await ledger.create_account("bot", kind="agent")
    other = await ledger.create_account("other", kind="agent")
    with pytest.raises(ValueError, match=f"at most {MAX_EVENT_BYTES} bytes"):
        await ledger.record_event(bot.id, "buy", {"blob": "x" * MAX_EVENT_BYTES})
    ledger.events_kept = 3
    await ledger.record_event(other.id, "buy", {"n": -1})
    ids = [await ledger.record_event(bot.id, "buy", {"n": n, "position": n}) for n in range(6)]
    kept = [e.id for e in await ledger.events(bot.id)]
    # The latest three (PostgreSQL forgets in the statement that adds: it may keep one more); nobody else's.
    assert kept[:3] == ids[:-4:-1] and len(kept) <= 4, kept
    assert [e.data for e in await ledger.events(other.id)] == [{"n": -1}]
    assert (await ledger.event_summary())["bot"]["position"] == 5


# -- concurrency ------------------------------------------------------------------------------------


async def test_a_200_way_race_on_one_account_never_overdraws(url: str, ledger: Ledger) -> None:
    # Two ledgers on one database, as two routers (or a router and the CLI) would be, 200 holds at once.
    amount, racers, affordable = 7, 200, 150
    account = await ledger.create_account("hot")
    deposit = amount * affordable + 3
    await ledger.deposit(account.id, deposit)
    async with ledger_at(url) as other:
        outcomes = await asyncio.gather(
            *(
                (ledger if i % 2 else other).hold(account.id, amount, request_id=f"r{i}", model="smol")
                for i in range(racers)
            ),
            return_exceptions=True,
        )
    refusals = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, InsufficientFunds) for o in refusals), refusals
    assert len(outcomes) - len(refusals) == affordable
    assert all(exc.balance < amount for exc in refusals if isinstance(exc, InsufficientFunds))
    state = await ledger.account_state(account.id)
    assert state.balance == 3 and state.held == affordable * amount
    await assert_balanced(ledger)


async def test_concurrent_settles_of_one_hold_charge_once(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 100, request_id="r1", model="smol")

    async def close(i: int) -> str:
        try:
            if i % 2:
                await ledger.settle("r1", charge=60, node=f"n{i}", prompt_tokens=1, completion_tokens=1)
            else:
                await ledger.release("r1")
        except HoldClosed:
            return "closed"
        return "won"

    outcomes = await asyncio.gather(*(close(i) for i in range(8)))
    assert sorted(outcomes) == ["closed"] * 7 + ["won"]
    state = await ledger.account_state(funded)
    assert state.held == 0
    assert state.spent in (0, 60)
    assert len(await ledger.all_usage(100)) == 1
    await assert_balanced(ledger)


# -- group commit -----------------------------------------------------------------------------------


async def test_holds_and_settlements_that_arrive_together_share_transactions(ledger: Ledger, funded: int) -> None:
    before = ledger.batches
    await asyncio.gather(*(ledger.hold(funded, 1, request_id=f"r{i}", model="smol") for i in range(100)))
    await asyncio.gather(
        *(ledger.settle(f"r{i}", charge=1, node="n", prompt_tokens=1, completion_tokens=0) for i in range(100))
    )
    # 200 operations: far fewer commits (how few depends on timing: the first of a burst may go alone).
    assert ledger.batches - before < 50
    assert (await ledger.account_state(funded)).spent == 100
    await assert_balanced(ledger)


async def test_one_failure_in_a_batch_leaves_the_others_done(ledger: Ledger, funded: int) -> None:
    await ledger.hold(funded, 10, request_id="settled", model="smol")
    await ledger.settle("settled", charge=1, node="n", prompt_tokens=1, completion_tokens=1)
    await ledger.hold(funded, 10, request_id="open", model="smol")
    outcomes = await asyncio.gather(
        ledger.hold(funded, 5, request_id="a", model="smol"),
        ledger.hold(funded, 10**6, request_id="too-much", model="smol"),
        ledger.hold(funded, 5, request_id="a", model="smol"),  # the same id again
        ledger.settle("settled", charge=1, node="n", prompt_tokens=1, completion_tokens=1),
        ledger.hold(99, 5, request_id="nobody", model="smol"),
        ledger.settle("open", charge=4, node="n", prompt_tokens=1, completion_tokens=1),
        ledger.hold(funded, 5, request_id="b", model="smol"),
        return_exceptions=True,
    )
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["Hold", "InsufficientFunds", "ValueError", "HoldClosed", "UnknownAccount", "Settlement", "Hold"]
    assert {h: (await ledger.find_hold(h)).status for h in ("a", "b", "open")} == {  # type: ignore[union-attr]
        "a": "open",
        "b": "open",
        "open": "settled",
    }
    assert await ledger.find_hold("too-much") is None and await ledger.find_hold("nobody") is None
    assert (await ledger.account_state(funded)).spent == 5
    await assert_balanced(ledger)


async def test_a_caller_that_stops_waiting_does_not_stop_its_settlement(ledger: Ledger, funded: int) -> None:
    # A client that leaves cancels the router's wait; the hold must still close, exactly once.
    await ledger.hold(funded, 100, request_id="r1", model="smol")
    waiting = asyncio.ensure_future(ledger.settle("r1", charge=40, node="n", prompt_tokens=1, completion_tokens=1))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(100):
        if (hold := await ledger.find_hold("r1")) is not None and hold.status == "settled":
            break
        await asyncio.sleep(0.01)
    assert await ledger.account_state(funded) == AccountState(balance=960, held=0, spent=40, deposited=1000)
    await assert_balanced(ledger)


# -- remembered answers -----------------------------------------------------------------------------


async def test_answers_are_remembered_per_account_with_their_charge(ledger: Ledger, funded: int) -> None:
    other = await ledger.create_account("bob")
    await ledger.deposit(other.id, 100)
    answer = Remembered("call-1", "print-1", '{"body": {"id": "req-1"}, "headers": {}}')
    await ledger.hold(funded, 50, request_id="req-1", model="smol")
    await ledger.settle("req-1", charge=20, node="n", prompt_tokens=3, completion_tokens=4, remember=answer)
    assert await ledger.recall(funded, "call-1") == answer
    assert await ledger.recall(other.id, "call-1") is None  # keys belong to their account
    assert await ledger.recall(funded, "call-2") is None
    # Bob may use the same key for his own request.
    await ledger.hold(other.id, 10, request_id="req-2", model="smol")
    await ledger.settle(
        "req-2", charge=1, node="n", prompt_tokens=1, completion_tokens=1, remember=Remembered("call-1", "p", "{}")
    )
    assert await ledger.recall(other.id, "call-1") == Remembered("call-1", "p", "{}")
    # A refund remembers nothing: a retry of a failed request runs again.
    await ledger.hold(funded, 50, request_id="req-3", model="smol")
    await ledger.release("req-3")
    assert await ledger.recall(funded, "call-3") is None
    await assert_balanced(ledger)


async def test_a_probe_writes_and_changes_nothing(url: str, ledger: Ledger) -> None:
    await ledger.probe()  # with no account yet
    alice = await ledger.create_account("alice")
    await ledger.deposit(alice.id, 500)
    before = await ledger.books()
    await ledger.probe()
    assert await ledger.books() == before
    assert (await ledger.get_account(alice.id)).balance == 500
    async with ledger_at(url) as again:  # and the schema is as it was
        await again.probe()
