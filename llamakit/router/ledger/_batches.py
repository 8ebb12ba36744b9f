"""Files and batches in the ledger's database (OpenAI's Batch API, run by llamakit.router.batches): what both
backends store and the contract they keep (`BatchStore`, `ledger.batch_store`).

No money moves here. A batch line is held, settled or refunded by the ledger as any request is, and its answer is
remembered with its charge under the idempotency key `line_key(batch, line)`: a router that dies between the
settlement and `finish_line` leaves the answer where the next router to claim the line finds it, so no line is
charged twice.

A line goes `pending` → `running` (claimed by one router, its `attempt`-th try) → `completed` or `failed` (its
`output`: a line of the batch's output or error file). A running line whose router died goes back to pending
(`requeue_lost`). When a batch has no pending or running line left it is finished in the same transaction: its
status set, its output and error files made.
"""

from __future__ import annotations

import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "OPEN_STATUSES",
    "BatchOverview",
    "BatchStore",
    "ClaimedLine",
    "LineOutcome",
    "NewLine",
    "Render",
    "StoredBatch",
    "StoredFile",
    "line_key",
    "new_batch_id",
    "new_file_id",
]

# A batch that still has lines to run or to wait for.
OPEN_STATUSES: Final = ("in_progress", "cancelling")
# What makes a failed line's output from its request as uploaded (its JSON text): see llamakit.router.batches.
Render = Callable[[str], str]


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def line_key(batch_id: str, line: int) -> str:
    """The idempotency key a batch line's answer is remembered under, with its charge."""
    return f"batch:{batch_id}:{line}"


@dataclass(frozen=True)
class StoredFile:
    """A file of an account: uploaded (`purpose` 'batch'), or a batch's output or error file ('batch_output',
    made from the lines of `batch_id`, `kind` 'output' or 'errors'). `bytes` and `lines` are its size."""

    id: str
    account_id: int
    purpose: str
    filename: str
    bytes: int
    lines: int
    created: float
    batch_id: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class NewLine:
    """A line of a new batch: the model it queues for, and the line as uploaded (its JSON text)."""

    model: str
    request: str


@dataclass(frozen=True)
class StoredBatch:
    """A batch and its lines' running figures: `completed` and `failed` lines of `total`, their tokens and `cost`
    (credits charged). `stopped` is what ended it early (`{"code", "message"}`: cancelled, expired, the balance
    ran out); `finished` when it reached its last status."""

    id: str
    account_id: int
    key_hash: str
    endpoint: str
    input_file_id: str
    completion_window: str
    model: str | None
    metadata: dict[str, str] | None
    discount: str
    status: str
    stopped: dict[str, str] | None
    created: float
    expires: float
    cancelling_at: float | None
    finished: float | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: int = 0

    @property
    def open(self) -> bool:
        return self.status in OPEN_STATUSES


@dataclass(frozen=True)
class ClaimedLine:
    """A line a router claimed to run, with what it needs of its batch."""

    batch_id: str
    line: int
    model: str
    request: str
    attempt: int
    account_id: int
    key_hash: str
    endpoint: str
    discount: str
    expires: float

    @property
    def key(self) -> str:
        return line_key(self.batch_id, self.line)


@dataclass(frozen=True)
class LineOutcome:
    """How a line ended: `completed` (its output a 200 answer) or `failed` (its output an error), and what it
    used and cost."""

    status: str
    output: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: int = 0


@dataclass(frozen=True)
class BatchOverview:
    """Batches at work, herd-wide, for the dashboard: how many are open by status, their lines still pending and
    running, and the oldest few (`shown`) with their account's name."""

    open: dict[str, int]
    pending: int
    running: int
    shown: list[tuple[StoredBatch, str]] = field(default_factory=list)


