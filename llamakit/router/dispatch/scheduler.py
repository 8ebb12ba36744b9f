"""Bid queues and dispatch: highest bid first, accounts in turn among equal bids, never more requests on a node
than slots.

Among equal bids the queue is fair between accounts: a request's place is its account's turn at that bid
(how many of the account's requests already wait at that bid when it arrives), then its arrival. One account
that queues a hundred requests at bid 1 gets turns 0 to 99; another that arrives later with one request gets
turn 0 and goes ahead of all but the first account's first. And no account may hold more than a share of a
model's queue (`--max-queue-share`).

A request takes a free node at once when its model's queue is empty; otherwise it waits in the queue, and
the moment a slot frees (or a node joins or comes back) the best waiting request gets it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

from llamakit.router.affinity import CHARS_PER_EXTRA_REQUEST, Affinity
from llamakit.router.dispatch import BATCH_BID
from llamakit.router.dispatch.errors import NoNode, no_node_now, queue_full, queue_share_exceeded, queue_timeout
from llamakit.router.herd import Herd, HerdNode

__all__ = ["BidQueue", "Scheduler", "Ticket"]


@dataclass(order=True)
class Ticket:
    """A request waiting for a node; ordered by (-bid, its account's turn at that bid, arrival at the router,
    arrival in the queue)."""

    priority: tuple[Decimal, int, float, int]
    model: str = field(compare=False)
    bid: Decimal = field(compare=False)
    enqueued: float = field(compare=False)
    exclude: frozenset[str] = field(compare=False)
    future: asyncio.Future[HerdNode] = field(compare=False)
    prefer: Affinity | None = field(default=None, compare=False)
    gone: bool = field(default=False, compare=False)
    account: int | None = field(default=None, compare=False)


class BidQueue:
    """One model's waiting requests. Removal is lazy: a ticket that left is skipped when it reaches the top."""

    def __init__(self) -> None:
        self._heap: list[Ticket] = []
        self._live = 0
        self._batch = 0  # live tickets of batch lines (at BATCH_BID)
        self._by_account: Counter[int | None] = Counter()  # live tickets per account
        self._at_bid: Counter[tuple[Decimal, int | None]] = Counter()  # live tickets per (bid, account)
        self._last_arrival: dict[tuple[Decimal, int | None], float] = {}  # the latest arrival queued per key

    def __len__(self) -> int:
        return self._live

    @property
    def interactive(self) -> int:
        """The waiting requests that are not batch lines: the queue's depth as clients and the dashboard see it."""
        return self._live - self._batch

    def waiting(self, account: int | None, *, batch: bool = True) -> int:
        """How many of `account`'s requests wait in this queue; without `batch`, not counting its batch lines."""
        mine = self._by_account[account]
        return mine if batch else mine - self._at_bid[(BATCH_BID, account)]

    def turn(self, bid: Decimal, account: int | None, arrived: float) -> int:
        """The turn of a request of `account` at `bid` that reached the router at `arrived`: how many of the
        account's requests that arrived before it wait at that bid. A new request arrived after all of them;
        one that waits again after a failover keeps the turn it had, ahead of the account's later ones."""
        key = (bid, account)
        if arrived >= self._last_arrival.get(key, float("-inf")):
            return self._at_bid[key]
        return sum(
            1 for t in self._heap if not t.gone and t.bid == bid and t.account == account and t.priority[2] < arrived
        )

    def push(self, ticket: Ticket) -> None:
        heapq.heappush(self._heap, ticket)
        key = (ticket.bid, ticket.account)
        self._last_arrival[key] = max(self._last_arrival.get(key, float("-inf")), ticket.priority[2])
        self._count(ticket, 1)

    def peek(self) -> Ticket | None:
        while self._heap and self._heap[0].gone:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def pop(self) -> Ticket:
        ticket = heapq.heappop(self._heap)
        self._count(ticket, -1)
        return ticket

    def discard(self, ticket: Ticket) -> None:
        if not ticket.gone:
            ticket.gone = True
            self._count(ticket, -1)

    def _count(self, ticket: Ticket, step: int) -> None:
        self._live += step
        if ticket.bid == BATCH_BID:
            self._batch += step
        self._by_account[ticket.account] += step
        self._at_bid[(ticket.bid, ticket.account)] += step
        if self._at_bid[(ticket.bid, ticket.account)] == 0:  # keep the counters as small as the queue
            del self._at_bid[(ticket.bid, ticket.account)]
            self._last_arrival.pop((ticket.bid, ticket.account), None)
            if self._by_account[ticket.account] == 0:
                del self._by_account[ticket.account]

    def oldest_wait(self, now: float) -> float:
        waits = [now - t.enqueued for t in self._heap if not t.gone and t.bid != BATCH_BID]
        return max(waits, default=0.0)


