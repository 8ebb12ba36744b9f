"""What every part of the ledger shares: its base error and the bounds on amounts and names."""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_AMOUNT", "MAX_NAME_LEN", "LedgerError", "LedgerUnavailable"]

# Far beyond any real balance, and far below 64-bit integers (SQLite's INTEGER, PostgreSQL's BIGINT), whose
# overflow would turn a SQLite sum into a float.
MAX_AMOUNT: Final = 10**15
MAX_NAME_LEN: Final = 100


class LedgerError(Exception):
    """The ledger refused an operation or its database failed; nothing was changed."""


class LedgerUnavailable(LedgerError):
    """The ledger's database cannot be reached or written now: a full disk, a read-only file system, a lost or
    restarting PostgreSQL. The same call may succeed later (`Ledger.probe` tells when). As with any database
    failure, nothing was changed, except when a connection was lost during a commit, which may have committed."""
