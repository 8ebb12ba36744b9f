"""When to retry a call and how long to wait: exponential backoff with jitter, or the router's `Retry-After`.

Retrying is only safe because every call carries one idempotency key for all its attempts: the router
answers a repeat of a settled key with the first answer and no new charge.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from typing import Final

import httpx

from llamakit.sdk._exceptions import APIConnectionError, APIError, APIStatusError

__all__ = ["DEFAULT_MAX_RETRIES", "RETRYABLE_STATUSES", "RetryPolicy", "asleep", "retry_after", "sleep"]

DEFAULT_MAX_RETRIES: Final = 2

# 408/429/502/503/504 are "come back later" answers: nothing was generated, nothing charged.
# 409 is the router saying the same idempotency key is still running: the retry gets its settled answer.
# 500 and the 4xx validation errors would fail the same way again, and 402 needs a deposit, not patience.
RETRYABLE_STATUSES: Final = frozenset({408, 409, 429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for attempt n (0-based) is `min(initial_delay × 2ⁿ, max_delay)`, less up to 25 % jitter.

    Jitter spreads out clients that failed together (a router restart) so they do not come back in step.
    A `Retry-After` from the router wins over the backoff when it is at most `max_retry_after` seconds;
    a longer one is not waited for blindly: the backoff is used and the caller sees the error if it persists.
    """

    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
            return retry_after
        backoff = min(self.initial_delay * 2.0**attempt, self.max_delay)
        return backoff * (1 - 0.25 * random.random())

    @staticmethod
    def should_retry(error: APIError) -> bool:
        if isinstance(error, APIStatusError):
            return error.status_code in RETRYABLE_STATUSES
        return isinstance(error, APIConnectionError)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or an HTTP date) or `Retry-After-Ms`; None if absent or bad."""
    millis = response.headers.get("Retry-After-Ms")
    if millis is not None:
        try:
            return float(millis) / 1000
        except ValueError:
            pass
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


# The clients sleep through these module attributes so a test can replace them and check the delays
# without waiting them out.
def sleep(seconds: float) -> None:
    time.sleep(seconds)


async def asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
