"""Several routers on one PostgreSQL database (`--cluster`): one queue and one set of slots for the herd, one
herd membership, idempotency claims every router sees, and leases that let the living clean up after the dead.

The database is the one place all routers agree on, so everything they must agree on lives there (migration
0004): `routers` (leases), `nodes` (membership, draining, up/down, `running` requests), `queue` (every request
waiting for or running on a node, whichever router holds its client) and `idempotency_claims`.

Dispatch is one transaction under one advisory lock per database schema (`pg_advisory_xact_lock`): it takes
the best waiting rows of a model (bid DESC, turn, arrived, seq: the in-process `Scheduler`'s order, with its
fair-share turns, `exclude` and affinity `prefer`) and gives them the least-loaded nodes with a free slot.
One lock for the herd rather than one per model: a node may serve several models, and its slots are shared
by all of them. Dispatch runs when a request arrives (its row is inserted in the same transaction, and an
assignment of its own is returned at once), when one finishes (its row deleted in the same transaction),
when a node joins or comes back, and every second as a safety net. A router learns that another router's
dispatch gave its request a node by `NOTIFY` on one channel per schema (payload `router request node`).

Time in the database (leases, rests) is the database's clock, so routers on hosts whose clocks differ agree.
"""

from __future__ import annotations

from llamakit.router.dispatch.cluster._base import Figures, RouterIdInUse
from llamakit.router.dispatch.cluster.claims import ClusterIdempotency
from llamakit.router.dispatch.cluster.leases import Leases
from llamakit.router.dispatch.cluster.membership import Membership
from llamakit.router.dispatch.cluster.queue import SharedQueue

__all__ = ["Cluster", "ClusterIdempotency", "Figures", "RouterIdInUse"]


class Cluster(Leases, Membership, SharedQueue):
    """This router's part in a cluster of routers sharing the PostgreSQL database at `dsn`.

    `herd` is kept in step with the `nodes` table (on NOTIFY and every second); `ledger` is the router's
    PostgreSQL ledger, whose holds carry `router_id`. Open with `await open()`, then `start()` the background
    tasks; `close()` stops them, deletes this router's queue rows and claims, and ends its lease.

    Its parts, one module each: `leases.py` (start, stop, leases, clean-up, leadership), `membership.py` (the
    herd's nodes), `queue.py` (the shared queue and dispatch), and `claims.py` (idempotency claims, a separate
    object over the same pool). It is the `Dispatcher` of a cluster (see `llamakit.router.dispatch`).
    """
