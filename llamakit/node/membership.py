"""A node's membership in its router's herd: join, then heartbeat, rejoining whenever the router forgets it."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import aiohttp

from llamakit.node.settings import NodeSettings

__all__ = ["HerdMember", "keep_membership"]

log = logging.getLogger(__name__)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class HerdMember(Protocol):
    """What a node tells its router: the model it serves (None while it has none), its slots and how many are
    busy, and its status. A `ModelHost`, or a llama-server the node fronts (`llama_server_app.Fronted`)."""

    @property
    def model(self) -> _Named | None: ...

    @property
    def slot_count(self) -> int: ...

    @property
    def busy(self) -> int: ...

    @property
    def status(self) -> str: ...

    async def wait_loaded(self) -> None: ...


async def keep_membership(settings: NodeSettings, host: HerdMember) -> None:
    """Run until cancelled. The router also health-checks the node, so a lost heartbeat is not fatal."""
    assert settings.router is not None
    router = settings.router.rstrip("/")
    headers = {"Authorization": f"Bearer {settings.herd_token}"}
    joined = False
    warned = False
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            await host.wait_loaded()
            body = {
                "url": settings.url,
                "name": settings.name,
                "models": [host.model.name] if host.model is not None else [],
                "slots": host.slot_count,
                "busy": host.busy,
                "status": host.status,
            }
            try:
                path = "/herd/heartbeat" if joined else "/herd/join"
                async with session.post(router + path, json=body) as resp:
                    if resp.status == 404 and joined:
                        joined = False  # the router restarted and forgot us: join again at once
                        continue
                    resp.raise_for_status()
                if not joined:
                    log.info("joined the herd at %s as %r", router, settings.name)
                joined, warned = True, False
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not warned:
                    log.warning("cannot reach the router at %s (%s); retrying", router, exc)
                    warned = True
                joined = False
            await asyncio.sleep(settings.heartbeat_seconds)
