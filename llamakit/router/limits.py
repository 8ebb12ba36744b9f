"""Who asks, and what their API key lets them do: authentication through a short-lived cache, then the key's
expiry, allowed models, and rate and concurrency limits, all checked before anything is held or queued.

The spend caps are not here: the ledger checks them in the hold's own transaction (`ledger._keys`).

Rates are counted by each router process on its own: with several routers on one database (`--cluster`), a
key can make up to `routers ×` its `rpm_limit`, `tpm_limit` and `max_parallel_requests` when its requests
are spread over all of them. Its spend caps hold exactly, whichever router the requests reach. A limit
changed at one router reaches the others within KEY_CACHE_SECONDS.
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Final

from llamakit.router.ledger import KEY_LIMIT_FIELDS, Account, ApiKey, KeyLimits, hash_key, key_name
from llamakit.wire.errors import ApiError

__all__ = [
    "KEY_CACHE_SECONDS",
    "UNLIMITED",
    "WINDOW_SECONDS",
    "Admission",
    "Caller",
    "KeyCache",
    "KeyRates",
    "key_limits",
    "key_name_of",
    "key_view",
]

# How long a router trusts what it read of a key: long enough that a busy key costs no database read per
# request, short enough that a key revoked or limited at another router stops within it.
KEY_CACHE_SECONDS: Final = 5.0
# The window of `rpm_limit` and `tpm_limit`: any 60 seconds, sliding (not the calendar minute).
WINDOW_SECONDS: Final = 60.0


@dataclass(frozen=True)
class Caller:
    """The account a request is paid from, and the API key it came with (`key_hash`: its SHA-256)."""

    account: Account
    key_hash: str
    key: ApiKey

    @property
    def limits(self) -> KeyLimits:
        return self.key.limits


class KeyCache:
    """Callers by key hash, each trusted for KEY_CACHE_SECONDS, so that a request costs no database read.

    Only who the caller is and the key's limits are used from it, never money: the ledger checks the balance
    and the spend caps in the hold's own transaction. Revoking a key or changing its limits at this router
    clears the cache.
    """

    def __init__(self, limit: int = 10_000, *, ttl: float = KEY_CACHE_SECONDS) -> None:
        self._callers: dict[str, tuple[Caller, float]] = {}
        self._limit = limit
        self._ttl = ttl

    def get(self, api_key: str, now: float) -> Caller | None:
        found = self._callers.get(hash_key(api_key))
        if found is None or now - found[1] > self._ttl:
            return None
        return found[0]

    def put(self, caller: Caller, now: float) -> None:
        if len(self._callers) >= self._limit:
            self._callers.clear()
        self._callers[caller.key_hash] = (caller, now)

    def clear(self) -> None:
        self._callers.clear()


@dataclass
class _KeyWindow:
    requests: deque[float] = field(default_factory=deque)  # when each request of the window was admitted
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # when each request finished, its tokens
    token_sum: int = 0
    in_flight: int = 0
    reserved: int = 0  # the most the requests in flight may use (prompt bound + max_tokens), until they finish

    def slide(self, now: float) -> None:
        start = now - WINDOW_SECONDS
        while self.requests and self.requests[0] <= start:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= start:
            self.token_sum -= self.tokens.popleft()[1]

    @property
    def idle(self) -> bool:
        return not self.requests and not self.tokens and not self.in_flight


class Admission:
    """A request let in under its key's rate limits; `finish` it once, with the tokens it used, or `cancel` it
    when it was refused before anything was done (then it counts towards no limit)."""

    def __init__(
        self, rates: KeyRates | None, key_hash: str, window: _KeyWindow | None, at: float = 0.0, reserved: int = 0
    ) -> None:
        self._rates = rates
        self._key_hash = key_hash
        self._window = window
        self._at = at  # when it was admitted: its entry in the window's requests
        self._reserved = reserved  # counted against tpm_limit while it runs
        self._finished = False

    def finish(self, tokens: int = 0) -> None:
        if self._finished or self._window is None or self._rates is None:
            return
        self._finished = True
        self._window.in_flight -= 1
        self._window.reserved -= self._reserved
        if tokens > 0:
            self._window.tokens.append((time.monotonic(), tokens))
            self._window.token_sum += tokens
        self._rates.forget_idle(self._key_hash)

    def cancel(self) -> None:
        if self._window is not None and not self._finished:
            with suppress(ValueError):  # already out of the window
                self._window.requests.remove(self._at)
        self.finish()


# For keys without rate limits: nothing to count, nothing to finish.
UNLIMITED: Final = Admission(None, "", None)


class KeyRates:
    """Per key, in this router: requests admitted and tokens used in the last WINDOW_SECONDS, and requests in
    flight. Only keys with a rate or concurrency limit are counted; the others cost nothing here.

    A key's batch lines (`batch=True`) are counted apart from its interactive requests, under the same limits,
    as OpenAI counts batch usage against limits of its own: a batch never takes a request or a token from the
    key's interactive minute, and runs no faster than the key may (docs/money.md#batches)."""

    def __init__(self) -> None:
        self._windows: dict[str, _KeyWindow] = {}

    def admit(self, caller: Caller, tokens: int = 0, *, batch: bool = False) -> Admission:
        """Let the request in, or raise 429 naming the limit it is over, with Retry-After (seconds). `tokens` is
        the most the request may use (its prompt's bound and max_tokens): it counts against tpm_limit while the
        request runs, and what it used once it ends, as OpenAI counts max_tokens at request time. Otherwise
        requests sent together would all be let in before any had used a token. `batch`: a batch line, counted
        in the key's batch window (see the class)."""
        limits = caller.limits
        if not limits.rate_limited:
            return UNLIMITED
        now = time.monotonic()
        name = _window_name(caller.key_hash, batch=batch)
        window = self._windows.setdefault(name, _KeyWindow())
        window.slide(now)
        if limits.max_parallel_requests is not None and window.in_flight >= limits.max_parallel_requests:
            raise _over(
                f"this API key may have {limits.max_parallel_requests} request(s) in flight at once "
                f"(max_parallel_requests), and has {window.in_flight}",
                "max_parallel_requests", limits.max_parallel_requests, retry_after=1,
            )  # fmt: skip
        if limits.rpm_limit is not None and len(window.requests) >= limits.rpm_limit:
            # The window has room again once enough of its oldest requests have left it.
            frees_at = window.requests[len(window.requests) - limits.rpm_limit] + WINDOW_SECONDS
            raise _over(
                f"this API key may make {limits.rpm_limit} requests per minute (rpm_limit) and has made "
                f"{len(window.requests)} in the last 60 s",
                "rpm_limit", limits.rpm_limit, retry_after=frees_at - now,
            )  # fmt: skip
        if limits.tpm_limit is not None and window.token_sum + window.reserved >= limits.tpm_limit:
            left, frees_at = window.token_sum, now + 1  # the requests in flight: they may end within a second
            for finished, used in window.tokens if window.reserved < limits.tpm_limit else ():
                if left + window.reserved < limits.tpm_limit:
                    break
                left, frees_at = left - used, finished + WINDOW_SECONDS
            in_flight = f", and {window.reserved} more may be used by its requests in flight" if window.reserved else ""
            raise _over(
                f"this API key may use {limits.tpm_limit} tokens per minute (tpm_limit) and has used "
                f"{window.token_sum} in the last 60 s{in_flight}",
                "tpm_limit", limits.tpm_limit, retry_after=frees_at - now,
            )  # fmt: skip
        window.requests.append(now)
        window.in_flight += 1
        reserved = max(tokens, 0) if limits.tpm_limit is not None else 0
        window.reserved += reserved
        return Admission(self, name, window, now, reserved)

    def room(self, caller: Caller, *, batch: bool = False) -> int | None:
        """How many more requests `admit` would let in now (0: none until requests end or leave the window);
        None when no count limits them: no rpm_limit nor max_parallel_requests, and tokens left under tpm_limit
        (each request let in then reserves its own, so a few of them may still be refused)."""
        limits = caller.limits
        if not limits.rate_limited:
            return None
        window = self._windows.get(_window_name(caller.key_hash, batch=batch))
        if window is None:
            window = _KeyWindow()
        else:
            window.slide(time.monotonic())
        free: list[int] = []
        if limits.max_parallel_requests is not None:
            free.append(limits.max_parallel_requests - window.in_flight)
        if limits.rpm_limit is not None:
            free.append(limits.rpm_limit - len(window.requests))
        if limits.tpm_limit is not None and window.token_sum + window.reserved >= limits.tpm_limit:
            free.append(0)
        return max(0, min(free)) if free else None

    def use(self, key_hash: str) -> dict[str, int]:
        """What this router counts for the key now: requests and tokens in the last 60 s, requests in flight."""
        window = self._windows.get(key_hash)
        if window is None:
            return {"requests_last_minute": 0, "tokens_last_minute": 0, "requests_in_flight": 0}
        window.slide(time.monotonic())
        return {
            "requests_last_minute": len(window.requests),
            "tokens_last_minute": window.token_sum,
            "requests_in_flight": window.in_flight,
        }

    def forget_idle(self, key_hash: str) -> None:
        window = self._windows.get(key_hash)
        if window is not None:
            window.slide(time.monotonic())
            if window.idle:
                del self._windows[key_hash]


