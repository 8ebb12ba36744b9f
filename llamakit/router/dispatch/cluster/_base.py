"""What the cluster's parts share: the connection pool, background tasks, retries while the database is away,
and the figures of its dispatches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, TypeVar

import asyncpg

from llamakit.outage import Outage
from llamakit.router.herd import Herd
from llamakit.router.ledger import Ledger, LedgerError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Seconds between the safety-net rounds: reload the herd, dispatch, look for assignments a NOTIFY missed.
SYNC_SECONDS: Final = 1.0
# Seconds between looks at the claim of an idempotency key that another router is running.
CLAIM_POLL_SECONDS: Final = 0.05
# How long a repeat waits for the first request under its idempotency key (a long generation takes minutes).
CLAIM_WAIT_SECONDS: Final = 600.0
_FAST_COMMITS: Final = {"synchronous_commit": "off"}  # unless the --db URL sets it, as for the ledger
_DB_NOW: Final = "extract(epoch FROM clock_timestamp())::float8"


class RouterIdInUse(LedgerError):
    """A live router already runs with this router's id on the database."""


@dataclass
class Figures:
    """What this router's dispatches cost: how many and how long (seconds of wall time, lock wait included)."""

    dispatches: int = 0
    seconds: float = 0.0
    assigned: int = 0


@dataclass
class _Waiter:
    model: str
    exclude: frozenset[str]
    batch: bool = False  # a batch line's (see dispatch.BATCH_BID)
    future: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued: bool = False  # its row is in the queue (the enqueue statement returned)


class ClusterBase:
    """The state every part of a `Cluster` shares (see `llamakit.router.dispatch.cluster`)."""

    def __init__(
        self,
        dsn: str,
        *,
        router_id: str,
        url: str,
        herd: Herd,
        ledger: Ledger,
        lease: float,
        max_queue: int,
        max_queue_share: float,
    ) -> None:
        self.id = router_id
        self.url = url
        self.herd = herd
        self.ledger = ledger
        self.lease = lease
        self.max_queue = max_queue
        self.max_per_account = max(1, int(max_queue * max_queue_share))
        self.leader = False  # whether this router runs the herd's health checks
        self.last_multiplier = Decimal(1)
        self.figures = Figures()
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._channel = ""
        self._lock_key = 0
        self._leader_key = 0
        self._id_key = 0
        self._waiting: dict[str, _Waiter] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._freeing: dict[str, asyncio.Task[None]] = {}
        self._reload_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._lease_lost = False
        self._renewed = False
        self.database = Outage(log, "cluster: the database", cost="calls failed")
        self._relistening = False  # the listening connection was lost and is not back yet

    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the cluster is not open")
        return self._pool

    async def _every(self, seconds: float, work: Any) -> None:
        while True:
            try:
                await work()
                self._database_back()
            except asyncio.CancelledError:
                raise
            except _DB_ERRORS as exc:  # a database blip must not end the loop: the next round tries again
                self._database_failed(exc)
            except Exception:
                log.exception("cluster: %s failed", getattr(work, "__name__", work))
            await asyncio.sleep(seconds)

    def _database_failed(self, exc: BaseException) -> None:
        """A call to the database failed: said once per outage (the loops and retries go on quietly)."""
        self.database.failed(exc, consequence="the cluster's rounds and retries go on quietly until it answers")
        self.database.count()

    def _database_back(self) -> None:
        if self.database.down:
            self.database.ended()

    async def _until_done(self, what: str, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work()`'s result, asked for again (0.1 s, doubling to 5 s) while the database cannot be reached: a
        slot, a queue row or an idempotency claim given back only once would be lost to a database restart,
        taken until this router stops (its lease is alive, so no other router cleans up after it). `work`
        must be safe to run twice: the first run may have committed before its answer was lost."""
        pause = 0.1
        while True:
            try:
                result = await work()
                self._database_back()
                return result
            except _DB_ERRORS as exc:
                log.debug("cluster: %s failed (%s); trying again in %.1f s", what, exc, pause)
                self._database_failed(exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)
        return task

    # What one part of the cluster asks of another (each is defined in its own module: Cluster has them all).

    async def reload(self) -> None:  # membership.py
        raise NotImplementedError

    async def _reloader(self) -> None:  # membership.py
        raise NotImplementedError

    async def try_lead(self) -> bool:  # leases.py
        raise NotImplementedError

    async def dispatch(self, models: Iterable[str] | None = None) -> None:  # queue.py
        raise NotImplementedError

    async def _dispatch(self, conn: asyncpg.Connection | asyncpg.Pool, models: list[str] | None) -> None:  # queue.py
        raise NotImplementedError

    async def _look_at_waiters(self) -> None:  # queue.py
        raise NotImplementedError

    async def _sync(self) -> None:  # queue.py
        raise NotImplementedError

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:  # queue.py
        raise NotImplementedError


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """See `Cluster.open`."""


def _array_literal(items: Sequence[str]) -> str:
    """A PostgreSQL text[] literal (unnest cannot take an array of arrays of different lengths)."""
    return "{" + ",".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items) + "}"


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cluster background task failed: %r", task.exception())


# What a lost connection raises, as asyncpg reports it: InternalClientError too ("cannot switch to state …"),
# when a connection is cut in the middle of an operation.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
