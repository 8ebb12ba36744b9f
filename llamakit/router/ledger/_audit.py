"""The audit: the books proved by a full scan of the history, against the running totals the ledger keeps.

Every figure the ledger reads instead of scanning (its totals, each account's held, spent and deposited, each
node's fees, each account's and the ledger's today and this month, each key's open holds) is counted again
from the rows it sums, and every difference is reported. The audit never changes anything: a running total
that disagrees with its rows is an alarm for the operator (see `llamakit.router.auditor`), not something to
fix behind their back.

A backend gives an `AuditSession`: the running figures read in one snapshot (`figures`), then the immutable
history (deposits, charges, usage records) summed by id range (`sums`), each range read on its own, so that
no read holds a snapshot of the database for long (on SQLite, a long reader keeps the WAL from being reset).
"""

from __future__ import annotations

import calendar
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

from llamakit.router.ledger._api_keys import day_of, month_of

__all__ = ["Audit", "AuditFigures", "AuditSession", "Discrepancy", "Periods", "audit_scan"]

# Ids summed per read: a few tens of milliseconds of SQLite.
AUDIT_CHUNK: Final = 50_000
# Discrepancies listed in full; the rest are counted.
MAX_LISTED: Final = 100


@dataclass(frozen=True)
class Discrepancy:
    """One running figure that its rows do not add up to: `kept` is the ledger's figure, `counted` the scan's."""

    what: str
    kept: int
    counted: int


@dataclass(frozen=True)
class Audit:
    """What one audit found: `ok` when every running figure is what its rows add up to and the books balance.

    `started` is epoch seconds, `seconds` how long it took, `scanned` the rows it summed, `discrepancies` the first
    MAX_LISTED differences and `more` how many others there were.
    """

    started: float
    seconds: float
    scanned: int
    discrepancies: tuple[Discrepancy, ...] = ()
    more: int = 0

    @property
    def ok(self) -> bool:
        return not self.discrepancies

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "discrepancies": [asdict(d) for d in self.discrepancies]}