def _window_name(key_hash: str, *, batch: bool) -> str:
    return f"batch:{key_hash}" if batch else key_hash


def _over(message: str, limit: str, value: int, *, retry_after: float) -> ApiError:
    seconds = max(1, math.ceil(retry_after))
    return ApiError(
        429,
        f"{message}; try again in {seconds} s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
        extra={"limit": limit, "limit_value": value, "retry_after": seconds},
    )


def key_limits(data: object, *, base: KeyLimits | None = None) -> KeyLimits:
    """Limits from a request body's JSON object (None: none; with `base`, a change to it where null removes
    a limit); 400 naming the field that is wrong. The fields are KeyLimits'; `expires_at` in epoch seconds."""
    if data is None:
        return base or KeyLimits()
    if not isinstance(data, dict):
        raise ApiError(400, f"'limits' must be a JSON object of {', '.join(KEY_LIMIT_FIELDS)}", param="limits")
    try:
        return KeyLimits.from_dict(data, base=base)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="limits") from exc


def key_name_of(data: object) -> str | None:
    """A key's name from a request body (stripped; null or blank: none); 400 saying what is wrong with it."""
    try:
        return key_name(data)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="name") from exc


def key_view(caller_key: ApiKey, rates: dict[str, int] | None) -> dict[str, Any]:
    """A key as its holder and the operator see it: prefix, name, state, limits, spend so far and (with
    `rates`) what the router counts towards its rate limits. Credits for money, epoch seconds for times."""
    key = caller_key
    use = key.use
    limits = key.limits
    return {
        "prefix": key.prefix,
        "name": key.name,
        "created": key.created,
        "revoked": key.revoked,
        "active": key.active,
        "expired": limits.expired(time.time()),
        "limits": limits.to_dict(),
        "spend": {
            "total": use.spent,
            "today": use.spent_day,
            "this_month": use.spent_month,
            "held": use.held,
        },
        "remaining": {
            "total": None if limits.spend_cap is None else max(0, limits.spend_cap - use.spent - use.held),
            "today": None if limits.spend_cap_day is None else max(0, limits.spend_cap_day - use.spent_day - use.held),
            "this_month": None
            if limits.spend_cap_month is None
            else max(0, limits.spend_cap_month - use.spent_month - use.held),
        },
        **({"rates": rates} if rates is not None else {}),
    }
