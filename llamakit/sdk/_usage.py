"""Usage accounting on the client side: one `UsageRecord` per call, failed ones included.

Records are kept in a `UsageBook` per client (thread-safe), appended to a JSONL file as they happen, seen
by every `meter()` block the call was made in, and turned into a pandas DataFrame with proper dtypes.
pandas is imported only when a frame is asked for, so a script that only generates starts fast.
"""

from __future__ import annotations

import html
import logging
import os
import threading
from collections.abc import Iterable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

from llamakit.money.currency import format_price
from llamakit.sdk._models import PassedOver, credits_as_cost_credits

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["FRAME_DTYPES", "Meter", "UsageBook", "UsageRecord", "meter", "read_usage_log", "usage_records_frame"]

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "cut"]


class UsageRecord(BaseModel):
    """What one call did and cost. `time` is when it started (UTC); times are in seconds.

    `status` is "ok", "error" (then `error` and `error_type` say what happened, `status_code` the HTTP
    status if the router answered) or "cut" (a stream closed by the caller before it ended: the router
    charges the tokens delivered, which the client cannot see, so tokens and cost are unknown).
    `cost_credits` is what the router's ledger charged; `cost` is its price in `currency` (credits × the
    router's credit value, an exact decimal). `cached_tokens` of the prompt tokens came from the node's cache,
    whose own fee took `cache_discount_credits` (`cache_discount` in `currency`) off the cost. `passed_over`
    (a call with `models=`) names the models that did not serve it; `model` is the one that did.
    `attempts` counts the requests sent (retries included; 0 when the call failed before sending one).
    Fields the call never learned are None, never 0: a missing cost is not a free call.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    time: AwareDatetime
    kind: Literal["generate", "chat", "embed"]
    stream: bool = False
    model: str | None = None
    node: str | None = None
    request_id: str | None = None
    idempotency_key: str | None = None
    status: Status = "ok"
    status_code: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost: Decimal | None = None
    cost_credits: int | None = None
    cache_discount: Decimal | None = None
    cache_discount_credits: int | None = None
    currency: str | None = None
    passed_over: list[PassedOver] | None = None
    bid: float | None = None
    latency: float | None = None
    ttft: float | None = None
    queue_wait: float | None = None
    attempts: int = 1
    error_type: str | None = None
    error: str | None = None
    user: str | None = None  # the OpenAI `user` the call named

    _older_log = model_validator(mode="before")(credits_as_cost_credits)  # a line of an older SDK's log


FRAME_DTYPES: Final[dict[str, str]] = {
    "time": "datetime64[ns, UTC]",
    "kind": "category",
    "stream": "bool",
    "model": "category",
    "node": "category",
    "request_id": "string",
    "idempotency_key": "string",
    "status": "category",
    "status_code": "Int64",
    "prompt_tokens": "Int64",
    "cached_tokens": "Int64",
    "completion_tokens": "Int64",
    "total_tokens": "Int64",
    "cost": "float64",
    "cost_credits": "Int64",
    "cache_discount": "float64",
    "cache_discount_credits": "Int64",
    "currency": "category",
    "passed_over": "string",
    "bid": "float64",
    "latency": "float64",
    "ttft": "float64",
    "queue_wait": "float64",
    "attempts": "Int64",
    "error_type": "category",
    "error": "string",
    "user": "string",
}
"""The columns of a usage frame and their dtypes: nullable `Int64` for counts and credits (a failed call
has none, and NaN would turn them into floats), floats for seconds and for `cost` and `cache_discount` (prices,
exact to 15 significant digits; sum `cost_credits` for exact totals), `category` for the few repeating labels;
`passed_over` as `model=reason, …` text (the `X-Llamakit-Passed-Over` form; None for a call without `models=`)."""


def usage_records_frame(records: Iterable[UsageRecord]) -> pd.DataFrame:
    """Records as a DataFrame with `FRAME_DTYPES`, one row per record, in the order given."""
    import pandas as pd

    rows = list(records)
    columns: dict[str, Any] = {}
    for name, dtype in FRAME_DTYPES.items():
        values = [getattr(r, name) for r in rows]
        if name in ("cost", "cache_discount"):
            values = [None if v is None else float(v) for v in values]
        elif name == "passed_over":
            values = [None if v is None else ", ".join(f"{p.model}={p.reason}" for p in v) for v in values]
        if name == "time":
            columns[name] = pd.Series(pd.to_datetime(values, utc=True), dtype="datetime64[ns, UTC]")
        else:
            columns[name] = pd.Series(values, dtype=dtype if dtype != "Int64" else "object").astype(dtype)
    return pd.DataFrame(columns)


def read_usage_log(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A JSONL usage log (as `LLAMAKIT_USAGE_LOG` writes it) as a usage frame, possibly of many processes."""
    with Path(path).open(encoding="utf-8") as handle:
        records = [UsageRecord.model_validate_json(line) for line in handle if line.strip()]
    return usage_records_frame(records)


