"""The books' audit in the background: at start-up, then every `--audit-every` seconds, off the paid path.

The ledger reads its running totals; the audit proves them by a full scan (`Ledger.audit`). A disagreement is an
alarm, never a silent fix: it is logged at ERROR with what differs, `/metrics` says
`llamakit_ledger_audit_ok 0`, and `/admin/stats` (so the dashboard) and `/admin/books` carry it until an audit
agrees again. The totals are left as they are for the operator to look at (see docs/operating.md#the-audit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any, Final

from llamakit.router.ledger import Audit, Ledger, LedgerError

__all__ = ["Auditor"]

log = logging.getLogger(__name__)

# Discrepancies the snapshot and /admin/books carry (the log has the first hundred).
SHOWN: Final = 10


class Auditor:
    """Runs `ledger.audit()` one at a time and keeps what the last one found."""

    def __init__(self, ledger: Ledger, every: float) -> None:
        self.ledger = ledger
        self.every = every
        self.last: Audit | None = None
        self.error: str | None = None  # why the last audit could not run, if it could not
        self.runs = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> Audit:
        """Audit now (after any audit already running); LedgerError when the ledger cannot be read."""
        async with self._lock:
            try:
                audit = await self.ledger.audit()
            except LedgerError as exc:
                self.error = str(exc)
                log.warning("the books' audit could not run: %s", exc)
                raise
            self.last, self.error = audit, None
            self.runs += 1
            if audit.ok:
                log.info("the books' audit agrees: %d rows counted in %.1f s", audit.scanned, audit.seconds)
            else:
                listed = "; ".join(f"{d.what}: kept {d.kept}, counted {d.counted}" for d in audit.discrepancies)
                log.error(
                    "the books' audit DISAGREES with the running totals in %d place(s) (%s%s). Nothing was changed: "
                    "see docs/operating.md#the-audit",
                    len(audit.discrepancies) + audit.more,
                    listed,
                    f"; and {audit.more} more" if audit.more else "",
                )
            return audit

    def start(self) -> None:
        """Audit at once in the background, then every `every` seconds (never, with 0)."""
        if self.every > 0:
            self._task = asyncio.create_task(self._loop(), name="books audit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            with suppress(LedgerError):
                await self.run()
            await asyncio.sleep(self.every)

    def view(self) -> dict[str, Any]:
        """The last audit as the snapshot and /admin/books show it: `ok` (None before the first has run),
        when it ran (epoch seconds), how long it took, the rows it counted and the first SHOWN discrepancies."""
        audit = self.last
        if audit is None:
            return {"ok": None, "error": self.error, "every": self.every}
        return {
            "ok": audit.ok,
            "checked": audit.started,
            "age": max(0.0, time.time() - audit.started),
            "seconds": round(audit.seconds, 3),
            "scanned": audit.scanned,
            "discrepancies": [
                {"what": d.what, "kept": d.kept, "counted": d.counted} for d in audit.discrepancies[:SHOWN]
            ],
            "count": len(audit.discrepancies) + audit.more,
            "error": self.error,
            "every": self.every,
        }
