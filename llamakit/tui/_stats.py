"""The router's stats snapshot as typed, read-only values, parsed leniently from `GET /admin/stats` JSON.

The dashboard must keep working while the router grows new fields, so unknown fields are ignored and a
missing or mistyped field reads as empty rather than failing the whole snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamakit.money.currency import CreditValue, parse_credit_value, parse_currency

__all__ = [
    "AccountStats",
    "AgentStats",
    "AuditStats",
    "BatchProgress",
    "BatchStats",
    "BucketSeries",
    "Counts",
    "FeeStats",
    "KeyStats",
    "ModelQueue",
    "NodeStats",
    "QueueStats",
    "RefusalStats",
    "RequestRecord",
    "RequestStats",
    "SpendStats",
    "Stats",
    "StatsHistory",
]


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _float(value: object, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _optional_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _optional_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _str(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _bid(value: object) -> str:
    """The bid exactly as the router wrote it (a string such as "1.005"); a number is shown as it reads."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return f"{value:g}"


@dataclass(frozen=True, slots=True)
class NodeStats:
    """One node of the herd as the router sees it."""

    id: str
    name: str
    url: str
    models: tuple[str, ...]
    state: str
    slots: int
    busy: int
    tokens_per_second: float
    requests: int
    fees_earned: int
    last_seen: float | None

    @property
    def shown_state(self) -> str:
        """The router's state, with `busy` for a ready node that has no free slot (it takes nothing new now)."""
        if self.state == "ready" and self.slots > 0 and self.busy >= self.slots:
            return "busy"
        return self.state

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeStats:
        name = _str(data.get("name")) or _str(data.get("id"), "?")
        return cls(
            id=_str(data.get("id")) or name,
            name=name,
            url=_str(data.get("url")),
            models=tuple(m for m in _list(data.get("models")) if isinstance(m, str)),
            state=_str(data.get("state"), "unknown"),
            slots=_int(data.get("slots")),
            busy=_int(data.get("busy")),
            tokens_per_second=_float(data.get("tokens_per_second")),
            requests=_int(data.get("requests")),
            fees_earned=_int(data.get("fees_earned")),
            last_seen=_optional_float(data.get("last_seen")),
        )


@dataclass(frozen=True, slots=True)
class ModelQueue:
    depth: int
    oldest_wait: float


@dataclass(frozen=True, slots=True)
class QueueStats:
    total: int
    last_multiplier: float
    last_multiplier_text: str
    """Exactly as the router prices it (a bid of 1.005 must not read as 1.00)."""
    models: Mapping[str, ModelQueue]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QueueStats:
        models = {
            str(name): ModelQueue(
                depth=_int(_mapping(q).get("depth")), oldest_wait=_float(_mapping(q).get("oldest_wait"))
            )
            for name, q in _mapping(data.get("models")).items()
        }
        multiplier = _float(data.get("last_multiplier"), 1.0)
        return cls(
            total=_int(data.get("total")),
            last_multiplier=multiplier,
            last_multiplier_text=_str(data.get("last_multiplier_exact")) or f"{multiplier:g}",
            models=dict(sorted(models.items())),
        )


@dataclass(frozen=True, slots=True)
class FeeStats:
    earned: int
    per_minute: float
    by_node: Mapping[str, int]
    cached_tokens: int = 0
    """Prompt tokens the nodes read from their caches, herd-wide (0 from a router that does not say)."""
    cache_discount: int = 0
    """Credits the cached prompt tokens' own fee took off the charges."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeeStats:
        return cls(
            earned=_int(data.get("earned")),
            per_minute=_float(data.get("per_minute")),
            by_node={str(k): _int(v) for k, v in _mapping(data.get("by_node")).items()},
            cached_tokens=_int(data.get("cached_tokens")),
            cache_discount=_int(data.get("cache_discount")),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished request from the router's recent log."""

    time: float
    request_id: str
    account: str
    model: str
    node: str | None
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_credits: int
    latency_ms: float | None
    bid: str = ""
    """The multiplier bid, as the router wrote it; empty from a router that does not report it."""
    queue_ms: float | None = None
    ttft_ms: float | None = None
    """Time to the first token: streams only."""
    http_status: int | None = None
    """Set only on refused requests (400, 402, 404, 429), whose `status` is then the error code."""
    user: str | None = None

    @property
    def refused(self) -> bool:
        return self.http_status is not None and self.http_status >= 400

    @property
    def key(self) -> str:
        return self.request_id or f"{self.time:.6f}:{self.account}:{self.model}"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestRecord:
        node = data.get("node")
        return cls(
            time=_float(data.get("time")),
            request_id=_str(data.get("request_id")),
            account=_str(data.get("account"), "?"),
            model=_str(data.get("model"), "?"),
            node=node if isinstance(node, str) else None,
            status=_str(data.get("status"), "?"),
            prompt_tokens=_int(data.get("prompt_tokens")),
            completion_tokens=_int(data.get("completion_tokens")),
            # An older router's `cost` was the credits; a newer one's is their price, and it sends both.
            cost_credits=_int(data.get("cost_credits", data.get("cost"))),
            latency_ms=_optional_float(data.get("latency_ms")),
            bid=_bid(data.get("bid")),
            queue_ms=_optional_float(data.get("queue_ms")),
            ttft_ms=_optional_float(data.get("ttft_ms")),
            http_status=_optional_int(data.get("http_status")),
            user=_str(data.get("user")) or None,
        )