@dataclass(frozen=True)
class Periods:
    """The UTC day and month an audit checks (those of its start), as epoch-second bounds [start, end)."""

    day: str
    month: str
    day_start: int
    day_end: int
    month_start: int
    month_end: int

    @classmethod
    def of(cls, now: float) -> Periods:
        t = time.gmtime(now)
        day_start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        month_start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        next_month = (t.tm_year + t.tm_mon // 12, t.tm_mon % 12 + 1)
        month_end = calendar.timegm((*next_month, 1, 0, 0, 0))
        return cls(day_of(now), month_of(now), day_start, day_start + 86_400, month_start, month_end)


@dataclass
class AuditFigures:
    """The running figures and what they are checked against that only a snapshot can give (open holds, balances),
    read together in one snapshot; `max_ids` bounds the history the audit sums (table → its largest id)."""

    totals: dict[str, int]  # deposits, balances, holds, charges, accounts, requests, cached_tokens, cache_discount
    archived_before: float | None
    accounts: dict[int, tuple[str, int, int, int, int]]  # id → name, balance, held, spent, deposited
    open_holds: dict[int, int]  # account → credits in its open holds
    keys_held: dict[str, tuple[str, int]]  # key hash → prefix, api_keys.held (keys with either side non-zero)
    keys_open: dict[str, int]  # key hash → credits in its open holds
    nodes: dict[str, int]  # node ('' for none) → node_fees
    periods: dict[tuple[int, str], tuple[int, int, int]]  # (account, period) → spent, requests, refusals
    ledger_periods: dict[str, tuple[int, int, int, int]]  # period → spent, requests, refusals, accounts
    archived_accounts: dict[int, tuple[int, int, int, int]]  # account → charged, records, cached tokens, discount
    archived_nodes: dict[str, int]
    max_ids: dict[str, int]
    archive_mark: tuple[float | None, int] = field(default=(None, 0))  # to tell whether an archive ran meanwhile


class AuditSession(Protocol):
    """A backend's reads for one audit (see the module's docstring)."""

    async def figures(self, periods: Periods) -> AuditFigures: ...

    async def sums(self, table: str, low: int, high: int, periods: Periods) -> list[tuple[Any, ...]]:
        """Rows of `table` with low < id <= high, summed:

        deposits → (account_id, credits, rows); charges → (account_id, node or '', credits, credits in the day, in
        the month, rows); usage → (account_id, records, refusals, records in the day, refusals in the day, in the
        month, refusals in the month, cached prompt tokens, what they saved).
        """
        ...

    async def archive_mark(self) -> tuple[float | None, int]:
        """(archived_before, usage records archived in all): what changes when an archive runs."""
        ...


class _Findings:
    def __init__(self) -> None:
        self.listed: list[Discrepancy] = []
        self.more = 0

    def check(self, what: str, kept: int, counted: int) -> None:
        if kept == counted:
            return
        if len(self.listed) < MAX_LISTED:
            self.listed.append(Discrepancy(what, int(kept), int(counted)))
        else:
            self.more += 1


async def audit_scan(session: AuditSession, now: float) -> Audit | None:
    """One audit through `session`; None when an archive ran while it scanned (the caller audits again)."""
    began = time.perf_counter()
    periods = Periods.of(now)
    figures = await session.figures(periods)
    deposits: dict[int, int] = defaultdict(int)
    charges: dict[int, int] = defaultdict(int)
    by_node: dict[str, int] = defaultdict(int)
    records: dict[int, int] = defaultdict(int)
    cached = [0, 0]  # prompt tokens read from caches, credits they saved
    period_rows: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    scanned = 0
    for table in ("deposits", "charges", "usage"):
        for low in range(0, figures.max_ids.get(table, 0), AUDIT_CHUNK):
            rows = await session.sums(table, low, min(low + AUDIT_CHUNK, figures.max_ids[table]), periods)
            for row in rows:
                account = int(row[0])
                if table == "deposits":
                    deposits[account] += int(row[1])
                    scanned += int(row[2])
                elif table == "charges":
                    scanned += int(row[5])
                    charges[account] += int(row[2])
                    by_node[str(row[1])] += int(row[2])
                    period_rows[account, periods.day][0] += int(row[3])
                    period_rows[account, periods.month][0] += int(row[4])
                else:
                    records[account] += int(row[1])
                    scanned += int(row[1])
                    cached[0] += int(row[7] or 0)
                    cached[1] += int(row[8] or 0)
                    for period, n, refused in ((periods.day, row[3], row[4]), (periods.month, row[5], row[6])):
                        period_rows[account, period][1] += int(n)
                        period_rows[account, period][2] += int(refused)
    if await session.archive_mark() != figures.archive_mark:
        return None
    found = _Findings()
    _compare(found, figures, periods, deposits, charges, by_node, records, period_rows, cached)
    return Audit(
        started=now,
        seconds=time.perf_counter() - began,
        scanned=scanned,
        discrepancies=tuple(found.listed),
        more=found.more,
    )


def _compare(
    found: _Findings,
    figures: AuditFigures,
    periods: Periods,
    deposits: dict[int, int],
    charges: dict[int, int],
    by_node: dict[str, int],
    records: dict[int, int],
    period_rows: dict[tuple[int, str], list[int]],
    cached: list[int],
) -> None:
    archived = [sum(column) for column in zip(*figures.archived_accounts.values(), strict=True)] or [0, 0, 0, 0]
    counted = {
        "deposits": sum(deposits.values()),
        "balances": sum(a[1] for a in figures.accounts.values()),
        "holds": sum(figures.open_holds.values()),
        "charges": sum(charges.values()) + archived[0],
        "accounts": len(figures.accounts),
        "requests": sum(records.values()) + archived[1],
        "cached_tokens": cached[0] + archived[2],
        "cache_discount": cached[1] + archived[3],
    }
    # The books themselves, from the rows: what was deposited is in balances, open holds or charges.
    found.check("books: deposits against balances + open holds + charges", counted["deposits"],
                counted["balances"] + counted["holds"] + counted["charges"])  # fmt: skip
    for name, value in counted.items():
        found.check(f"totals: {name}", figures.totals.get(name, 0), value)
    for account, (name, balance, held, spent, deposited) in sorted(figures.accounts.items()):
        who = f"account {account} ({name})"
        open_held = figures.open_holds.get(account, 0)
        charged = charges.get(account, 0) + figures.archived_accounts.get(account, (0, 0, 0, 0))[0]
        found.check(f"{who}: held", held, open_held)
        found.check(f"{who}: spent", spent, charged)
        found.check(f"{who}: deposited", deposited, deposits.get(account, 0))
        found.check(f"{who}: deposits against balance + open holds + charges", deposits.get(account, 0),
                    balance + open_held + charged)  # fmt: skip
    for node in sorted({*figures.nodes, *by_node, *figures.archived_nodes}):
        label = repr(node) if node else "(no node)"
        found.check(f"node {label}: fees", figures.nodes.get(node, 0),
                    by_node.get(node, 0) + figures.archived_nodes.get(node, 0))  # fmt: skip
    for key_hash in sorted({*figures.keys_held, *figures.keys_open}):
        prefix, held = figures.keys_held.get(key_hash, ("?", 0))
        found.check(f"key {prefix}…: held", held, figures.keys_open.get(key_hash, 0))
    # A period part of whose records an archive took cannot be counted again: only those after it are checked.
    checked = [
        period
        for period, start in ((periods.day, periods.day_start), (periods.month, periods.month_start))
        if figures.archived_before is None or start >= figures.archived_before
    ]
    for period in checked:
        totals = [0, 0, 0, 0]
        keys = {k for k in (*figures.periods, *period_rows) if k[1] == period}
        for account, _ in sorted(keys):
            kept = figures.periods.get((account, period), (0, 0, 0))
            rows = period_rows.get((account, period), [0, 0, 0])
            for i, what in enumerate(("spent", "requests", "refusals")):
                found.check(f"account {account} in {period}: {what}", kept[i], rows[i])
                totals[i] += rows[i]
            totals[3] += rows[1] > 0
        kept_total = figures.ledger_periods.get(period, (0, 0, 0, 0))
        for i, what in enumerate(("spent", "requests", "refusals", "accounts")):
            found.check(f"ledger in {period}: {what}", kept_total[i], totals[i])


def rows_to_dict(rows: Iterable[Sequence[Any]]) -> dict[Any, Any]:
    """{first column: the rest (or the second alone when there are two)} of `rows`."""
    return {row[0]: (row[1] if len(row) == 2 else tuple(row[1:])) for row in rows}
