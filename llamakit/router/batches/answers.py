"""What `/v1/files` and `/v1/batches` take and answer, in OpenAI's shapes (openai-python's `FileObject`, `Batch`,
`BatchRequestCounts`, `BatchUsage`), with llamakit's own fields beside them: `discount`, and the cost of the lines
that ran in `usage` (`cost` in the operator's currency, `cost_credits` the exact integer), as every answer has it.
Times are epoch seconds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llamakit.money.currency import CreditValue
from llamakit.router.batches.lines import ENDPOINTS
from llamakit.router.ledger._batches import StoredBatch, StoredFile

__all__ = [
    "BatchAnswer",
    "BatchList",
    "FileAnswer",
    "FileDeleted",
    "FileList",
    "FileUpload",
    "NewBatch",
    "batch_answer",
    "file_answer",
]

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
assert set(Endpoint.__args__) == set(ENDPOINTS)  # type: ignore[attr-defined]  # one list of endpoints
_WINDOW_SECONDS = {"24h": 24 * 3600}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- bodies -------------------------------------------------------------------------------------------------


class FileUpload(BaseModel):
    """`POST /v1/files`, as multipart/form-data: the JSONL `file` and its `purpose` (llamakit takes batch files)."""

    file: bytes = Field(description="the batch's requests, one JSON object a line (docs/api.md#batches)")
    purpose: Literal["batch"]


class NewBatch(BaseModel):
    """`POST /v1/batches`: run the requests of an uploaded file, each at `endpoint`, within `completion_window`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=100, description="a file uploaded with purpose 'batch'")
    endpoint: Endpoint
    completion_window: Literal["24h"] = Field(description="the batch expires 24 hours after it is made")
    metadata: dict[str, str] | None = Field(
        default=None, description="up to 16 pairs: keys up to 64 characters, values up to 512"
    )

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 characters and values up to 512")
        return value

    @property
    def window(self) -> float:
        """The completion window in seconds."""
        return float(_WINDOW_SECONDS[self.completion_window])


# --- answers ------------------------------------------------------------------------------------------------


class FileAnswer(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None


class FileList(_Open):
    object: Literal["list"]
    data: list[FileAnswer]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(_Open):
    total: int
    completed: int
    failed: int


class BatchError(_Open):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(_Open):
    object: Literal["list"]
    data: list[BatchError]


class BatchUsage(_Open):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int
    cost: float = Field(description="the lines' charges in the operator's currency")
    cost_credits: int = Field(description="the lines' charges, credits")


class BatchAnswer(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage
    discount: str = Field(description="what each line pays of its price (--batch-discount when it was made)")


class BatchList(_Open):
    object: Literal["list"]
    data: list[BatchAnswer]
    first_id: str | None
    last_id: str | None
    has_more: bool


def file_answer(file: StoredFile) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_answer(batch: StoredBatch, money: CreditValue) -> dict[str, Any]:
    """A batch as OpenAI's Batch, with its lines' tokens and cost in `usage`."""

    def at(when: float | None) -> int | None:
        return None if when is None else int(when)

    finished = at(batch.finished)
    status = batch.status
    errors = None
    if status == "failed" and batch.stopped is not None:
        errors = {"object": "list", "data": [{**batch.stopped, "param": None, "line": None}]}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status,
        "created_at": int(batch.created),
        "in_progress_at": int(batch.created),  # checked when it was made: it runs from then on
        "expires_at": int(batch.expires),
        "finalizing_at": finished,
        "completed_at": finished if status == "completed" else None,
        "failed_at": finished if status == "failed" else None,
        "expired_at": finished if status == "expired" else None,
        "cancelling_at": at(batch.cancelling_at),
        "cancelled_at": finished if status == "cancelled" else None,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "errors": errors,
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
        "model": batch.model,
        "usage": {
            "input_tokens": batch.prompt_tokens,
            "input_tokens_details": {"cached_tokens": batch.cached_tokens},
            "output_tokens": batch.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": batch.prompt_tokens + batch.completion_tokens,
            **money.cost_fields(batch.cost),
        },
        "discount": batch.discount,
    }
