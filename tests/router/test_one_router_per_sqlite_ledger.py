"""A SQLite ledger has one router: a second one on the same file is refused before it touches the books
(its start would release the first one's open holds while their requests run)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from llamakit.router.ledger import LedgerError
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.servers import RunningServer

ADMIN = "one-router-admin"


def settings(db: Path, node_url: str) -> RouterSettings:
    return RouterSettings(db=db, admin_key=ADMIN, herd_token=HERD_TOKEN, nodes=[node_url], health_interval=0.1)


async def test_a_second_router_on_the_ledger_is_refused_and_the_first_ones_holds_stay(tmp_path: Path) -> None:
    gate = asyncio.Event()
    node = await RunningServer(FakeNode("n1", script=Script(tokens=3, gate=gate)).app()).start()
    db = tmp_path / "ledger.db"
    first = await RunningServer(create_app(settings(db, node.url))).start()
    admin = httpx.AsyncClient(base_url=first.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    try:
        for _ in range(100):
            if (await admin.get("/health")).json()["ready"] == 1:
                break
            await asyncio.sleep(0.05)
        key = (await admin.post("/admin/accounts", json={"name": "a", "deposit": 10_000})).json()["api_key"]
        async with httpx.AsyncClient(base_url=first.url, headers={"Authorization": f"Bearer {key}"}) as alice:
            running = asyncio.create_task(alice.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}))
            for _ in range(100):  # the request holds its credits and waits at the node
                if (await admin.get("/admin/books")).json()["holds"] > 0:
                    break
                await asyncio.sleep(0.05)
            second = RunningServer(create_app(settings(db, node.url)))
            with pytest.raises(LedgerError, match="another router is running on the ledger"):
                await second.start()
            await second.stop()
            assert (await admin.get("/admin/books")).json()["holds"] > 0  # not released by the second start
            gate.set()
            done = await running
            assert done.status_code == 200 and done.json()["usage"]["cost_credits"] > 0
    finally:
        await admin.aclose()
        await first.stop()
    # Once the first router has stopped, the ledger is free again.
    again = await RunningServer(create_app(settings(db, node.url))).start()
    await again.stop()
    await node.stop()


def test_the_command_says_why_and_exits_1(tmp_path: Path) -> None:
    from llamakit.router.ledger._owner import claim_sqlite_ledger

    db = tmp_path / "ledger.db"
    held = claim_sqlite_ledger(str(db))
    assert held is not None
    try:
        done = subprocess.run(
            [sys.executable, "-m", "llamakit.router", "--db", str(db), "--port", "0",
             "--admin-key", ADMIN, "--herd-token", HERD_TOKEN],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(held)
    assert done.returncode == 1
    assert f"another router is running on the ledger {db}" in done.stderr and "--cluster yes" in done.stderr
    assert "llamakit router on" not in done.stderr  # a refused router never says it is on


def test_a_ledger_in_a_directory_that_does_not_exist_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    db = tmp_path / "missing" / "ledger.db"
    done = subprocess.run(
        [sys.executable, "-m", "llamakit.router", "--db", str(db), "--port", "0",
         "--admin-key", ADMIN, "--herd-token", HERD_TOKEN],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot open the ledger at {db}: No such file or directory" in done.stderr


@pytest.mark.parametrize("spelling", ["file:{db}", "file://{db}", "file:{db}?cache=shared", "{link}"])
def test_every_spelling_of_the_file_is_the_same_ledger(tmp_path: Path, spelling: str) -> None:
    from llamakit.router.ledger._owner import claim_sqlite_ledger

    db = tmp_path / "ledger.db"
    held = claim_sqlite_ledger(str(db))
    (tmp_path / "link.db").symlink_to(db)
    try:
        with pytest.raises(LedgerError, match="another router is running on the ledger"):
            claim_sqlite_ledger(spelling.format(db=db, link=tmp_path / "link.db"))
    finally:
        assert held is not None
        os.close(held)
    assert claim_sqlite_ledger("file::memory:") is None and claim_sqlite_ledger(":memory:") is None
