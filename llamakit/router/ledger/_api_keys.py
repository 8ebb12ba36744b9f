"""Per-key limits as the ledger keeps them, the use a key has made of its spend caps, and a key's name.

The spend caps are the ledger's to enforce: a hold is refused (SpendCapExceeded) in the same transaction that
would make it when the key's spend in a period, plus what its open holds may still cost, plus the new hold,
would pass the cap. The rate limits (`rpm_limit`, `tpm_limit`, `max_parallel_requests`), the expiry and the
allowed models are only stored here; the router applies them before anything is held (see
`llamakit.router.limits`).

Periods are UTC calendar days and months. A key's spend counts the charges of the holds it made since the
ledger was upgraded to keep it (schema version 6); older keys start at 0.

A key's name is a free-text label for the operator and the key's holder ("ci runner", "alice's laptop"): not
unique, not secret, never used to find a key (schema version 8; older keys have none).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from llamakit.router.ledger._base import MAX_AMOUNT, MAX_NAME_LEN, LedgerError
from llamakit.text import check_name

__all__ = [
    "HAS_LIMITS",
    "KEY_LIMIT_FIELDS",
    "MAX_KEY_NAME_LEN",
    "KeyLimits",
    "KeyUse",
    "SpendCapExceeded",
    "cap_refusal",
    "day_of",
    "key_name",
    "key_use",
    "limit_columns",
    "limits_from_row",
    "month_of",
]

MAX_MODELS: Final = 100
# Requests or tokens a minute, concurrent requests: far above any real limit, far below 64-bit integers.
MAX_RATE: Final = 10**12
# The last second of the year 9999 (UTC): every later time is out of range of Python's datetime.
MAX_EXPIRY: Final = 253_402_300_799.0
MAX_KEY_NAME_LEN: Final = 100


def key_name(value: object) -> str | None:
    """A key's name as the ledger keeps it: stripped of surrounding white space, None for none (None, or only
    white space). ValueError for anything but a string, more than MAX_KEY_NAME_LEN characters, or a control
    character (a line break, a tab, a bidirectional control …) inside it."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"name must be a string (or null for none), got {type(value).__name__}")
    name = value.strip()
    if len(name) > MAX_KEY_NAME_LEN:
        raise ValueError(f"name must be at most {MAX_KEY_NAME_LEN} characters, got {len(name)}")
    return check_name(name) or None  # no line break, tab, escape, bidirectional control …: see llamakit.text


