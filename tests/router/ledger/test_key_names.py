"""API key names in the ledger, on each backend: given when a key is made, changed or removed later, shown
wherever the key is; bad names refused before anything changes; ledgers from before names upgrade in place."""

from __future__ import annotations

import re
import sqlite3

import pytest

from llamakit.router.ledger import (
    MAX_KEY_NAME_LEN,
    KeyLimits,
    Ledger,
    UnknownKey,
    backend_of,
    hash_key,
    key_name,
    latest,
    ledger_at,
)
from tests.router.ledger.conftest import execute, undo_delivery_checkpoints, undo_running_totals


async def test_a_name_is_stored_shown_changed_and_removed(ledger: Ledger) -> None:
    account = await ledger.create_account("alice")
    ci = await ledger.create_key(account.id, name="  ci runner\n", limits=KeyLimits(rpm_limit=60))
    plain = await ledger.create_key(account.id)
    assert (await ledger.find_key(ci[:8])).name == "ci runner"  # stripped
    assert (await ledger.find_key(plain)).name is None
    assert [k.name for k in await ledger.list_keys(account.id)] == ["ci runner", None]
    assert [k.name for k in await ledger.limited_keys()] == ["ci runner"]
    found = await ledger.authenticate_key(ci)
    assert found is not None and found[1].name == "ci runner"

    renamed = await ledger.rename_key(ci[:8], "alice's laptop 💻")
    assert renamed.name == "alice's laptop 💻" and renamed.limits == KeyLimits(rpm_limit=60)
    assert (await ledger.find_key(ci)).name == "alice's laptop 💻"
    # Changing the limits keeps the name, and the name is no limit: a named key without limits is not watched.
    assert (await ledger.set_key_limits(ci, {"rpm_limit": None})).name == "alice's laptop 💻"
    assert await ledger.limited_keys() == []
    assert (await ledger.rename_key(plain[:8], "batch")).name == "batch"
    assert [k.name for k in await ledger.list_keys(account.id)] == ["alice's laptop 💻", "batch"]

    assert (await ledger.rename_key(ci, None)).name is None
    assert (await ledger.rename_key(plain, "   ")).name is None  # blank: no name
    assert [k.name for k in await ledger.list_keys(account.id)] == [None, None]


async def test_names_need_not_be_unique_and_a_revoked_key_keeps_its_name(ledger: Ledger) -> None:
    account = await ledger.create_account("alice")
    first = await ledger.create_key(account.id, name="laptop")
    second = await ledger.create_key(account.id, name="laptop")
    assert await ledger.revoke_key(first) == 1
    assert [(k.name, k.active) for k in await ledger.list_keys(account.id)] == [("laptop", False), ("laptop", True)]
    assert (await ledger.rename_key(first, "old laptop")).name == "old laptop"
    assert (await ledger.find_key(second)).name == "laptop"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("x" * (MAX_KEY_NAME_LEN + 1), "at most 100 characters, got 101"),
        ("ci\nrunner", "control or invisible characters, got U+000A at position 2"),
        ("tab\there", "U+0009"),
        ("nul\x00", "U+0000"),
        ("evil\u202eexe.txt", "U+202E"),  # right-to-left override: would reorder what is shown after it
        ("line\u2028sep", "U+2028"),
        ("lone \ud800 surrogate", "U+D800"),
        ("zero\u200bwidth", "U+200B"),  # invisible: two names would look the same
        ("\ufeffbom", "U+FEFF"),
        ("soft\u00adhyphen", "U+00AD"),
        (42, "must be a string"),
        (["ci"], "must be a string"),
    ],
)
async def test_a_bad_name_is_refused_and_nothing_changes(ledger: Ledger, name: object, error: str) -> None:
    account = await ledger.create_account("alice")
    with pytest.raises(ValueError, match=re.escape(error)):
        await ledger.create_key(account.id, name=name)  # type: ignore[arg-type]
    assert await ledger.list_keys(account.id) == []
    key = await ledger.create_key(account.id, name="kept")
    with pytest.raises(ValueError, match=re.escape(error)):
        await ledger.rename_key(key, name)  # type: ignore[arg-type]
    assert (await ledger.find_key(key)).name == "kept"


async def test_the_longest_name_and_any_script_are_kept_exactly(ledger: Ledger) -> None:
    account = await ledger.create_account("alice")
    longest = "é" * MAX_KEY_NAME_LEN
    key = await ledger.create_key(account.id, name=f" {longest} ")
    assert (await ledger.find_key(key)).name == longest
    # A zero-width joiner is a format character, not a control: emoji sequences keep working.
    for name in ("CI — nightly", "ключ Алисы", "鍵 1", "👩‍💻 dev box", "quote ' and \" and %s and $1"):
        assert (await ledger.rename_key(key, name)).name == name
        assert (await ledger.find_key(key[:8])).name == name


async def test_renaming_a_key_that_does_not_exist_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownKey):
        await ledger.rename_key("lk-nokey", "x")
    with pytest.raises(ValueError, match="prefix"):
        await ledger.rename_key("lk", "x")


def test_key_name_strips_and_turns_blank_into_none() -> None:
    assert key_name(None) is None
    assert key_name("") is None
    assert key_name(" \t\n ") is None
    assert key_name("  ci  ") == "ci"
    assert key_name("a" * 100) == "a" * 100


async def test_a_ledger_from_before_names_upgrades_in_place(url: str) -> None:
    """A ledger at version 7 (no `name` column) keeps its keys, limits and use; they have no name until given one."""
    async with ledger_at(url) as ledger:
        account = await ledger.create_account("alice")
        await ledger.deposit(account.id, 1_000)
        key = await ledger.create_key(account.id, limits=KeyLimits(spend_cap=500))
        await ledger.hold(account.id, 100, request_id="r1", model="smol", key_hash=hash_key(key))
        await ledger.settle("r1", charge=40, node="n", prompt_tokens=1, completion_tokens=1)
    await undo_delivery_checkpoints(url)  # version 14's
    await undo_running_totals(url)  # version 13's
    await execute(url, "ALTER TABLE api_keys DROP COLUMN name")
    later = ("credit_value", "currency", "overhead_ms", "cached_tokens", "cache_discount", "passed_over")
    for later_column in later:  # versions 9's, 11's and 12's
        await execute(url, f"ALTER TABLE usage DROP COLUMN {later_column}")
    if backend_of(url) == "sqlite":
        await execute(url, "PRAGMA user_version = 7")
    else:
        await execute(url, "UPDATE llamakit_schema SET version = 7")

    async with ledger_at(url) as ledger:
        old = await ledger.find_key(key)
        assert old.name is None and old.limits == KeyLimits(spend_cap=500) and old.use.spent == 40
        assert (await ledger.rename_key(key, "ci runner")).name == "ci runner"
        named = await ledger.create_key(account.id, name="new")
        assert [k.name for k in await ledger.list_keys(account.id)] == ["ci runner", "new"]
        assert (await ledger.find_key(named)).name == "new"
    if backend_of(url) == "sqlite":
        with sqlite3.connect(url) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == latest("sqlite")
        conn.close()
