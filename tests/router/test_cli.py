"""The operator's CLI against a real router, run as a person runs it: keys, undrain, usage as a table and CSV."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sqlite3
import sys
import time

import httpx
import pytest

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import ADMIN_KEY, Herd


async def llamakit(herd: Herd, *args: str) -> tuple[int, str]:
    assert herd.router is not None
    env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY, "LLAMAKIT_PROFILE": "/nonexistent/profile.json"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamakit.cli", "--url", herd.router.url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.parametrize(
    ("args", "code"),
    [(("books",), 1), (("keys", "list", "alice"), 1), (("usage", "--csv"), 1), (("--help",), 0)],
)
async def test_a_reader_that_stops_early_ends_any_command_quietly(herd: Herd, args: tuple[str, ...], code: int) -> None:
    """`llamakit books | head`: stdout a pipe whose reader is gone (closed before the command starts, so that its
    every write meets it) ends the command with 1 and nothing on stderr, no BrokenPipeError traceback (argparse's
    --help ignores a closed pipe itself, and exits 0)."""
    await herd.start()
    await herd.account("alice", 10)
    assert herd.router is not None
    env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY, "LLAMAKIT_PROFILE": "/nonexistent/profile.json"}
    read, write = os.pipe()
    os.close(read)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamakit.cli", "--url", herd.router.url, *args,
        stdout=write, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(write)
    _, err = await proc.communicate()
    assert (proc.returncode, err.decode()) == (code, "")


async def test_keys_list_and_revoke(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    key = str(alice.headers["Authorization"]).removeprefix("Bearer ")
    code, out = await llamakit(herd, "keys", "list", "alice")
    assert code == 0 and key[:8] in out and "active" in out
    code, out = await llamakit(herd, "keys", "revoke", key[:8])
    assert code == 0 and '"revoked": 1' in out
    assert (await alice.get("/v1/account")).status_code == 401, "the key stopped working at once"
    code, out = await llamakit(herd, "keys", "list", "alice")
    assert code == 0 and "revoked" in out
    code, out = await llamakit(herd, "keys", "revoke", key[:8])
    assert code == 1 and "no active key matches" in out


async def test_keys_with_limits_made_shown_changed_and_enforced(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    await herd.account("alice", 10_000)
    code, out = await llamakit(
        herd, "keys", "create", "alice", "--rpm", "1", "--spend-cap-day", "5000", "--expires", "+30d", "--models",
        "fake-model,other",
    )  # fmt: skip
    assert code == 0, out
    made = json.loads(out)
    limits = made["key"]["limits"]
    assert limits["rpm_limit"] == 1 and limits["spend_cap_day"] == 5000 and limits["models"] == ["fake-model", "other"]
    assert 29 * 86400 < limits["expires_at"] - time.time() <= 30 * 86400
    assert herd.router is not None
    async with httpx.AsyncClient(
        base_url=herd.router.url, headers={"Authorization": f"Bearer {made['api_key']}"}
    ) as key:
        assert (await key.post("/v1/completions", json={"prompt": "one", "max_tokens": 1})).status_code == 200
        assert (await key.post("/v1/completions", json={"prompt": "one", "max_tokens": 1})).status_code == 429
        prefix = made["api_key"][:8]
        code, out = await llamakit(herd, "keys", "list", "alice")
        assert code == 0 and "rpm_limit=1" in out and "spend_cap_day=5000" in out
        code, out = await llamakit(
            herd, "keys", "limit", prefix, "--rpm", "100", "--clear", "models", "--clear", "expires"
        )
        assert (
            code == 0 and json.loads(out)["limits"]["rpm_limit"] == 100 and json.loads(out)["limits"]["models"] is None
        )
        assert (await key.post("/v1/completions", json={"prompt": "one", "max_tokens": 1})).status_code == 200
        code, out = await llamakit(herd, "keys", "show", prefix)
        assert code == 0 and json.loads(out)["spend"]["today"] > 0
        code, out = await llamakit(herd, "keys", "limit", prefix, "--expires", "2000-01-01")
        assert code == 0 and (await key.get("/v1/key")).json()["error"]["code"] == "expired_api_key"
        code, out = await llamakit(herd, "keys", "limit", prefix, "--rpm", "0")
        assert code == 1 and "rpm_limit must be 1 to" in out
        code, out = await llamakit(herd, "keys", "limit", prefix)
        assert code == 1 and "give a limit to set" in out
    code, out = await llamakit(herd, "keys", "create", "alice", "--expires", "nan")
    assert code == 1 and "is not a time" in out
    code, out = await llamakit(herd, "account", "a/b?c", "--deposit", "5")  # a name that is not a URL path
    assert code == 0 and (await llamakit(herd, "keys", "list", "a/b?c"))[0] == 0
    assert (await llamakit(herd, "deposit", "a/b?c", "10"))[0] == 0
    code, out = await llamakit(herd, "account", "bob", "--deposit", "5", "--tpm", "99")
    assert (
        code == 0
        and (await herd.admin.get(f"/admin/keys/{json.loads(out)['api_key']}")).json()["limits"]["tpm_limit"] == 99
    )  # type: ignore[union-attr]


async def test_keys_are_named_renamed_and_listed_by_name(herd: Herd) -> None:
    await herd.start()
    await herd.account("alice", 100)
    code, out = await llamakit(herd, "keys", "create", "alice", "--name", "ci runner", "--rpm", "5")
    assert code == 0, out
    made = json.loads(out)
    assert made["key"]["name"] == "ci runner" and made["key"]["limits"]["rpm_limit"] == 5
    prefix = made["api_key"][:8]
    code, out = await llamakit(herd, "keys", "list", "alice")
    header, first, second = out.splitlines()
    assert code == 0 and header.split()[:3] == ["key", "name", "created"]
    assert second.startswith(prefix) and "ci runner" in second and "ci runner" not in first  # the first has none
    code, out = await llamakit(herd, "keys", "show", prefix)
    assert code == 0 and json.loads(out)["name"] == "ci runner"

    code, out = await llamakit(herd, "keys", "rename", prefix, "alice's laptop")
    assert code == 0 and json.loads(out)["name"] == "alice's laptop"
    code, out = await llamakit(herd, "keys", "limit", prefix, "--name", "batch", "--tpm", "100")
    shown = json.loads(out)
    assert code == 0 and shown["name"] == "batch" and shown["limits"]["tpm_limit"] == 100
    code, out = await llamakit(herd, "keys", "limit", prefix, "--clear", "name")
    shown = json.loads(out)
    assert code == 0 and shown["name"] is None and shown["limits"]["rpm_limit"] == 5
    await llamakit(herd, "keys", "rename", prefix, "again")
    code, out = await llamakit(herd, "keys", "rename", prefix, "")
    assert code == 0 and json.loads(out)["name"] is None

    code, out = await llamakit(herd, "keys", "create", "alice", "--name", "x" * 101)
    assert code == 1 and "at most 100 characters" in out
    code, out = await llamakit(herd, "keys", "rename", prefix, "two\nlines")
    assert code == 1 and "control or invisible characters" in out
    code, out = await llamakit(herd, "keys", "limit", prefix, "--name", "a", "--clear", "name")
    assert code == 1 and "not both" in out
    code, out = await llamakit(herd, "keys", "list", "alice")
    assert len(out.splitlines()) == 3, out  # nothing was made by the refused commands


async def test_drain_and_undrain(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    await herd.start()
    assert (await llamakit(herd, "drain", "n1"))[0] == 0
    assert (await herd.node_states())["n1"] == "draining"
    code, _ = await llamakit(herd, "undrain", "n1")
    assert code == 0 and (await herd.node_states())["n1"] == "ready"
    code, out = await llamakit(herd, "undrain", "nope")
    assert code == 1 and "nope" in out


async def test_usage_as_a_table_and_as_csv_with_every_page(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    bob = await herd.account("bob", 10)
    for i in range(5):
        body = {"prompt": "one two", "max_tokens": 2, "user": f"u{i % 2}"}
        assert (await alice.post("/v1/completions", json=body)).status_code == 200
    assert (await bob.post("/v1/completions", json={"prompt": "one two", "max_tokens": 50})).status_code == 402
    code, out = await llamakit(herd, "usage")
    assert code == 0 and out.count("\n") == 1 + 6 and "insufficient_funds" in out
    assert out.splitlines()[0].split()[-3:] == ["cost_credits", "cost", "currency"] and "0.000019  USD" in out
    code, out = await llamakit(herd, "usage", "--account", "alice", "--csv", "--limit", "3")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 3 and {r["account"] for r in rows} == {"alice"}
    alice_key = str(alice.headers["Authorization"]).removeprefix("Bearer ")
    assert {r["key_prefix"] for r in rows} == {alice_key[:8]}  # which of the account's keys made each request
    # The credits charged, and their price as exact decimal text (not the JSON number's 1.9e-05).
    assert all((r["cost_credits"], r["cost"], r["currency"]) == ("19", "0.000019", "USD") for r in rows)
    code, out = await llamakit(herd, "usage", "--user", "u0", "--csv", "--limit", "1000")
    assert len(list(csv.DictReader(io.StringIO(out)))) == 3
    code, out = await llamakit(herd, "usage", "--since", "2999-01-01", "--csv")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 0
    # A record from before the ledger kept each record's price is priced at today's value: the table says so.
    with sqlite3.connect(herd.tmp / "ledger.db") as db:
        db.execute("UPDATE usage SET credit_value = NULL, currency = NULL WHERE id = 1")
    code, out = await llamakit(herd, "usage")
    assert code == 0 and out.count("0.000019*") == 1 and out.count("0.000019  ") == 4, out
    assert out.splitlines()[-1].startswith("* priced at the credit value the router runs with now")


def test_tables_show_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A model or `user` a client sent is printed as text: an escape sequence in it cannot drive the terminal."""
    from llamakit.cli.admin_client import table

    table(["model", "user"], [["\x1b[2Jm", "x\u202ey"]])
    out = capsys.readouterr().out
    assert "\\x1b[2Jm" in out and "x\\u202ey" in out
    assert "\x1b" not in out and "\u202e" not in out


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`llamakit ARGS` as a person runs it, with an admin key and no profile: exit code, stdout, stderr."""
    env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY, "LLAMAKIT_PROFILE": "/nonexistent/profile.json"}
    env.pop("LLAMAKIT_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamakit.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


UNREACHABLE = "http://127.0.0.1:1"  # port 1: nothing listens there, so the connection is refused


@pytest.mark.parametrize(
    "command",
    [
        ["accounts"], ["account", "alice"], ["deposit", "alice", "5"], ["fees"], ["fees", "m", "--base", "1"],
        ["fees", "m", "--delete"],
        ["drain", "n1"], ["undrain", "n1"], ["usage"], ["stats"], ["keys", "list", "a"],
        ["keys", "create", "a"], ["keys", "revoke", "lk-12345"],
    ],
)  # fmt: skip
async def test_a_router_that_cannot_be_reached_is_one_line_not_a_traceback(command: list[str]) -> None:
    code, out, err = await run_cli("--url", UNREACHABLE, *command)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"llamakit: error: cannot reach the router at {UNREACHABLE}: [Errno 111] Connection refused"
    ]


async def test_a_router_that_hangs_up_or_never_answers_is_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener that closes every connection at once, and one that never answers (the client's timeout cut
    to 0.2s for the test)."""
    from llamakit import cli

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    silent: list[asyncio.StreamWriter] = []

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    closing = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    quiet = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    closing_url = f"http://127.0.0.1:{closing.sockets[0].getsockname()[1]}"
    quiet_url = f"http://127.0.0.1:{quiet.sockets[0].getsockname()[1]}"
    try:
        code, out, err = await run_cli("--url", closing_url, "accounts")
        # The reason is the system's: a reset, or a disconnect, depending on when the close lands.
        assert (code, out, len(err.splitlines())) == (1, "", 1), err
        assert err.startswith(f"llamakit: error: cannot reach the router at {closing_url}: "), err

        from llamakit.cli.admin_client import admin_client as real

        def impatient(args: argparse.Namespace) -> httpx.Client:
            client = real(args)
            client.timeout = httpx.Timeout(0.2)
            return client

        monkeypatch.setattr(cli, "admin_client", impatient)
        monkeypatch.setenv("LLAMAKIT_ADMIN_KEY", ADMIN_KEY)
        monkeypatch.setenv("LLAMAKIT_PROFILE", "/nonexistent/profile.json")
        with pytest.raises(SystemExit) as exited:
            await asyncio.to_thread(cli.main, ["--url", quiet_url, "stats"])
        assert exited.value.code == (
            f"llamakit: error: cannot reach the router at {quiet_url}: no answer in time (ReadTimeout: timed out)"
        )
    finally:
        for writer in silent:
            writer.close()
        closing.close()
        quiet.close()