class BatchStore(ABC):
    """Files, batches and their lines in the ledger's database (see the module). Every method is one transaction;
    a database failure raises LedgerError (LedgerUnavailable when it cannot be reached or written now). An id of
    another account's file or batch is found by none of the `account_id` methods."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    # -- files -------------------------------------------------------------------------------------------

    @abstractmethod
    async def create_file(
        self, account_id: int, *, purpose: str, filename: str, content: bytes, lines: int
    ) -> StoredFile: ...

    @abstractmethod
    async def find_file(self, account_id: int, file_id: str) -> StoredFile | None: ...

    @abstractmethod
    async def files(
        self, account_id: int, *, after: str | None, limit: int, purpose: str | None, ascending: bool
    ) -> list[StoredFile]:
        """The account's files, newest first (oldest first when `ascending`), after the file `after`."""

    @abstractmethod
    async def delete_file(self, account_id: int, file_id: str) -> bool:
        """Delete a file; False when the account has none by that id."""

    @abstractmethod
    async def file_content(self, file: StoredFile) -> bytes:
        """An uploaded file's bytes (a batch's output and error files are its lines: `output_lines`)."""

    @abstractmethod
    async def output_lines(self, batch_id: str, kind: str, *, after: int, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` lines of a batch's output (`kind` 'output': its completed lines) or error file ('errors':
        its failed ones) after line number `after`, in order: (line, output)."""

    # -- batches -----------------------------------------------------------------------------------------

    async def create_batch(
        self,
        account_id: int,
        *,
        key_hash: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        model: str | None,
        metadata: dict[str, str] | None,
        discount: str,
        expires: float,
        lines: Sequence[NewLine],
    ) -> StoredBatch:
        """A new batch, in progress, with its lines pending."""
        batch = StoredBatch(
            id=new_batch_id(), account_id=account_id, key_hash=key_hash, endpoint=endpoint,
            input_file_id=input_file_id, completion_window=completion_window, model=model, metadata=metadata,
            discount=discount, status="in_progress", stopped=None, created=self._clock(), expires=expires,
            cancelling_at=None, finished=None, output_file_id=None, error_file_id=None, total=len(lines),
        )  # fmt: skip
        await self._insert_batch(batch, lines)
        return batch

    @abstractmethod
    async def _insert_batch(self, batch: StoredBatch, lines: Sequence[NewLine]) -> None:
        """Write a new `batch` and its `lines` (numbered from 0), in one transaction."""

    @abstractmethod
    async def find_batch(self, account_id: int, batch_id: str) -> StoredBatch | None: ...

    @abstractmethod
    async def batches(self, account_id: int, *, after: str | None, limit: int) -> list[StoredBatch]:
        """The account's batches, newest first, after the batch `after`."""

    @abstractmethod
    async def cancel_batch(self, account_id: int, batch_id: str, render: Render) -> StoredBatch | None:
        """Cancel an open batch: it is `cancelling` until its running lines end, its pending lines fail now (each
        its `render(request)` output). A batch that is not open is returned as it is; None when there is none."""

    @abstractmethod
    async def stop_batch(self, batch_id: str, stopped: dict[str, str], render: Render) -> None:
        """End a batch in progress early (the balance ran out, the key was revoked): its pending lines fail with
        `render` and it is `failed` with `stopped` as its error once its running lines end. A batch that is not
        in progress is left as it is."""

    @abstractmethod
    async def expire_batches(self, stopped: dict[str, str], render: Render) -> list[str]:
        """Batches in progress past their expiry: they stop with `stopped` (its code `batch_expired`), their pending
        lines fail with `render`, and they are `expired` once their running lines end. Returns their ids."""

    # -- lines -------------------------------------------------------------------------------------------

    @abstractmethod
    async def claim_lines(
        self,
        router_id: str,
        room: Mapping[str, int],
        *,
        skip: Collection[str] = (),
        per_key: Mapping[str, int] | None = None,
    ) -> list[ClaimedLine]:
        """Claim for `router_id` up to `room[model]` pending lines of each model, of batches in progress (but those
        in `skip`), the oldest batch's first: each is now running there, claimed by no other router (PostgreSQL:
        SKIP LOCKED). `per_key` (API key hash → lines): at most that many lines, all models together, of the
        batches each key named made (its rate limits' room); keys not named are not limited."""

    @abstractmethod
    async def finish_line(self, line: ClaimedLine, router_id: str, outcome: LineOutcome) -> bool:
        """Record how a claimed line ended, and finish its batch when it was the last; False (and nothing
        changed) when the claim was lost: the line went back to pending and was claimed again meanwhile."""

    @abstractmethod
    async def return_line(self, line: ClaimedLine, router_id: str) -> bool:
        """A claimed line goes back to pending (it could not run now); False when the claim was lost."""

    @abstractmethod
    async def requeue_lost(self, router_id: str, *, cluster: bool, start: bool) -> int:
        """Running lines of routers that are gone go back to pending: on one router's database, every running line
        (called at its `start`); with `cluster`, those of routers without a live lease, and at `start` those of
        `router_id` too (its earlier life). Returns how many."""

    @abstractmethod
    async def statuses(self, batch_ids: Sequence[str]) -> dict[str, str]:
        """The status of each batch named."""

    @abstractmethod
    async def running_lines(self, batch_id: str) -> int:
        """The batch's lines running now, on any router."""

    @abstractmethod
    async def overview(self, *, limit: int) -> BatchOverview: ...


def metadata_text(metadata: dict[str, str] | None) -> str | None:
    return None if metadata is None else json.dumps(metadata, separators=(",", ":"))


def batch_from(row: Mapping[str, Any]) -> StoredBatch:
    return StoredBatch(
        id=row["id"],
        account_id=row["account_id"],
        key_hash=row["key_hash"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        model=row["model"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        discount=row["discount"],
        status=row["status"],
        stopped=json.loads(row["stopped"]) if row["stopped"] else None,
        created=row["created"],
        expires=row["expires"],
        cancelling_at=row["cancelling_at"],
        finished=row["finished"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        total=row["total"],
        completed=row["completed"],
        failed=row["failed"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cached_tokens=row["cached_tokens"],
        cost=row["cost"],
    )


def file_from(row: Mapping[str, Any]) -> StoredFile:
    return StoredFile(
        id=row["id"],
        account_id=row["account_id"],
        purpose=row["purpose"],
        filename=row["filename"],
        bytes=row["bytes"],
        lines=row["lines"],
        created=row["created"],
        batch_id=row["batch_id"],
        kind=row["kind"],
    )


def final_status(status: str, stopped: dict[str, str] | None) -> str:
    """The status a batch ends with once no line is pending or running."""
    if status == "cancelling":
        return "cancelled"
    if stopped is None:
        return "completed"
    return "expired" if stopped.get("code") == "batch_expired" else "failed"
