"""What every part of the ledger shares: its base error and the bounds on amounts and names."""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_AMOUNT", "MAX_NAME_LEN", "LedgerError"]

# Far beyond any real balance, and far below 64-bit integers (SQLite's INTEGER, PostgreSQL's BIGINT), whose
# overflow would turn a SQLite sum into a float.
MAX_AMOUNT: Final = 10**15
MAX_NAME_LEN: Final = 100


class LedgerError(Exception):
    """The ledger refused an operation or its database failed; nothing was changed."""