class Scheduler:
    def __init__(self, herd: Herd, *, max_queue: int, max_queue_share: float = 1.0) -> None:
        self.herd = herd
        self.max_queue = max_queue
        # The most requests one account may have waiting for one model.
        self.max_per_account = max(1, int(max_queue * max_queue_share))
        self.queues: dict[str, BidQueue] = {}
        self.last_multiplier = Decimal(1)
        self._arrivals = itertools.count()

    def queue(self, model: str) -> BidQueue:
        return self.queues.setdefault(model, BidQueue())

    def queue_length(self, model: str | None = None) -> int:
        """Interactive requests waiting for `model` (every model when None); batch lines are not counted."""
        if model is not None:
            queue = self.queues.get(model)
            return queue.interactive if queue is not None else 0
        return sum(q.interactive for q in self.queues.values())

    def _assign(self, node: HerdNode, bid: Decimal) -> HerdNode:
        node.busy += 1
        if bid != BATCH_BID:
            self.last_multiplier = bid
        return node

    def _no_node(self, model: str, exclude: frozenset[str]) -> bool:
        """True when no node that is up and not draining could ever take this request."""
        # A generator over the nodes, not `herd.serving`'s list: it stops at the first good node, so the common
        # case costs the same in a herd of 1,000 as in a herd of one.
        return not any(
            n.up and not n.draining and n.id not in exclude and n.serves(model) for n in self.herd.nodes.values()
        )

    def take_now(
        self, model: str, bid: Decimal, *, exclude: frozenset[str] = frozenset(), prefer: Affinity | None = None
    ) -> HerdNode | None:
        """A node at once when the model's queue is empty and a slot is free, else None (then `acquire`).

        Raises NoNode when no node could ever serve the model.
        """
        if self._no_node(model, exclude):
            raise no_node_now(model)
        if not len(self.queues.get(model, ())):
            node = self._pick(model, exclude, prefer)
            if node is not None:
                return self._assign(node, bid)
        return None

    async def acquire(
        self,
        model: str,
        bid: Decimal,
        *,
        max_wait: float,
        exclude: frozenset[str] = frozenset(),
        arrived: float | None = None,
        prefer: Affinity | None = None,
        account: int | None = None,
    ) -> HerdNode:
        """A node with a slot reserved for this request; give it back with `free`.

        `arrived` is when the request reached the router (`time.monotonic()`, default now). A request that waits
        again because its node failed keeps its place among equal bids, ahead of those that came after it,
        instead of going to the back of the queue for a fault that was not its own. `prefer` names the node
        likely to hold the request's prefix in its prompt cache (see `_pick`).

        Raises NoNode when no node can serve the model, QueueFull or QueueShareExceeded when its queue is full
        or `account` already holds its share of it, QueueTimeout after `max_wait` seconds (see dispatch.errors).
        """
        node = self.take_now(model, bid, exclude=exclude, prefer=prefer)
        if node is not None:
            return node
        queue = self.queue(model)
        # Batch lines wait behind every interactive request and take no place from one: an interactive request
        # counts only the interactive requests waiting; a batch line counts them all (the runner claims no more
        # lines than the herd has slots, so they stay few).
        batch = bid == BATCH_BID
        if (len(queue) if batch else queue.interactive) >= self.max_queue:
            raise queue_full(model, self.max_queue)
        mine = queue.waiting(account, batch=batch)
        if account is not None and mine >= self.max_per_account:
            raise queue_share_exceeded(model, mine, self.max_per_account, self.max_queue)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        arrival = now if arrived is None else arrived
        priority = (-bid, queue.turn(bid, account, arrival), arrival, next(self._arrivals))
        ticket = Ticket(priority, model, bid, now, exclude, loop.create_future(), prefer, account=account)
        queue.push(ticket)
        # The queue may hold only requests passed over for slots they must not use: those slots are this one's.
        self.pump()
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.future), max_wait)
        except TimeoutError:
            raise queue_timeout(model, max_wait) from None
        except asyncio.CancelledError:
            future = ticket.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # The client went away in the same instant a node was assigned: give the slot back.
                self.free(future.result())
            raise
        finally:
            if not ticket.future.done():
                queue.discard(ticket)
                ticket.future.cancel()

    def _pick(self, model: str, exclude: frozenset[str], prefer: Affinity | None = None) -> HerdNode | None:
        """The least-loaded free node, or the node `prefer` names while the prefix it likely holds is worth its
        extra load: `CHARS_PER_EXTRA_REQUEST` characters for each running request it has over the other."""
        if not exclude:
            best = self.herd.pick(model)
        else:
            best = None
            for node in self.herd.nodes.values():
                if node.id in exclude or not node.accepting(model):
                    continue
                if best is None or node.busy / node.slots < best.busy / best.slots:
                    best = node
        if prefer is None or best is None or best.id == prefer.node_id:
            return best
        held = self.herd.nodes.get(prefer.node_id)
        if (
            held is not None
            and held.id not in exclude
            and held.accepting(model)
            and (held.busy - best.busy) * CHARS_PER_EXTRA_REQUEST <= prefer.chars
        ):
            return held
        return best

    def free(self, node: HerdNode) -> None:
        node.busy -= 1
        self.pump()

    def pump(self) -> None:
        """Give free slots to the best waiting requests; called whenever capacity may have appeared.

        A request that must avoid the nodes that failed it does not hold up the ones behind it when only those
        nodes have room: it is passed over, keeping its place, until a slot it may use frees.
        """
        for model, queue in self.queues.items():
            passed_over: list[Ticket] = []
            while (ticket := queue.peek()) is not None:
                if ticket.future.done():
                    queue.discard(ticket)
                    continue
                if self._no_node(model, ticket.exclude):
                    queue.pop()
                    ticket.future.set_exception(NoNode(f"no node is available for model {model!r}", model=model))
                    continue
                node = self._pick(model, ticket.exclude, ticket.prefer)
                if node is None:
                    if not ticket.exclude:
                        break  # no free slot for this model at all
                    passed_over.append(queue.pop())
                    continue
                queue.pop()
                ticket.future.set_result(self._assign(node, ticket.bid))
            for ticket in passed_over:
                queue.push(ticket)

    def oldest_wait(self, model: str) -> float:
        queue = self.queues.get(model)
        return queue.oldest_wait(time.monotonic()) if queue else 0.0
