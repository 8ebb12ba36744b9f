"""The herd: the nodes a router knows, their state and load, and which one should take the next request."""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = ["Herd", "HerdNode", "NodeState"]

NodeState = Literal["ready", "draining", "down"]

# A node is marked down after this many failed health checks in a row (one failure may be a blip).
FAILURES_TO_DOWN = 2
# A node's rest after a timeout doubles with each timeout in a row, up to 2**this times the first.
MAX_REST_DOUBLINGS = 4
# Fields of a node whose change can change which node `Herd.pick` takes.
_STATE_FIELDS: Final = frozenset({"up", "draining", "slots", "models", "name", "n_ctx"})


@dataclass
class HerdNode:
    """One node as the router sees it. `busy` counts the requests this router has in flight on it."""

    id: str
    url: str
    name: str
    models: list[str]
    slots: int
    static: bool = False
    # The context each of its slots holds (tokens), as its /health says; None until it has said.
    n_ctx: int | None = None
    draining: bool = False
    up: bool = True
    busy: int = 0
    failures: int = 0
    last_seen: float = field(default_factory=time.time)
    # Requests in a row that timed out on it, and the time.monotonic() until which it rests because of them.
    timeouts: int = 0
    resting_until: float = 0.0
    requests: int = 0
    completion_tokens: int = 0
    fees_earned: int = 0
    # (time, tokens) of recent completions, for a tokens-per-second figure over the last minute.
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=512))
    # The herd whose pick index follows this node (set by the herd), and the node's version in that index.
    _herd: Herd | None = field(default=None, repr=False, compare=False)
    _version: int = field(default=0, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        herd = self.__dict__.get("_herd")
        # Health checks write the same state again and again: only a change touches the index.
        changed = herd is not None and (
            name == "busy" or (name in _STATE_FIELDS and self.__dict__.get(name, value) != value)
        )
        object.__setattr__(self, name, value)
        if changed:
            assert herd is not None
            herd._changed(self, name)

    @property
    def state(self) -> NodeState:
        if not self.up:
            return "down"
        return "draining" if self.draining else "ready"

    @property
    def free(self) -> int:
        return self.slots - self.busy

    def serves(self, model: str) -> bool:
        return model in self.models

    def accepting(self, model: str) -> bool:
        return self.up and not self.draining and self.serves(model) and self.free > 0

    def record(self, completion_tokens: int, fee: int, *, whole: bool = True) -> None:
        """A request it served was settled; `whole` unless it broke off, which does not end a run of timeouts."""
        self.requests += 1
        if whole:
            self.timeouts = 0
        self.completion_tokens += completion_tokens
        self.fees_earned += fee
        self.recent.append((time.time(), completion_tokens))

    def tokens_per_second(self, window: float = 60.0) -> float:
        cutoff = time.time() - window
        return sum(n for t, n in self.recent if t >= cutoff) / window

    def snapshot(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "models": list(self.models),
            "state": self.state,
            "slots": self.slots,
            "n_ctx": self.n_ctx,
            "busy": self.busy,
            "tokens_per_second": round(self.tokens_per_second(), 2),
            "requests": self.requests,
            "fees_earned": self.fees_earned,
            "last_seen": self.last_seen,
            "static": self.static,
            "timeouts": self.timeouts,
            "resting": round(max(0.0, self.resting_until - time.monotonic()), 3),
        }


class Herd:
    """The nodes, and an index that makes `pick` cost O(log n), not O(n), in a herd of n nodes.

    The index is a heap per model of (load, -free, name) entries with the node's version: a node whose `busy`
    changes gets a new entry (the old one is stale and dropped when it reaches the top); a change of its
    state (`up`, `draining`, `slots`, `models`) or of the membership rebuilds the heaps, which happens at
    the pace of health checks, not of requests.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, HerdNode] = {}
        self._heaps: dict[str, list[tuple[float, int, str, int, int, HerdNode]]] = {}
        self._indexed = -1  # len(nodes) when the heaps were built; -1: rebuild before the next pick
        self._contexts: dict[str, int | None] = {}  # by model: see `context`
        self._served: frozenset[str] | None = None  # see `serves`
        self._entries = 0
        self._tiebreak = itertools.count()

    def adopt(self, node: HerdNode) -> None:
        """Add `node` to the herd under its id (for a herd kept in step with a database: see cluster.py)."""
        object.__setattr__(node, "_herd", self)
        self.nodes[node.id] = node
        self._stale()

    def invalidate(self) -> None:
        """The membership changed behind the herd's back: rebuild the pick index before the next pick."""
        self._stale()

    def _changed(self, node: HerdNode, name: str) -> None:
        object.__setattr__(node, "_version", node._version + 1)
        if name in ("models", "n_ctx"):
            self._contexts, self._served = {}, None
        if self._indexed < 0:
            return  # the heaps are rebuilt before the next pick anyway (and a cluster's router never picks)
        if name != "busy":
            self._indexed = -1
            return
        self._push(node)
        if self._entries > 8 * len(self.nodes) + 64:  # mostly stale entries: start afresh
            self._stale()

    def _stale(self) -> None:
        self._indexed = -1
        self._contexts, self._served = {}, None

    def serves(self, model: str) -> bool:
        """Whether a node of the herd, up or not, serves `model`. Cached like `context`: no scan per request."""
        if self._served is None:
            self._served = frozenset(m for node in self.nodes.values() for m in node.models)
        return model in self._served

    def context(self, model: str) -> int | None:
        """The largest context (tokens per request) among the nodes serving `model`: no request for it can
        use more. None while one of them has not said its size (or none serves it). Cached until the herd's
        state or membership changes, so that a request pays no scan of a large herd."""
        if model not in self._contexts:
            sizes = [n.n_ctx for n in self.nodes.values() if model in n.models]
            known = [s for s in sizes if s is not None]
            self._contexts[model] = max(known) if known and len(known) == len(sizes) else None
        return self._contexts[model]

    def _push(self, node: HerdNode) -> None:
        if not (node.up and not node.draining and node.free > 0):
            return  # it gets an entry again when it frees a slot or its state changes
        entry = (node.busy / node.slots, -node.free, node.name, node._version, next(self._tiebreak), node)
        for model in node.models:
            heapq.heappush(self._heaps.setdefault(model, []), entry)
            self._entries += 1

    def _rebuild(self) -> None:
        self._heaps, self._entries = {}, 0
        for node in self.nodes.values():
            if node._herd is not self:
                object.__setattr__(node, "_herd", self)
            self._push(node)
        self._indexed = len(self.nodes)

    def join(self, *, url: str, name: str, models: list[str], slots: int, static: bool = False) -> HerdNode:
        """Add a node, or refresh it when a node of that name or url joins again (after a restart)."""
        url = url.rstrip("/")
        existing = next((n for n in self.nodes.values() if n.name == name or n.url == url), None)
        if existing is not None:
            existing.url, existing.name, existing.models, existing.slots = url, name, list(models), slots
            existing.up, existing.failures, existing.last_seen = True, 0, time.time()
            existing.timeouts, existing.resting_until = 0, 0.0  # a new process: what hung died with the old one
            return existing
        node = HerdNode(id=name, url=url, name=name, models=list(models), slots=slots, static=static)
        self.adopt(node)
        return node

    def get(self, node_id_or_name: str) -> HerdNode | None:
        node = self.nodes.get(node_id_or_name)
        if node is None:
            node = next((n for n in self.nodes.values() if n.name == node_id_or_name), None)
        return node

    def remove(self, node_id_or_name: str) -> HerdNode | None:
        node = self.get(node_id_or_name)
        self._stale()
        return self.nodes.pop(node.id) if node is not None else None

    def seen(
        self, node: HerdNode, *, models: list[str] | None = None, slots: int | None = None, n_ctx: int | None = None
    ) -> bool:
        """A health check or heartbeat answered; returns True when the node came back from down.

        A node resting after a timeout stays down however well it answers: see `hung`.
        """
        node.last_seen = time.time()
        if models is not None:
            node.models = models
        if slots is not None:
            node.slots = slots
        if n_ctx is not None:
            node.n_ctx = n_ctx
        if time.monotonic() < node.resting_until:
            return False
        came_back = not node.up
        node.up, node.failures = True, 0
        return came_back

    def failed(self, node: HerdNode, *, at_once: bool = False) -> None:
        """A health check failed, or a request could not reach the node (`at_once`: no second chance)."""
        node.failures += 1
        if at_once or node.failures >= FAILURES_TO_DOWN:
            node.up = False

    def hung(self, node: HerdNode, *, rest: float) -> None:
        """A request went silent on the node past the node timeout: down, and deaf to its health for a while.

        Its /health is no proof it can work: health is answered on the node's event loop while generation may be
        stuck in its slots. So it rests for `rest` seconds, twice as long for each timeout in a row, and only a
        health check after that brings it back; a request it serves resets the count.
        """
        node.timeouts += 1
        node.up = False
        node.resting_until = time.monotonic() + rest * 2 ** min(node.timeouts - 1, MAX_REST_DOUBLINGS)

    def pick(self, model: str) -> HerdNode | None:
        """The least-loaded node that serves `model` and has a free slot (ties: most free slots, then name)."""
        if self._indexed != len(self.nodes):
            self._rebuild()
        heap = self._heaps.get(model)
        while heap:
            _load, _free, _name, version, _n, node = heap[0]
            if version == node._version and node.accepting(model) and self.nodes.get(node.id) is node:
                return node
            heapq.heappop(heap)  # stale: the node changed since, or is full, down, draining or gone
            self._entries -= 1
        return None

    def models(self, *, ready_only: bool = True) -> list[str]:
        names: set[str] = set()
        for node in self.nodes.values():
            if node.up and (not ready_only or not node.draining):
                names.update(node.models)
        return sorted(names)

    def serving(self, model: str) -> list[HerdNode]:
        return [n for n in self.nodes.values() if n.serves(model)]