def day_of(now: float) -> str:
    """The UTC day of `now` (epoch seconds), as '2026-11-30': the period of `spend_cap_day`."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def month_of(now: float) -> str:
    """The UTC month of `now` (epoch seconds), as '2026-11': the period of `spend_cap_month`."""
    return time.strftime("%Y-%m", time.gmtime(now))


@dataclass(frozen=True)
class KeyLimits:
    """What one API key may do; None means no limit.

    - `spend_cap`: credits the key may spend over its life; `spend_cap_day`, `spend_cap_month`: per UTC day
      and calendar month. A request is held only if its hold fits under every cap (over one: 402).
    - `rpm_limit`, `tpm_limit`: requests and tokens (prompt plus completion, of finished requests) in any
      60 seconds; `max_parallel_requests`: requests in flight at once (over one: 429 with Retry-After).
    - `expires_at`: epoch seconds after which the key is refused (401).
    - `models`: the models the key may use (another: 403).
    """

    spend_cap: int | None = None
    spend_cap_day: int | None = None
    spend_cap_month: int | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    expires_at: float | None = None
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("spend_cap", "spend_cap_day", "spend_cap_month"):
            _whole(name, getattr(self, name), MAX_AMOUNT, least=0)
        for name in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
            _whole(name, getattr(self, name), MAX_RATE, least=1)
        if self.expires_at is not None and (
            isinstance(self.expires_at, bool)
            or not isinstance(self.expires_at, int | float)
            or not math.isfinite(self.expires_at)
            or not 0 <= self.expires_at <= MAX_EXPIRY
        ):
            raise ValueError(
                f"expires_at must be a time in seconds since the epoch, up to {MAX_EXPIRY:.0f} (the end of the "
                f"year 9999), got {self.expires_at!r}"
            )
        if self.models is not None:
            if isinstance(self.models, str) or not all(isinstance(m, str) and 0 < len(m) <= MAX_NAME_LEN
                                                        for m in self.models):  # fmt: skip
                raise ValueError(f"models must be a list of model names, got {list(self.models)!r}")
            if not self.models:
                raise ValueError("models must name at least one model (null: every model)")
            if len(self.models) > MAX_MODELS:
                raise ValueError(f"models may name at most {MAX_MODELS} models, got {len(self.models)}")
            object.__setattr__(self, "models", tuple(self.models))

    @property
    def rate_limited(self) -> bool:
        """Whether the key has a rate limit (rpm, tpm or requests in flight): only then are its rates counted."""
        return self.rpm_limit is not None or self.tpm_limit is not None or self.max_parallel_requests is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: KeyLimits | None = None) -> KeyLimits:
        """Limits from a JSON object of the fields above (ValueError naming an unknown field or bad value).

        With `base`, only the fields given change: a field set to null removes that limit.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"limits must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(KEY_LIMIT_FIELDS))
        if unknown:
            raise ValueError(f"unknown limit {unknown[0]!r}; the limits are {', '.join(KEY_LIMIT_FIELDS)}")
        values = asdict(base or cls()) | dict(data)
        if isinstance(values["models"], list):
            values["models"] = tuple(values["models"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, None where there is no limit; `models` as a list."""
        data = asdict(self)
        data["models"] = None if self.models is None else list(self.models)
        return data

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


KEY_LIMIT_FIELDS: Final = tuple(f.name for f in fields(KeyLimits))


# The rows of keys that have any limit (in SQL, over `api_keys`).
HAS_LIMITS: Final = "(" + " OR ".join(f"{name} IS NOT NULL" for name in KEY_LIMIT_FIELDS) + ")"


def limits_from_row(row: Any) -> KeyLimits:
    """The limits stored on an `api_keys` row (a column each; `models` as a JSON list)."""
    models = row["models"]
    return KeyLimits(
        spend_cap=row["spend_cap"],
        spend_cap_day=row["spend_cap_day"],
        spend_cap_month=row["spend_cap_month"],
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        max_parallel_requests=row["max_parallel_requests"],
        expires_at=row["expires_at"],
        models=None if models is None else tuple(json.loads(models)),
    )


def limit_columns(limits: KeyLimits) -> tuple[Any, ...]:
    """The values of the `api_keys` limit columns, in KEY_LIMIT_FIELDS order."""
    models = None if limits.models is None else json.dumps(list(limits.models))
    return (*(getattr(limits, name) for name in KEY_LIMIT_FIELDS[:-1]), models)


@dataclass(frozen=True)
class KeyUse:
    """A key's spend in credits: in all, this UTC day and this UTC month (charges of settled requests), and
    what its open holds keep aside (counted against every cap until they settle)."""

    spent: int = 0
    spent_day: int = 0
    spent_month: int = 0
    held: int = 0


def key_use(row: Any, now: float) -> KeyUse:
    """The use stored on an `api_keys` row, with a day or month that has passed counted as 0."""
    return KeyUse(
        spent=row["spent"],
        spent_day=row["spent_day"] if row["day"] == day_of(now) else 0,
        spent_month=row["spent_month"] if row["month"] == month_of(now) else 0,
        held=row["held"],
    )


class SpendCapExceeded(LedgerError):
    """A hold that would take a key past one of its spend caps; nothing was held.

    `needed` is the hold, `cap` the cap's credits, `period` 'total', 'day' or 'month', `available` what the
    key may still hold under that cap now.
    """

    def __init__(self, *, needed: int, cap: int, period: str, available: int) -> None:
        name = {"total": "spend cap", "day": "daily spend cap", "month": "monthly spend cap"}[period]
        super().__init__(
            f"spend cap reached: the request needs a hold of {needed} credits but this API key's {name} of "
            f"{cap} credits leaves {available}; lower max_tokens or the bid, or ask the operator to raise the cap"
        )
        self.needed = needed
        self.cap = cap
        self.period = period
        self.available = available


def cap_refusal(limits: KeyLimits, use: KeyUse, needed: int) -> SpendCapExceeded | None:
    """The first cap that a hold of `needed` credits would pass, given the key's use; None when it fits."""
    for period, cap, spent in (
        ("total", limits.spend_cap, use.spent),
        ("day", limits.spend_cap_day, use.spent_day),
        ("month", limits.spend_cap_month, use.spent_month),
    ):
        if cap is not None and spent + use.held + needed > cap:
            return SpendCapExceeded(needed=needed, cap=cap, period=period, available=max(0, cap - spent - use.held))
    return None


def _whole(name: str, value: object, most: int, *, least: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number or null, got {value!r}")
    if not least <= value <= most:
        raise ValueError(f"{name} must be {least} to {most}, got {value}")
