"""The router audits its books at start-up and on demand; a disagreement is an alarm everywhere, and no fix.

Then the operator's side: `llamakit books --audit`, and `llamakit ledger archive` on the ledger of a running
router, whose books stay what they were.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

import pandas as pd
import pytest

from tests.router.test_cli import llamakit
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

ASK = {"prompt": "hello", "max_tokens": 2}


async def audited(herd: Herd) -> dict[str, Any]:
    """/admin/books once the start-up audit has run."""
    assert herd.admin is not None
    while (books := (await herd.admin.get("/admin/books")).json())["audit"]["ok"] is None:
        await asyncio.sleep(0.02)
    return books


def corrupt(herd: Herd, sql: str) -> None:
    """Change the ledger behind the router's back."""
    with sqlite3.connect(herd.tmp / "ledger.db") as conn:
        conn.execute(sql)
    conn.close()


async def test_an_audit_that_disagrees_is_an_alarm_in_the_log_metrics_and_stats_and_nothing_is_fixed(
    herd: Herd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamakit.router.auditor")
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 10_000)
    for _ in range(3):
        assert (await alice.post("/v1/completions", json=ASK)).status_code == 200
    books = await audited(herd)
    assert books["audit"]["ok"] is True and books["audit"]["count"] == 0
    agreed = (await herd.admin.post("/admin/books/audit")).json()
    assert agreed["audit"]["ok"] is True and agreed["audit"]["scanned"] >= 3 + 3 + 1  # usage, charges, deposit
    assert "llamakit_ledger_audit_ok 1.0" in (await herd.admin.get("/metrics")).text

    corrupt(herd, "UPDATE ledger_totals SET charges = charges + 5, balances = balances - 5")
    corrupt(herd, "UPDATE node_fees SET charged = charged + 1")
    found = (await herd.admin.post("/admin/books/audit")).json()
    audit = found["audit"]
    assert audit["ok"] is False and audit["count"] >= 2
    assert {"what": "totals: charges", "kept": books["charges"] + 5, "counted": books["charges"]} in audit[
        "discrepancies"
    ]
    assert any(d["what"] == "node 'n1': fees" for d in audit["discrepancies"])
    assert "DISAGREES" in caplog.text and "totals: charges" in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    metrics = (await herd.admin.get("/metrics")).text
    assert "llamakit_ledger_audit_ok 0.0" in metrics and "llamakit_ledger_audit_discrepancies" in metrics
    stats = (await herd.admin.get("/admin/stats")).json()
    assert stats["books"]["audit"]["ok"] is False
    # Nothing fixed: the books read what the running totals say, the corrupted figure included.
    assert stats["books"]["charges"] == books["charges"] + 5 == stats["fees"]["earned"]
    code, out = await llamakit(herd, "books", "--audit")
    assert code == 1 and '"ok": false' in out and "totals: charges" in out
    code, out = await llamakit(herd, "books")
    assert code == 0 and f'"charges": {books["charges"] + 5}' in out
    # Put right by the operator (here: back as it was), the next audit agrees again.
    corrupt(herd, "UPDATE ledger_totals SET charges = charges - 5, balances = balances + 5")
    corrupt(herd, "UPDATE node_fees SET charged = charged - 1")
    code, out = await llamakit(herd, "books", "--audit")
    assert code == 0 and '"ok": true' in out
    await alice.aclose()


async def test_the_cli_audits_a_ledger_without_a_router(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    assert (await alice.post("/v1/completions", json=ASK)).status_code == 200
    await alice.aclose()
    code, out = await llamakit(herd, "books", "--audit", "--db", str(herd.tmp / "ledger.db"))
    assert code == 0 and '"ok": true' in out and '"balanced": true' in out


async def test_an_archive_of_a_running_routers_ledger_keeps_its_books(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 10_000)
    for _ in range(5):
        assert (await alice.post("/v1/completions", json=ASK)).status_code == 200
    assert (await alice.post("/v1/completions", json={**ASK, "model": "nope"})).status_code == 404
    before = await herd.books()
    stats = (await herd.admin.get("/admin/stats")).json()
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86_400))
    archive = herd.tmp / "old.jsonl.gz"
    code, out = await llamakit(
        herd, "ledger", "archive", "--before", tomorrow, "--db", str(herd.tmp / "ledger.db"), "--out", str(archive)
    )
    assert code == 0, out
    assert '"records": 6' in out and '"ok": true' in out
    frame = pd.read_json(archive, lines=True)
    assert len(frame) == 6 and frame["charged"].sum() == before["charges"]
    assert set(frame["status"]) == {"ok", "model_not_found"}
    # The running router's books and totals did not move; its history did.
    assert await herd.books() == before
    after = (await herd.admin.get("/admin/stats")).json()
    assert after["fees"] == {**stats["fees"], "per_minute": after["fees"]["per_minute"]}
    assert after["counts"]["requests"] == stats["counts"]["requests"] == 6
    assert (await herd.admin.get("/admin/usage")).json()["data"] == []
    assert (await herd.admin.post("/admin/books/audit")).json()["audit"]["ok"] is True
    # And it sells on.
    assert (await alice.post("/v1/completions", json=ASK)).status_code == 200
    assert (await herd.admin.post("/admin/books/audit")).json()["audit"]["ok"] is True
    code, out = await llamakit(
        herd, "ledger", "archive", "--before", tomorrow, "--db", str(herd.tmp / "ledger.db"), "--out", str(archive)
    )
    assert code == 1 and "exists" in out
    await alice.aclose()
