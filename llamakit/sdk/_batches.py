"""Batches from Python: `submit_batch(requests)` uploads them as one JSONL file and starts a batch on the router
(OpenAI's Batch API: `POST /v1/files`, `POST /v1/batches`), which runs them at a discount on slots no interactive
request wants; the `Batch` it returns shows its progress, waits for it, and gives its results as a DataFrame.

    batch = client.submit_batch(["Rate 1-5: great", "Rate 1-5: awful"], max_tokens=2)
    batch.wait()            # a progress bar (tqdm when installed) until it ends
    frame = batch.results() # one row per request, in order: text, tokens, cost, error

A request is a prompt (a user message for chat, a prompt for completions, an input for embeddings), a list of
chat messages, or a whole body (a mapping). Each is a line whose `custom_id` is its index.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict

from llamakit.sdk._batch import progress_bar
from llamakit.sdk._calls import chat_messages
from llamakit.sdk._types import Messages

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

    from llamakit.sdk._client import AsyncClient, Client

__all__ = ["AsyncBatch", "Batch", "BatchCounts", "BatchInfo", "BatchUsage", "Endpoint", "batch_file", "results_frame"]

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
FINISHED: Final = frozenset({"completed", "failed", "cancelled", "expired"})
# The results' columns and their dtypes (`embedding`: a list of floats per row, for embeddings batches).
RESULT_DTYPES: Final = {
    "custom_id": "string",
    "status": "string",
    "status_code": "Int64",
    "text": "string",
    "embedding": "object",
    "prompt_tokens": "Int64",
    "completion_tokens": "Int64",
    "cached_tokens": "Int64",
    "cost": "object",
    "cost_credits": "Int64",
    "request_id": "string",
    "error": "string",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BatchCounts(_Frozen):
    """The batch's requests: `total`, those answered (`completed`), and those that `failed` (refused, cancelled,
    expired, or not paid for)."""

    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchUsage(_Frozen):
    """What the batch's answered requests used and cost: tokens, `cost` in the router's currency, `cost_credits`."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal | None = None
    cost_credits: int | None = None


class BatchInfo(_Frozen):
    """A batch as the router answers for it (OpenAI's Batch): `status` (in_progress, cancelling, then completed,
    failed, cancelled or expired), its progress (`request_counts`), cost (`usage`) and files; `discount` is what
    each request pays of its price. Times are epoch seconds."""

    id: str
    status: str
    endpoint: str
    input_file_id: str
    created_at: int
    expires_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: BatchCounts = BatchCounts()
    usage: BatchUsage = BatchUsage()
    discount: str | None = None
    errors: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def done(self) -> int:
        """Requests answered or failed so far."""
        return self.request_counts.completed + self.request_counts.failed


def batch_file(
    requests: Iterable[Messages | Mapping[str, Any]],
    *,
    endpoint: Endpoint,
    model: str | None,
    system: str | None,
    body: Mapping[str, Any],
) -> tuple[bytes, int]:
    """The JSONL input file of `requests` (see the module), each line's body with `model` and `body`'s fields
    unless it sets its own; and how many lines it has. ValueError for no request, or one of another shape."""
    lines = []
    for index, request in enumerate(requests):
        if isinstance(request, Mapping):
            line_body = {**body, **request}
        elif endpoint == "/v1/chat/completions":
            line_body = {**body, "messages": chat_messages(request, system)}
        elif isinstance(request, str):
            line_body = {**body, ("input" if endpoint == "/v1/embeddings" else "prompt"): request}
        else:
            raise ValueError(f"request {index} is chat messages, but the batch's endpoint is {endpoint}")
        if model is not None:
            line_body.setdefault("model", model)
        lines.append(json.dumps({"custom_id": str(index), "method": "POST", "url": endpoint, "body": line_body}))
    if not lines:
        raise ValueError("a batch needs at least one request")
    return ("\n".join(lines) + "\n").encode(), len(lines)


def results_frame(files: Iterable[str], *, total: int, embeddings: bool) -> pd.DataFrame:
    """One row per request, in the order submitted, from the text of the batch's output and error files."""
    import pandas as pd

    rows: dict[int, dict[str, Any]] = {}
    for text in files:
        for raw in text.splitlines():
            if raw.strip():
                line = json.loads(raw)
                rows[int(line["custom_id"])] = _row(line, embeddings)
    empty = dict.fromkeys(RESULT_DTYPES)
    data = [{**empty, "custom_id": str(i), "status": "pending", **rows.get(i, {})} for i in range(total)]
    frame = pd.DataFrame(data, columns=list(RESULT_DTYPES))
    return frame.astype(RESULT_DTYPES)