@dataclass(frozen=True, slots=True)
class RequestStats:
    total: int
    by_status: Mapping[str, int]
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    recent: tuple[RequestRecord, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestStats:
        latency = _mapping(data.get("latency_ms"))
        by_status = {str(k): _int(v) for k, v in _mapping(data.get("by_status")).items()}
        return cls(
            total=_int(data.get("total"), sum(by_status.values())),
            by_status=by_status,
            p50_ms=_optional_float(latency.get("p50")),
            p90_ms=_optional_float(latency.get("p90")),
            p99_ms=_optional_float(latency.get("p99")),
            recent=tuple(RequestRecord.from_json(r) for r in _list(data.get("recent")) if isinstance(r, Mapping)),
        )


@dataclass(frozen=True, slots=True)
class AgentStats:
    """One agent account's outcome events: buy, skip and error (one per paid grade), and request if it counts those."""

    account: str
    counts: Mapping[str, int]
    total: int
    position: float | None
    pnl: float | None
    last: float | None

    @property
    def requests(self) -> int:
        """The agent's `request` events if it reports them, else its outcomes: each outcome is one paid grade."""
        return self.counts.get("request", self.buys + self.skips + self.errors)

    @property
    def buys(self) -> int:
        return self.counts.get("buy", 0)

    @property
    def skips(self) -> int:
        return self.counts.get("skip", 0)

    @property
    def errors(self) -> int:
        return self.counts.get("error", 0)

    @classmethod
    def from_json(cls, account: str, data: Mapping[str, Any]) -> AgentStats:
        counts = {str(k): _int(v) for k, v in _mapping(data.get("counts")).items()}
        return cls(
            account=account,
            counts=counts,
            total=_int(data.get("total"), sum(counts.values())),
            position=_optional_float(data.get("position")),
            pnl=_optional_float(data.get("pnl")),
            last=_optional_float(data.get("last")),
        )


@dataclass(frozen=True, slots=True)
class AccountStats:
    """One account: money now (balance, and credits held for requests in flight), and what it did today (UTC)."""

    id: str
    name: str
    kind: str
    balance: int
    held: int
    spent: int
    requests: int
    """Today's requests, refused ones included."""
    refusals: int
    last_seen: float | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AccountStats:
        raw_id = data.get("id")
        name = _str(data.get("name")) or (str(raw_id) if raw_id is not None else "?")
        return cls(
            id=str(raw_id) if isinstance(raw_id, int | str) and not isinstance(raw_id, bool) else name,
            name=name,
            kind=_str(data.get("kind")),
            balance=_int(data.get("balance")),
            held=_int(data.get("held")),
            spent=_int(data.get("spent")),
            requests=_int(data.get("requests")),
            refusals=_int(data.get("refusals")),
            last_seen=_optional_float(data.get("last_seen")),
        )


@dataclass(frozen=True, slots=True)
class SpendStats:
    """A key's spend in one period (credits) against its cap there (None: no cap)."""

    spent: int
    cap: int | None

    @property
    def share(self) -> float | None:
        """How much of the cap is used (1.0 at the cap), or None without a cap."""
        if self.cap is None:
            return None
        return 1.0 if self.cap <= 0 else self.spent / self.cap


@dataclass(frozen=True, slots=True)
class KeyStats:
    """One API key with a limit: whose, its name, its state, its spend against its caps (open holds count as
    spent, as the router counts them), its rate limits, expiry and models."""

    account: str
    prefix: str
    name: str | None
    """The operator's label for the key, or None (and from a router that keeps no names)."""
    state: str
    """active, expired or revoked."""
    today: SpendStats
    month: SpendStats
    total: SpendStats
    rpm_limit: int | None
    tpm_limit: int | None
    max_parallel_requests: int | None
    expires_at: float | None
    models: tuple[str, ...] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyStats:
        limits, spend = _mapping(data.get("limits")), _mapping(data.get("spend"))
        held = _int(spend.get("held"))
        models = limits.get("models")
        state = "active" if data.get("active", True) else "revoked"
        if state == "active" and data.get("expired"):
            state = "expired"
        return cls(
            account=_str(data.get("account"), "?"),
            prefix=_str(data.get("prefix"), "?"),
            name=data.get("name") if isinstance(data.get("name"), str) else None,
            state=state,
            today=SpendStats(_int(spend.get("today")) + held, _optional_int(limits.get("spend_cap_day"))),
            month=SpendStats(_int(spend.get("this_month")) + held, _optional_int(limits.get("spend_cap_month"))),
            total=SpendStats(_int(spend.get("total")) + held, _optional_int(limits.get("spend_cap"))),
            rpm_limit=_optional_int(limits.get("rpm_limit")),
            tpm_limit=_optional_int(limits.get("tpm_limit")),
            max_parallel_requests=_optional_int(limits.get("max_parallel_requests")),
            expires_at=_optional_float(limits.get("expires_at")),
            models=tuple(str(m) for m in models) if isinstance(models, list) else None,
        )


@dataclass(frozen=True, slots=True)
class RefusalStats:
    """Refused requests: `today` across the ledger (since midnight UTC), `by_code` this router's since it started."""

    today: int
    by_code: Mapping[str, int]
    http_status: Mapping[str, int] = field(default_factory=dict)  # by code; empty from a router that omits it

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RefusalStats:
        by_code = {str(k): _int(v) for k, v in _mapping(data.get("by_status")).items()}
        statuses = {str(k): _int(v) for k, v in _mapping(data.get("http_status")).items()}
        return cls(
            today=_int(data.get("today")),
            by_code=dict(sorted(by_code.items(), key=lambda item: (-item[1], item[0]))),
            http_status={code: status for code, status in statuses.items() if 400 <= status <= 599},
        )


@dataclass(frozen=True, slots=True)
class AuditStats:
    """What the router's last audit of the books found: `ok` False is an alarm (a running total disagrees with the
    history), None before one has run."""

    ok: bool | None
    count: int
    checked: float | None
    first: str | None
    """The first discrepancy, as a sentence, or None."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditStats:
        ok = data.get("ok")
        found = [d for d in _list(data.get("discrepancies")) if isinstance(d, Mapping)]
        first = None
        if found:
            d = found[0]
            first = f"{_str(d.get('what'), '?')}: kept {_int(d.get('kept')):,}, counted {_int(d.get('counted')):,}"
        return cls(
            ok=ok if isinstance(ok, bool) else None,
            count=_int(data.get("count"), len(found)),
            checked=_optional_float(data.get("checked")),
            first=first,
        )


@dataclass(frozen=True, slots=True)
class Counts:
    """How many there are in all, against how many the snapshot carries (the dashboard pages through the rest)."""

    accounts: int
    accounts_shown: int
    nodes: int
    nodes_shown: int
    keys_shown: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counts:
        return cls(
            accounts=_int(data.get("accounts")),
            accounts_shown=_int(data.get("accounts_shown")),
            nodes=_int(data.get("nodes")),
            nodes_shown=_int(data.get("nodes_shown")),
            keys_shown=_int(data.get("keys_shown")),
        )


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """One open batch: its account, status and lines done of `total`."""

    id: str
    account: str
    status: str
    total: int
    completed: int
    failed: int

    @property
    def done(self) -> int:
        return self.completed + self.failed


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Batches at work, herd-wide: how many are open, their lines pending and running, the oldest few."""

    open: int
    pending: int
    running: int
    shown: tuple[BatchProgress, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchStats:
        lines = _mapping(data.get("lines"))
        shown = tuple(
            BatchProgress(
                id=_str(b.get("id")),
                account=_str(b.get("account")),
                status=_str(b.get("status")),
                total=_int(b.get("total")),
                completed=_int(b.get("completed")),
                failed=_int(b.get("failed")),
            )
            for b in _list(data.get("shown"))
            if isinstance(b, Mapping)
        )
        return cls(
            open=sum(_int(n) for n in _mapping(data.get("open")).values()),
            pending=_int(lines.get("pending")),
            running=_int(lines.get("running")),
            shown=shown,
        )


@dataclass(frozen=True, slots=True)
class Stats:
    """One snapshot of the router; `time` is the router's clock, used as "now" for every age shown."""

    time: float
    uptime: float
    nodes: tuple[NodeStats, ...]
    queue: QueueStats
    fees: FeeStats
    requests: RequestStats
    agents: tuple[AgentStats, ...]
    books_balanced: bool | None
    accounts: tuple[AccountStats, ...] | None = None
    """None from a router that does not report accounts (older than the accounts panel)."""
    refusals: RefusalStats | None = None
    """None from a router that does not report refusals."""
    keys: tuple[KeyStats, ...] | None = None
    """The keys that have a limit; None from a router that does not report them."""
    money: CreditValue | None = None
    """What a credit is worth in the operator's currency; None from a router that does not say."""
    audit: AuditStats | None = None
    """The last audit of the books; None from a router that does not audit them."""
    counts: Counts | None = None
    """How many accounts and nodes there are in all; None from a router whose snapshot carries every one."""
    batches: BatchStats | None = None
    """Batches at work; None from a router that runs none."""

    @classmethod
    def from_json(cls, data: object) -> Stats:
        """Parse a snapshot; raises ValueError when `data` is not a JSON object at all."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a stats snapshot is a JSON object, got {type(data).__name__}")
        books = data.get("books")
        balanced = _mapping(books).get("balanced")
        accounts = None
        if isinstance(data.get("accounts"), list):
            accounts = tuple(AccountStats.from_json(a) for a in data["accounts"] if isinstance(a, Mapping))
        refusals = data.get("refusals")
        keys = None
        if isinstance(data.get("keys"), list):
            keys = tuple(KeyStats.from_json(k) for k in data["keys"] if isinstance(k, Mapping))
        return cls(
            time=_float(data.get("time")),
            uptime=_float(data.get("uptime")),
            nodes=tuple(NodeStats.from_json(n) for n in _list(data.get("nodes")) if isinstance(n, Mapping)),
            queue=QueueStats.from_json(_mapping(data.get("queue"))),
            fees=FeeStats.from_json(_mapping(data.get("fees"))),
            requests=RequestStats.from_json(_mapping(data.get("requests"))),
            agents=tuple(
                AgentStats.from_json(str(name), _mapping(entry))
                for name, entry in sorted(_mapping(data.get("agents")).items())
            ),
            books_balanced=balanced if isinstance(balanced, bool) else None,
            accounts=accounts,
            refusals=RefusalStats.from_json(refusals) if isinstance(refusals, Mapping) else None,
            keys=keys,
            money=_money(data),
            audit=AuditStats.from_json(books["audit"])
            if isinstance(books, Mapping) and isinstance(books.get("audit"), Mapping)
            else None,
            counts=Counts.from_json(data["counts"]) if isinstance(data.get("counts"), Mapping) else None,
            batches=BatchStats.from_json(data["batches"]) if isinstance(data.get("batches"), Mapping) else None,
        )


def _money(data: Mapping[str, Any]) -> CreditValue | None:
    """The snapshot's credit value and currency, or None when it has none (or none that makes sense)."""
    value = data.get("credit_value_exact", data.get("credit_value"))
    try:
        return CreditValue(parse_credit_value(value), parse_currency(data.get("currency")))
    except ValueError:
        return None


@dataclass
class BucketSeries:
    """A value over the last `window` seconds in buckets of `step` seconds (the largest value seen per bucket).

    Buckets with no sample read as 0, so a sparkline of it always spans the same stretch of time.
    """

    window: float = 300.0
    step: float = 10.0
    _buckets: deque[tuple[int, float]] = field(default_factory=deque)

    @property
    def size(self) -> int:
        return max(1, int(self.window // self.step))

    def add(self, at: float, value: float) -> None:
        index = int(at // self.step)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1] = (index, max(self._buckets[-1][1], value))
        elif not self._buckets or self._buckets[-1][0] < index:
            self._buckets.append((index, value))
        else:  # a sample older than the newest bucket (a clock step back): start afresh rather than misplot
            self._buckets.clear()
            self._buckets.append((index, value))
        while self._buckets and self._buckets[0][0] <= index - self.size:
            self._buckets.popleft()

    def values(self, now: float | None = None) -> list[float]:
        """The `size` buckets ending at `now` (default: the newest sample), oldest first."""
        if not self._buckets:
            return [0.0] * self.size
        newest = self._buckets[-1][0] if now is None else int(now // self.step)
        by_index = dict(self._buckets)
        return [by_index.get(i, 0.0) for i in range(newest - self.size + 1, newest + 1)]


@dataclass
class StatsHistory:
    """What the sparklines show: queue depth per model and the fee rate, over the last minutes."""

    window: float = 300.0
    step: float = 10.0
    queue: dict[str, BucketSeries] = field(default_factory=dict)
    fees: BucketSeries = field(init=False)
    latest: float | None = None

    def __post_init__(self) -> None:
        self.fees = BucketSeries(self.window, self.step)

    def add(self, stats: Stats) -> None:
        for model, queue in stats.queue.models.items():
            series = self.queue.get(model)
            if series is None:
                series = self.queue[model] = BucketSeries(self.window, self.step)
            series.add(stats.time, queue.depth)
        self.fees.add(stats.time, stats.fees.per_minute)
        self.latest = stats.time

    def queue_values(self, model: str) -> list[float]:
        series = self.queue.get(model) or BucketSeries(self.window, self.step)
        return series.values(self.latest)

    def fee_values(self) -> list[float]:
        return self.fees.values(self.latest)
