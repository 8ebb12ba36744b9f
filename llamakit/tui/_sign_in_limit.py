"""How many wrong admin keys the served dashboard takes from one client address: at most `max_failures` in any
`window` seconds, then none (not even the right one) until the oldest of them is `window` seconds old.

The rule is stated for operators in docs/security.md#guarantees-each-has-a-test. State is a few floats per
address that failed lately, in a map bounded in size (the least recently failing address goes first) and in
time (an address whose last failure is older than the window is forgotten).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_ADDRESSES", "MAX_FAILURES", "WINDOW_SECONDS", "SignInLimit", "client_address"]

MAX_FAILURES: Final = 10  # wrong keys an address may send in any window
WINDOW_SECONDS: Final = 300.0
MAX_ADDRESSES: Final = 10_000  # addresses remembered at once (about 2 MB at 10 failures each)


class SignInLimit:
    """Wrong admin keys by client address (`client_address`), at most `max_failures` in any `window` seconds.

    `retry_after(address)` is 0 while the address may try a key, else the seconds (> 0) until it may;
    `failed(address)` counts a wrong key. `clock` gives seconds (time.monotonic; a test passes its own).
    ValueError for `max_failures` < 1, `window` ≤ 0 or `max_addresses` < 1."""

    def __init__(
        self,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW_SECONDS,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or not window > 0 or max_addresses < 1:
            raise ValueError(
                "the sign-in limit needs at least 1 failure, a window over 0 seconds and room for 1 address"
            )
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self.clock = clock
        # When each address's latest wrong keys came, the address that failed least recently first.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """Addresses remembered now."""
        return len(self._failures)

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try a key again: 0 when it may now."""
        now = self.clock()
        self._forget_before(now - self.window)
        times = self._failures.get(address)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(times[0] + self.window - now, 0.0)

    def failed(self, address: str) -> float:
        """Count a wrong key from `address`; returns `retry_after(address)` after it (> 0: it is now locked out)."""
        now = self.clock()
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self.max_failures)  # older ones no longer decide anything
        times.append(now)
        self._failures[address] = times  # now the most recent
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return self.retry_after(address)

    def _forget_before(self, start: float) -> None:
        """Forget the addresses whose last wrong key came before `start`: none of their failures counts now."""
        failures = self._failures
        while failures:
            oldest = next(iter(failures.values()))
            if oldest[-1] > start:
                break
            failures.popitem(last=False)


def client_address(remote: str | None) -> str:
    """What the limit counts by, for a peer address: an IPv4 address as it is (an IPv4-mapped IPv6 one too), an
    IPv6 address by its /64 network (one host usually has a whole /64), anything else as it is."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])  # less an IPv6 zone (`fe80::1%eth0`)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
