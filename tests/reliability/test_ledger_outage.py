"""A full disk, or a lost PostgreSQL, is an outage the router says it has (issue 26, item 4): while its ledger
cannot be written, paid requests get 503 `ledger_unavailable` with Retry-After (never a 500), /health and /ready
answer 503 and /live 200, the log says it once when it starts and once when it ends (no traceback), /metrics
counts the refusals; the router comes back by itself when a probe write succeeds, releases the holds the
outage left open, and the books balance, every client having been charged what it was told.

The scenarios are in `ledger_outage.py` (also runnable at the issue's scale): a real router process, a tmpfs
of 4 MiB for SQLite (needs root: skipped otherwise), a PostgreSQL instance of the test's own for one router
and for a cluster of two.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.ledger_outage import CannotRun, Report, full_disk, lost_postgres

REQUESTS = 1200
OUTAGE = 200  # requests refused before the ledger comes back


def _check(report: Report, routers: int) -> None:
    assert set(report.statuses) <= {200, 503}, report.show()  # never a 500
    assert set(report.codes) == {"ledger_unavailable"}, report.show()
    assert report.statuses[503] >= OUTAGE and report.served_after > 0, report.show()
    assert (report.health_during, report.ready_during, report.live_during) == (503, 503, 200), report.show()
    assert report.retry_after == "5"
    assert report.back_without_restart, report.show()
    books = report.books
    assert books["balanced"] and books["holds"] == 0, report.show()
    assert books["charges"] == report.charged_in_answers, report.show()  # no money lost, none taken untold
    assert report.lines("Traceback") == 0, report.show()
    assert len(report.logs) == routers
    for metrics, log in zip(report.metrics, report.logs, strict=True):
        outages = metrics["llamakit_router_ledger_outages_total"]
        # One line when it starts and one when it ends, per outage (a disk that fills again is another one).
        assert 1 <= outages <= 3, report.show()
        assert sum("the ledger failed" in line for line in log) == outages, report.show()
        assert sum("the ledger works again" in line for line in log) == outages, report.show()
        assert metrics["llamakit_router_ledger_writable"] == 1
        assert metrics['llamakit_router_refusals_total{code="ledger_unavailable",status="503"}'] >= 1
    refused = sum(m['llamakit_router_refusals_total{code="ledger_unavailable",status="503"}'] for m in report.metrics)
    assert refused == report.statuses[503], report.show()


async def test_a_full_disk_under_load(tmp_path: Path) -> None:
    try:
        report = await full_disk(tmp_path, requests=REQUESTS, concurrency=16, outage=OUTAGE)
    except CannotRun as exc:
        pytest.skip(str(exc))
    _check(report, routers=1)
    # The usage log on the same disk: its lines were lost while it was full, said once too.
    assert report.lines("writing the usage log") <= 2 * 3, report.show()


@pytest.mark.parametrize("routers", [1, 2], ids=["one-router", "cluster"])
async def test_postgresql_stopped_and_started_under_load(tmp_path: Path, routers: int) -> None:
    try:
        report = await lost_postgres(tmp_path, routers=routers, requests=REQUESTS, concurrency=16, outage=OUTAGE)
    except CannotRun as exc:
        pytest.skip(str(exc))
    _check(report, routers)
