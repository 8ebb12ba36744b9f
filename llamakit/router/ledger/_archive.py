"""Archives: old usage records, with their holds, charges and remembered answers, moved out of the ledger's tables
into a file the operator keeps, on the operator's word (`llamakit ledger archive --before DATE`).

The file is gzip-compressed JSON Lines, one line per request (`ARCHIVE_COLUMNS`), readable with
`pandas.read_json(path, lines=True)`. It is written one gzip member per chunk of records, each on disk (fsync)
before the chunk leaves the database, so that a crash can never lose a record: at worst the records of the
chunk it interrupted are in the file and still in the ledger, and the next archive writes them again (their
`request_id` tells them apart). The ledger keeps what the audit needs in their place: one line per account
(credits charged, records) and per node (credits charged).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["ARCHIVE_CHUNK", "ARCHIVE_COLUMNS", "ArchiveReport", "append_lines", "start_archive"]

# Requests moved per transaction: a few tens of milliseconds of the database's write lock.
ARCHIVE_CHUNK: Final = 2000

# One line per request, in this order: the usage record (cost_credits is its `cost` in credits), its account's
# name, the hold it closed (none for a request refused before anything was held), the charge it made (none for
# a release), and the answer remembered under the client's idempotency key (if it gave one).
ARCHIVE_COLUMNS: Final = (
    "usage_id", "request_id", "account_id", "account", "model", "node", "status", "http_status", "prompt_tokens",
    "completion_tokens", "cost_credits", "bid", "held", "latency_ms", "queue_ms", "error", "created", "user",
    "key_prefix", "credit_value", "currency", "overhead_ms", "cached_tokens", "cache_discount", "passed_over",
    "hold_created", "hold_closed", "hold_status", "charged",
    "idempotency_key", "idempotency_fingerprint", "idempotency_response",
)  # fmt: skip


@dataclass(frozen=True)
class ArchiveReport:
    """What one archive moved: `records` requests created before `before` (epoch seconds), `charged` the credits
    they were charged, into `path` (`bytes` long)."""

    path: str
    before: float
    records: int
    charged: int
    bytes: int


def start_archive(target: Path) -> Path:
    """The empty file an archive for `target` is written to (`target` + '.partial', renamed to `target` once
    complete); ValueError when `target` exists."""
    if target.exists():
        raise ValueError(f"{target} exists: give a new file for the archive")
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    partial.touch()
    return partial


def append_lines(path: Path, rows: Sequence[dict[str, Any]]) -> int:
    """Append `rows` to the archive at `path` as one gzip member, on disk when this returns; the bytes written."""
    text = "".join(json.dumps({c: row.get(c) for c in ARCHIVE_COLUMNS}, separators=(",", ":")) + "\n" for row in rows)
    member = gzip.compress(text.encode("utf-8"), compresslevel=6)
    with path.open("ab") as file:
        file.write(member)
        file.flush()
        os.fsync(file.fileno())
    return len(member)
