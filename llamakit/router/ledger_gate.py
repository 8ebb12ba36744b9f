"""While the ledger cannot be written (a full disk, a read-only file system, a lost PostgreSQL) the router says so
and steps aside, instead of answering 500 with a traceback per request: paid requests get 503
`ledger_unavailable` with Retry-After before anything is held or queued; /health and /ready answer 503, so a
balancer routes around this router; a probe write each second tells when the ledger is back, and the gate opens
again by itself. The log gets one line when it closes and one when it opens, with the requests refused between.

Holds whose release (or settlement) failed are owed to the ledger: the gate releases them once it answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llamakit.outage import Outage
from llamakit.router.ledger import HoldClosed, Ledger, LedgerError, LedgerUnavailable
from llamakit.web import Handler

__all__ = ["RETRY_AFTER", "LedgerGate", "gate_middleware"]

log = logging.getLogger(__name__)

# Seconds a refused client is asked to wait (the 503's Retry-After): a few probes' worth.
RETRY_AFTER: Final = 5
PROBE_SECONDS: Final = 1.0
PROBE_TIMEOUT: Final = 10.0  # a probe that hangs (an unreachable host) counts as failed


@dataclass(frozen=True)
class _Owed:
    error: str
    queue_ms: float | None


class LedgerGate:
    """Open while the ledger can be written. `check()` refuses (LedgerUnavailable) while it is closed;
    `failed(exc)` closes it on a LedgerUnavailable; `owe_release` keeps a hold to release once the ledger
    answers. Runs its probe while `watching(ledger)` (the router's lifetime)."""

    def __init__(self, *, probe_seconds: float = PROBE_SECONDS) -> None:
        self.probe_seconds = probe_seconds
        self.outage = Outage(log, "the ledger", cost="requests refused")
        self.refused = 0  # in all outages
        self._owed: dict[str, _Owed] = {}
        self._stuck: set[str] = set()  # owed holds whose release failed for another reason (logged once each)
        self._ledger: Ledger | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return not self.outage.down

    @asynccontextmanager
    async def watching(self, ledger: Ledger) -> AsyncIterator[None]:
        self._ledger = ledger
        try:
            yield
        finally:
            self._ledger = None
            if self._prober is not None:
                self._prober.cancel()
                with suppress(asyncio.CancelledError):
                    await self._prober
            if self._owed:
                log.warning("%d hold(s) whose release failed are still open; the next start releases them",
                            len(self._owed))  # fmt: skip

    def check(self) -> None:
        """Refuse a paid request while the ledger cannot be written: LedgerUnavailable (503 ledger_unavailable)."""
        if self.outage.down:
            self.outage.count()
            self.refused += 1
            raise LedgerUnavailable(
                "the ledger cannot be written now; nothing was held or charged: try again after Retry-After seconds"
            )

    def failed(self, exc: BaseException) -> None:
        """A ledger call failed: a LedgerUnavailable closes the gate (logged once), and the probe starts."""
        if isinstance(exc, LedgerUnavailable):
            self.outage.failed(exc, consequence=f"paid requests get 503 ledger_unavailable until a probe write "
                                                f"succeeds (every {self.probe_seconds:g} s)")  # fmt: skip
            self._wake()

    def owe_release(self, request_id: str, *, error: str, queue_ms: float | None) -> None:
        """Release the hold of `request_id` in full once the ledger answers (its release or settlement failed):
        without it the hold would stay open while this router runs."""
        self._owed[request_id] = _Owed(error, queue_ms)
        self._wake()

    def _wake(self) -> None:
        if self._ledger is not None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe(self._ledger), name="ledger probe")

    async def _probe(self, ledger: Ledger) -> None:
        while self.outage.down or self._owed:
            await asyncio.sleep(self.probe_seconds)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await ledger.probe()
                    released = await self._release_owed(ledger)
            except (LedgerError, TimeoutError):
                continue  # still down (or owed holds still fail): the next round tries again
            self.outage.ended(also=f"{released} hold(s) left open by it released" if released else "")

    async def _release_owed(self, ledger: Ledger) -> int:
        """Release the owed holds; LedgerUnavailable when the ledger fails again (the rest wait for the next
        round). Returns how many were released."""
        released = 0
        for request_id, owed in list(self._owed.items()):
            try:
                await ledger.release(request_id, status="error", error=owed.error, queue_ms=owed.queue_ms)
                released += 1
            except HoldClosed:
                pass  # closed meanwhile: another router's clean-up, or the failed call committed after all
            except LedgerUnavailable:
                raise
            except LedgerError as exc:  # not the database's availability: tried again each round, said once
                if request_id not in self._stuck:
                    self._stuck.add(request_id)
                    log.error("request %s: releasing its hold failed (%s); trying again", request_id, exc)
                continue
            del self._owed[request_id]
            self._stuck.discard(request_id)
        return released

    def health(self) -> dict[str, object]:
        """What /health says of the ledger: writable, or since when not and how many requests were refused."""
        if not self.outage.down:
            return {"writable": True}
        return {"writable": False, "since": self.outage.since, "refused": self.outage.counted}

    def collector(self) -> GateCollector:
        return GateCollector(self)


class GateCollector:
    """The gate's Prometheus series: `llamakit_router_ledger_writable` (1 or 0), `…_ledger_outages_total`,
    `…_ledger_holds_owed` (holds to release once it answers). Requests refused are in
    `llamakit_router_refusals_total{status="503",code="ledger_unavailable"}`."""

    def __init__(self, gate: LedgerGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        gate = self.gate
        yield GaugeMetricFamily(
            "llamakit_router_ledger_writable", "1 while the ledger can be written, 0 during an outage.",
            value=0 if gate.outage.down else 1,
        )  # fmt: skip
        yield CounterMetricFamily(
            "llamakit_router_ledger_outages", "Times the ledger could not be written (each logged once).",
            value=gate.outage.outages,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "llamakit_router_ledger_holds_owed", "Holds whose release failed, to release once the ledger answers.",
            value=len(gate._owed),
        )  # fmt: skip


def gate_middleware(gate: LedgerGate) -> Middleware:
    """A middleware (inside the error middleware) that closes `gate` on any LedgerUnavailable a handler raises,
    whatever the route: the error middleware then answers it 503 ledger_unavailable."""

    @web.middleware
    async def ledger_failures(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except LedgerUnavailable as exc:
            gate.failed(exc)
            raise

    return ledger_failures
