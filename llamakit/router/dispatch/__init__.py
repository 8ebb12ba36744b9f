"""Where a paid request gets a node slot: one `Dispatcher` interface, two implementations chosen once at start-up.

- `LocalDispatcher` (`local.py`): one router, its bid queues in memory (`scheduler.py`), on SQLite or PostgreSQL.
- `Cluster` (`cluster.py`): several routers on one PostgreSQL database (`--cluster yes`), the queue, the slots,
  the herd's membership and the routers' leases in the database.

Feature code (the paid path, the admin and herd routes, stats, metrics) talks to `RouterState.dispatch` only and
never asks which one it runs under. Refusals are `dispatch.errors`' exceptions, turned into HTTP at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from llamakit.router.affinity import Affinity
from llamakit.router.herd import HerdNode

__all__ = ["BATCH_BID", "Dispatcher", "HerdView"]

# The bid a batch line waits at (see llamakit.router.batches): below every interactive bid (those are at least
# 1, fees.MIN_BID), so that both dispatchers give a batch line a slot only when no interactive request waits for
# its model. It orders the queue and is no price: the queue's depth and the last multiplier leave it out.
BATCH_BID = Decimal(0)


@dataclass
class HerdView:
    """The queue and the slots as the dispatcher sees them, for `/admin/stats`: `queue` per model (`depth`,
    `oldest_wait` in seconds), the last multiplier dispatched, `busy` running requests per node id when they are
    the herd's rather than this process's (None: the herd's own counts are right), and `cluster`, what only a
    cluster has (its routers, leases and dispatch figures)."""

    queue: dict[str, dict[str, Any]]
    last_multiplier: Decimal
    busy: dict[str, int] | None = None
    cluster: dict[str, Any] | None = None


class Dispatcher(Protocol):
    """Gives paid requests node slots in bid order, and hears of changes to the herd that change who may get one."""

    @property
    def leader(self) -> bool:
        """Whether this router checks the herd's health (always with one router; one router of a cluster)."""
        ...

    @property
    def last_multiplier(self) -> Decimal:
        """The bid of the request dispatched last (the AO herder's Info), herd-wide."""
        ...

    def take_now(
        self, request_id: str, model: str, bid: Decimal, *, exclude: frozenset[str], prefer: Affinity | None
    ) -> HerdNode | None:
        """A node at once when no request waits ahead and a slot is free, else None (then `acquire`); raises
        NoNode when no node that is up and not draining (and not in `exclude`) serves `model`."""
        ...

    async def acquire(
        self,
        request_id: str,
        model: str,
        bid: Decimal,
        *,
        max_wait: float,
        exclude: frozenset[str],
        arrived: float,
        prefer: Affinity | None,
        account: int | None,
    ) -> HerdNode:
        """A node with a slot reserved for the request after waiting in the bid queue; give it back with
        `free`. `arrived` is `time.monotonic()` at the router (a retry keeps its place). Raises the
        `dispatch.errors` refusals: NoNode, QueueFull, QueueShareExceeded, QueueTimeout, LeaseLost."""
        ...

    def free(self, request_id: str, node: HerdNode) -> None:
        """The request is done with `node`'s slot: the next request gets it."""
        ...

    def queue_length(self, model: str) -> int:
        """Requests of this router waiting for `model` now (the `llamakit_router_queue_depth` gauge)."""
        ...

    async def queue_depths(self) -> dict[str, int]:
        """Requests waiting per model, herd-wide."""
        ...

    async def herd_view(self, models: list[str]) -> HerdView:
        """The queue of `models` (and any other with requests waiting) and the slots, for the dashboard."""
        ...

    # The herd changed: each tells the queue (waiting requests may go, or learn that they never can) and, in a
    # cluster, the other routers.
    async def joined(self, node: HerdNode, *, static: bool = False) -> None: ...

    async def came_back(self, node: HerdNode) -> None: ...

    async def draining(self, node: HerdNode, draining: bool) -> None: ...

    async def removed(self, node: HerdNode) -> None: ...

    def pump(self) -> None:
        """A health check found a node back: give waiting requests its slots (a cluster's database does itself)."""
        ...

    def failed(self, node: HerdNode) -> None:
        """`node` failed a request (down, or hung): every router stops sending it work until it answers again."""
        ...

    async def checked(self, before: dict[str, bool]) -> None:
        """The leader's health round ended; `before` is each node's `up` when it began."""
        ...
