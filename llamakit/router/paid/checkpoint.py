"""A running stream's checkpoints: what it has delivered to its client, noted on its hold in the ledger every
--checkpoint-tokens tokens or --checkpoint-ms, whichever comes first, so that a router that dies before it settles
the stream leaves at most that much uncharged (see docs/money.md#a-router-crash).

A checkpoint is queued for the ledger's next group commit and not waited for: the stream goes on at once. It is
considered at each flush of tokens to the client and, when the tokens stop coming (a node that stalls), by a timer
once --checkpoint-ms has passed, so that no delivered token stays uncheckpointed past both bounds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llamakit.router.herd import HerdNode
from llamakit.router.ledger import LedgerError
from llamakit.router.paid.request import PaidRequest
from llamakit.router.state import RouterState
from llamakit.wire.node import TokenCounts

__all__ = ["Checkpoints"]

log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints of one stream of `paid` from `node`."""

    __slots__ = (
        "at",
        "every_seconds",
        "every_tokens",
        "ledger",
        "metric",
        "node",
        "paid",
        "pending",
        "timer",
        "tokens",
    )

    def __init__(self, state: RouterState, paid: PaidRequest, node: HerdNode) -> None:
        self.every_tokens = state.settings.checkpoint_tokens  # 0: none
        self.every_seconds = state.settings.checkpoint_ms / 1000
        self.ledger, self.metric = state.ledger, state.metrics.checkpoints
        self.paid, self.node = paid, node
        self.tokens = 0  # completion tokens at the latest checkpoint
        self.at = time.monotonic()  # when it was made (or the stream began)
        # The latest tokens delivered and not checkpointed, and the timer that looks at them if no flush does.
        self.pending: tuple[TokenCounts, asyncio.Transport | None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def delivered(self, counts: TokenCounts, transport: asyncio.Transport | None) -> None:
        """The stream's tokens so far (`counts`) have been written to the client's connection (`transport`):
        checkpoint them when `every_tokens` more have gone since the latest checkpoint, or `every_seconds` have
        passed since it.

        Only once the connection has handed every byte to the kernel, which sends them even if this process dies:
        bytes still in the router's own buffer (a client that reads slower than the stream) would die with it,
        and a checkpoint must never count a token the client cannot get. Until then the next flush tries again.
        Tokens not checkpointed now are looked at again by a timer, should no flush come first.
        """
        completion_tokens = counts.completion_tokens
        if not self.every_tokens or completion_tokens <= self.tokens or self.paid.closed:
            return
        now = time.monotonic()
        due = completion_tokens - self.tokens >= self.every_tokens or now - self.at >= self.every_seconds
        if not due or transport is None or transport.get_write_buffer_size():
            self.pending = (counts, transport)
            if self.timer is None and transport is not None:
                delay = self.every_seconds if due else max(self.at + self.every_seconds - now, 0.001)
                self.timer = asyncio.get_running_loop().call_later(delay, self._look_again)
            return
        self.pending = None
        self.tokens, self.at = completion_tokens, now
        paid = self.paid
        try:
            # As a cut stream's charge: its cached prompt tokens at their own fee (settle.settle_delivered).
            bill = paid.bill_tokens(counts.prompt_tokens, completion_tokens, counts.cached_tokens)
            queued = self.ledger.checkpoint(
                paid.id,
                prompt_tokens=bill.prompt_tokens,
                completion_tokens=completion_tokens,
                charge=bill.charge,
                model=paid.model,
                node=self.node.name,
                cached_tokens=bill.cached_tokens,
                cache_discount=bill.cache_discount,
            )
        except (LedgerError, ValueError) as exc:  # a closed ledger, a count past MAX_AMOUNT: the stream goes on
            log.debug("request %s: no checkpoint: %s", paid.id, exc)
            return
        queued.add_done_callback(self._committed)
        self.metric.inc()

    def stop(self) -> None:
        """The stream has ended: no more checkpoints."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = None

    def _look_again(self) -> None:
        """No flush has checkpointed the tokens last delivered within --checkpoint-ms: do it now."""
        self.timer = None
        if self.pending is not None:
            self.delivered(*self.pending)

    def _committed(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, LedgerError):  # an outage is said once, by the ledger gate; the next checkpoint may do
            log.debug("request %s: a checkpoint was not written: %s", self.paid.id, exc)
        elif exc is not None:
            log.error("request %s: a checkpoint failed", self.paid.id, exc_info=exc)
