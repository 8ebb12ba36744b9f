"""One router per SQLite ledger: the file is locked (flock) for as long as a router has it open.

A router's start releases every hold it finds open, since in SQLite they can only be its own, left by a run
that did not finish. A second router on the same file would release the first one's holds while their
requests run, and give their tokens away (found by a new user: a second `llamakit up` whose router restarted
in a loop, each start recovering the live router's holds). Several routers share a ledger only in
PostgreSQL, with `--cluster yes`, where each has a lease and releases only the holds of routers without one.

flock, not SQLite's own locks: those are fcntl locks on byte ranges, per process, which flock does not
touch on Linux; the kernel drops a flock with the last descriptor of its file, so a killed router leaves
none behind.
"""

from __future__ import annotations

import fcntl
import os

from llamakit.router.ledger._contract import LedgerError

__all__ = ["claim_sqlite_ledger"]


def claim_sqlite_ledger(path: str) -> int | None:
    """Lock the SQLite ledger at `path` for this router; the lock's descriptor, to close when the router stops
    (None for an in-memory ledger). LedgerError when another router has it."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(
            f"another router is running on the ledger {path}: a SQLite ledger has one router (its start releases "
            "the holds it finds open). Stop that one, or run several routers on PostgreSQL: "
            "--db postgresql://… --cluster yes"
        ) from None
    return fd