def _append_line(path: Path, data: bytes) -> None:
    """Append one whole line with a single `write` on an `O_APPEND` descriptor.

    With `O_APPEND` the kernel moves to the end and writes in one step, so lines written by other threads
    or processes never interleave with this one. Opening per line costs microseconds next to a network
    call, and keeps working when the file is rotated away.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:  # a short write only happens when the disk is full; finish the line if we can
            written = os.write(fd, view)
            view = view[written:]
    finally:
        os.close(fd)


class UsageBook:
    """A client's usage records, safe to add to from many threads and tasks, optionally mirrored to JSONL.

    Clients may share a book (the module-level functions' sync and async clients do), so one frame shows
    all their calls.
    """

    def __init__(self, log_path: str | os.PathLike[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._records: list[UsageRecord] = []
        self.log_path = Path(log_path).expanduser() if log_path is not None else None
        if self.log_path is not None:
            # Fail now, with the path in the message, rather than after the first paid call.
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                _append_line(self.log_path, b"")
            except OSError as exc:
                raise OSError(f"the usage log {str(self.log_path)!r} cannot be written: {exc}") from exc

    def add(self, record: UsageRecord) -> None:
        line = (record.model_dump_json() + "\n").encode() if self.log_path is not None else b""
        with self._lock:
            self._records.append(record)
            if self.log_path is not None:
                try:
                    _append_line(self.log_path, line)
                except OSError:
                    # The call itself succeeded and may have been paid for: losing its result over a full
                    # disk would be worse than a gap in the log, which this error makes loud.
                    log.exception("could not append to the usage log %s", self.log_path)
        for active in _ACTIVE_METERS.get():
            active.add(record)

    @property
    def records(self) -> list[UsageRecord]:
        """A copy of the records so far, oldest first."""
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def clear(self) -> None:
        """Forget the records kept in memory (the JSONL log keeps its lines)."""
        with self._lock:
            self._records.clear()

    def frame(self) -> pd.DataFrame:
        return usage_records_frame(self.records)


_ACTIVE_METERS: ContextVar[tuple[Meter, ...]] = ContextVar("llamakit_active_meters", default=())


class Meter:
    """Collects the usage records of the calls made inside a `with meter():` (or `async with`) block.

    "Inside" follows the context: asyncio tasks and `asyncio.to_thread` started in the block count, as
    do `generate_many`'s workers; a thread you start yourself counts if it runs in a copy of the context
    (`contextvars.copy_context().run`). Blocks nest: a call is seen by every meter around it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[UsageRecord] = []
        self._tokens: list[Token[tuple[Meter, ...]]] = []

    def __enter__(self) -> Meter:
        self._tokens.append(_ACTIVE_METERS.set((*_ACTIVE_METERS.get(), self)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _ACTIVE_METERS.reset(self._tokens.pop())

    async def __aenter__(self) -> Meter:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def add(self, record: UsageRecord) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[UsageRecord]:
        with self._lock:
            return list(self._records)

    @property
    def calls(self) -> int:
        return len(self.records)

    @property
    def errors(self) -> int:
        return sum(r.status == "error" for r in self.records)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens or 0 for r in self.records)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the nodes found in their prompt caches (they are in `prompt_tokens` too)."""
        return sum(r.cached_tokens or 0 for r in self.records)

    @property
    def cache_discount_credits(self) -> int:
        """Credits the cached prompt tokens' own fee took off the calls' cost."""
        return sum(r.cache_discount_credits or 0 for r in self.records)

    @property
    def cache_discount(self) -> Decimal:
        """The same as a price in `currency`: an exact sum (ValueError across several currencies, as `cost`)."""
        records = self.records
        _one_currency(records)
        return sum((r.cache_discount for r in records if r.cache_discount is not None), Decimal(0))

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.records)

    @property
    def total_tokens(self) -> int:
        return sum(r.total_tokens or 0 for r in self.records)

    @property
    def cost_credits(self) -> int:
        """Credits charged for the calls whose charge is known (a stream cut short is charged unseen)."""
        return sum(r.cost_credits or 0 for r in self.records)

    @property
    def currency(self) -> str | None:
        """The currency of the calls' prices (None before any priced call); ValueError if there are several."""
        return _one_currency(self.records)

    @property
    def cost(self) -> Decimal:
        """The price of the calls whose price is known, in `currency`: an exact sum of exact decimals.
        ValueError if the calls were priced in several currencies (routers of different operators)."""
        records = self.records
        _one_currency(records)  # prices in different currencies do not add up
        return sum((r.cost for r in records if r.cost is not None), Decimal(0))

    def frame(self) -> pd.DataFrame:
        return usage_records_frame(self.records)

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        try:
            currency = self.currency
        except ValueError:  # priced in several currencies: the credits alone
            currency = None
        price = f" ({format_price(self.cost)} {currency})" if currency is not None else ""
        saved = f" · {self.cache_discount_credits} credits saved by the cache" if self.cache_discount_credits else ""
        return (
            f"{self.calls} calls ({self.errors} failed) · {self.prompt_tokens} prompt{cached} + "
            f"{self.completion_tokens} completion = {self.total_tokens} tokens · {self.cost_credits} credits{price}"
            f"{saved}"
        )

    def __repr__(self) -> str:
        return f"<Meter {self.summary()}>"

    def _repr_html_(self) -> str:
        return f"<b>llamakit meter</b>: {html.escape(self.summary())}"


def _one_currency(records: list[UsageRecord]) -> str | None:
    currencies = {r.currency for r in records if r.cost is not None and r.currency is not None}
    if len(currencies) > 1:
        raise ValueError(f"the calls were priced in {', '.join(sorted(currencies))}: see frame() per currency")
    return next(iter(currencies), None)


def meter() -> Meter:
    """A fresh `Meter`: `with meter() as m: …` then `m.cost` (the price), `m.cost_credits`, `m.total_tokens`,
    `m.frame()`."""
    return Meter()


def utc_now() -> datetime:
    return datetime.now(UTC)
