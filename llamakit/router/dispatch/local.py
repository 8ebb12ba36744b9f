"""One router's dispatcher: its bid queues in memory (`Scheduler`); the herd is this process's alone."""

from __future__ import annotations

from decimal import Decimal

from llamakit.router.affinity import Affinity
from llamakit.router.dispatch import HerdView
from llamakit.router.dispatch.scheduler import Scheduler
from llamakit.router.herd import HerdNode

__all__ = ["LocalDispatcher"]


class LocalDispatcher:
    """`Dispatcher` for one router (see `llamakit.router.dispatch`)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    @property
    def leader(self) -> bool:
        return True

    @property
    def last_multiplier(self) -> Decimal:
        return self.scheduler.last_multiplier

    def take_now(
        self, request_id: str, model: str, bid: Decimal, *, exclude: frozenset[str], prefer: Affinity | None
    ) -> HerdNode | None:
        return self.scheduler.take_now(model, bid, exclude=exclude, prefer=prefer)

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
        return await self.scheduler.acquire(
            model, bid, max_wait=max_wait, exclude=exclude, arrived=arrived, prefer=prefer, account=account
        )

    def free(self, request_id: str, node: HerdNode) -> None:
        self.scheduler.free(node)

    def queue_length(self, model: str) -> int:
        return self.scheduler.queue_length(model)

    async def queue_depths(self) -> dict[str, int]:
        return {m: self.scheduler.queue_length(m) for m in self.scheduler.queues}

    async def herd_view(self, models: list[str]) -> HerdView:
        scheduler = self.scheduler
        names = sorted(set(models) | set(scheduler.queues))
        queue = {
            m: {"depth": scheduler.queue_length(m), "oldest_wait": round(scheduler.oldest_wait(m), 3)} for m in names
        }
        return HerdView(queue=queue, last_multiplier=scheduler.last_multiplier)

    async def joined(self, node: HerdNode, *, static: bool = False) -> None:
        self.scheduler.pump()

    async def came_back(self, node: HerdNode) -> None:
        self.scheduler.pump()

    async def draining(self, node: HerdNode, draining: bool) -> None:
        self.scheduler.pump()  # requests waiting only for this node learn at once

    async def removed(self, node: HerdNode) -> None:
        self.scheduler.pump()

    def pump(self) -> None:
        self.scheduler.pump()

    def failed(self, node: HerdNode) -> None:
        pass  # the herd marks it (herd.failed / herd.hung): this process is the only one that dispatches to it

    async def checked(self, before: dict[str, bool]) -> None:
        pass
