"""One log line when something starts failing and one when it works again, with what happened in between: a
failure that repeats (every request, every retry, every round of a loop) is two lines in the log, not a
traceback each time."""

from __future__ import annotations

import logging
import time

__all__ = ["Outage"]


class Outage:
    """The state of one thing that can fail and come back (a database, a file): `failed` logs the first
    failure at WARNING with its reason, `count` counts what the outage cost meanwhile (requests refused,
    retries), `ended` logs the end at INFO with how long it lasted and that count.

    `what` names the thing ("the ledger"); `cost` names what is counted ("requests refused")."""

    def __init__(self, log: logging.Logger, what: str, *, cost: str = "failures") -> None:
        self.log, self.what, self.cost = log, what, cost
        self.down = False
        self.since: float | None = None  # time.time() of its start
        self.reason: str | None = None
        self.counted = 0  # during this outage
        self.outages = 0

    def failed(self, reason: object, *, consequence: str = "", traceback: BaseException | None = None) -> bool:
        """Note a failure; the first one of an outage is logged (with `traceback`'s, for an exception that is not
        the database's or the disk's: a bug). True when this one began an outage."""
        if self.down:
            return False
        self.down, self.since, self.reason, self.counted = True, time.time(), str(reason), 0
        self.outages += 1
        self.log.warning(
            "%s failed: %s%s", self.what, reason, f"; {consequence}" if consequence else "", exc_info=traceback
        )
        return True

    def count(self, n: int = 1) -> None:
        self.counted += n

    def ended(self, *, also: str = "") -> bool:
        """Note that it works again; the end of an outage is logged. True when an outage ended."""
        if not self.down:
            return False
        seconds = time.time() - (self.since or time.time())
        self.log.info(
            "%s works again after %.1f s (%d %s meanwhile%s)",
            self.what,
            seconds,
            self.counted,
            self.cost,
            f"; {also}" if also else "",
        )
        self.down, self.since, self.reason = False, None, None
        return True