def _row(line: Mapping[str, Any], embeddings: bool) -> dict[str, Any]:
    response = line.get("response") or {}
    body = response.get("body") or {}
    error = line.get("error") or body.get("error")
    row: dict[str, Any] = {"status_code": response.get("status_code"), "request_id": response.get("request_id")}
    if error:
        return {**row, "status": error.get("code") or "error", "error": error.get("message")}
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    cost = usage.get("cost")
    row |= {
        "status": "ok",
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cached_tokens": details.get("cached_tokens", 0),
        "cost": None if cost is None else Decimal(str(cost)),
        "cost_credits": usage.get("cost_credits"),
    }
    data = body.get("data") or []
    choices = body.get("choices") or [{}]
    if embeddings:
        row["embedding"] = data[0].get("embedding") if data else None
    else:
        message = choices[0].get("message")
        row["text"] = message.get("content") if isinstance(message, dict) else choices[0].get("text")
    return row


class Batch:
    """A batch on the router (`Client.submit_batch`, `Client.batch`): `info` as last read, and its id.

    `refresh()` reads it again, `wait()` until it ends (with a progress bar), `results()` its answers as a DataFrame
    (`RESULT_DTYPES`), `cancel()` stops what has not started (what ran is charged)."""

    def __init__(self, client: Client, info: BatchInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        counts = self.info.request_counts
        return f"<Batch {self.id} {self.info.status} {self.info.done}/{counts.total}>"

    def refresh(self) -> BatchInfo:
        self.info = self._client._batch_info(self.id)
        return self.info

    def wait(self, *, poll: float = 1.0, progress: bool = True, timeout: float | None = None) -> BatchInfo:
        """Read the batch every `poll` seconds until it ends; TimeoutError after `timeout` seconds (None: none)."""
        _wait(self.info, self.refresh, time.sleep, poll=poll, progress=progress, timeout=timeout)
        return self.info

    def results(self) -> pd.DataFrame:
        """One row per request, in the order submitted (rows of requests not finished yet say `pending`)."""
        texts = [self._client._file_text(f) for f in (self.info.output_file_id, self.info.error_file_id) if f]
        return results_frame(texts, total=self.info.request_counts.total, embeddings=_embeddings(self.info))

    def cancel(self) -> BatchInfo:
        self.info = self._client._cancel_batch(self.id)
        return self.info


class AsyncBatch:
    """`Batch` for `AsyncClient`: the same, awaited."""

    def __init__(self, client: AsyncClient, info: BatchInfo) -> None:
        self._client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<AsyncBatch {self.id} {self.info.status} {self.info.done}/{self.info.request_counts.total}>"

    async def refresh(self) -> BatchInfo:
        self.info = await self._client._batch_info(self.id)
        return self.info

    async def wait(self, *, poll: float = 1.0, progress: bool = True) -> BatchInfo:
        """Read the batch every `poll` seconds until it ends (bound it with `asyncio.timeout`)."""
        import asyncio

        await _await(self.info, self.refresh, asyncio.sleep, poll=poll, progress=progress)
        return self.info

    async def results(self) -> pd.DataFrame:
        texts = [await self._client._file_text(f) for f in (self.info.output_file_id, self.info.error_file_id) if f]
        return results_frame(texts, total=self.info.request_counts.total, embeddings=_embeddings(self.info))

    async def cancel(self) -> BatchInfo:
        self.info = await self._client._cancel_batch(self.id)
        return self.info


def _embeddings(info: BatchInfo) -> bool:
    return info.endpoint.endswith("/embeddings")


def _wait(
    info: BatchInfo,
    refresh: Callable[[], BatchInfo],
    sleep: Callable[[float], None],
    *,
    poll: float,
    progress: bool,
    timeout: float | None,
) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = progress_bar(info.request_counts.total, label=f"batch {info.id}", enabled=progress)
    shown = 0
    try:
        while True:
            bar.update(info.done - shown)
            shown = info.done
            if info.finished:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {info.id} is still {info.status} after {timeout} s ({shown} done)")
            sleep(poll)
            info = refresh()
    finally:
        bar.close()


async def _await(
    info: BatchInfo,
    refresh: Callable[[], Awaitable[BatchInfo]],
    sleep: Callable[[float], Awaitable[None]],
    *,
    poll: float,
    progress: bool,
) -> None:
    bar = progress_bar(info.request_counts.total, label=f"batch {info.id}", enabled=progress)
    shown = 0
    try:
        while True:
            bar.update(info.done - shown)
            shown = info.done
            if info.finished:
                return
            await sleep(poll)
            info = await refresh()
    finally:
        bar.close()
