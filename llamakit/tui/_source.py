"""Where the dashboard's data comes from: the router's admin stats, live over SSE or by polling; drain and undrain.

StatsError                 the router could not give a snapshot; the message says why, plainly
 ├── RouterUnreachable     no connection, a timeout, a server error, or not a stats answer
 └── RouterRefused         the admin key was refused (401/403)
DrainFailed                the router would not drain (or undrain) that node
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

__all__ = [
    "DrainFailed",
    "Pages",
    "RouterRefused",
    "RouterStats",
    "RouterUnreachable",
    "StatsError",
    "StatsSource",
]


class StatsError(Exception):
    """The router did not give a snapshot; `str()` is a sentence for the operator."""


class RouterUnreachable(StatsError):
    pass


class RouterRefused(StatsError):
    pass


class DrainFailed(Exception):
    pass


class StatsSource(Protocol):
    """Anything the dashboard can watch: the real router, or fixed snapshots in tests."""

    @property
    def url(self) -> str: ...

    def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Snapshots as they come, at least one a second, until the connection ends; raises StatsError."""
        ...

    async def drain(self, node_id: str) -> dict[str, Any]:
        """Ask the router to drain a node; returns the node as the router now reports it; raises DrainFailed."""
        ...

    async def undrain(self, node_id: str) -> dict[str, Any]:
        """Ask the router to give a draining node work again; returns the node as the router now reports it;
        raises DrainFailed."""
        ...


@runtime_checkable
class Pages(Protocol):
    """A source that can also page through what a snapshot carries only the first of (accounts, keys, nodes)."""

    async def page(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """One page of an admin list (`GET /admin/accounts`, `/admin/keys`, `/admin/nodes`): `{"data", "has_more",
        "next_after"}`; raises StatsError."""
        ...


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return resp.text[:200] or resp.reason_phrase


class RouterStats:
    """The router's `GET /admin/stats/stream` (SSE), falling back to polling `GET /admin/stats`.

    Polling is used when the router has no stream route (404/405); once chosen it stays for this source.
    """

    def __init__(
        self,
        url: str,
        admin_key: str,
        *,
        interval: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._admin_key = admin_key
        self.interval = interval
        self.streaming = True
        self._transport = transport

    @property
    def url(self) -> str:
        return self._url

    def _client(self) -> httpx.AsyncClient:
        # A stream answers every `interval`; three missed beats mean the router is gone even if the socket is not.
        timeout = httpx.Timeout(5.0, connect=3.0, read=max(3.0, 3 * self.interval))
        return httpx.AsyncClient(
            base_url=self._url,
            headers={"Authorization": f"Bearer {self._admin_key}"},
            timeout=timeout,
            transport=self._transport,
        )

    def _check(self, resp: httpx.Response) -> None:
        if resp.status_code in (401, 403):
            raise RouterRefused(
                f"The router at {self._url} refused the admin key ({_error_message(resp)}): "
                "check --admin-key or LLAMAKIT_ADMIN_KEY."
            )
        if resp.status_code >= 400:
            raise RouterUnreachable(f"{self._unreachable} it answered {resp.status_code} {_error_message(resp)}.")

    @property
    def _unreachable(self) -> str:
        return f"Router unreachable at {self._url}:"

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self._client() as client:
                if self.streaming:
                    async for snapshot in self._stream(client):
                        yield snapshot
                if not self.streaming:
                    async for snapshot in self._poll(client):
                        yield snapshot
        except httpx.ConnectError as exc:
            raise RouterUnreachable(f"{self._unreachable} cannot connect ({exc or 'refused'}).") from exc
        except httpx.TimeoutException as exc:
            raise RouterUnreachable(f"{self._unreachable} it stopped answering.") from exc
        except httpx.HTTPError as exc:
            raise RouterUnreachable(
                f"{self._unreachable} the connection was lost ({exc or type(exc).__name__})."
            ) from exc

    async def _stream(self, client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
        params = {"interval": f"{self.interval:g}"}
        async with client.stream("GET", "/admin/stats/stream", params=params) as resp:
            if resp.status_code in (404, 405):
                self.streaming = False
                return
            if resp.is_error:
                await resp.aread()
            self._check(resp)
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield self._decode(data)
        raise RouterUnreachable(f"{self._unreachable} it closed the stats stream.")

    async def _poll(self, client: httpx.AsyncClient) -> AsyncIterator[dict[str, Any]]:
        while True:
            resp = await client.get("/admin/stats")
            self._check(resp)
            yield self._decode(resp.text)
            await asyncio.sleep(self.interval)

    def _decode(self, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RouterUnreachable(f"{self._unreachable} it sent something that is not JSON.") from exc
        if not isinstance(data, dict):
            raise RouterUnreachable(f"{self._unreachable} it sent something that is not a stats snapshot.")
        return data

    async def page(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        try:
            async with self._client() as client:
                resp = await client.get(path, params=dict(params))
        except httpx.HTTPError as exc:
            raise RouterUnreachable(f"{self._unreachable} {exc or type(exc).__name__}.") from exc
        self._check(resp)
        page = self._decode(resp.text)
        if not isinstance(page.get("data"), list):
            raise RouterUnreachable(f"{self._unreachable} it sent something that is not a page of {path}.")
        return page

    async def drain(self, node_id: str) -> dict[str, Any]:
        return await self._node_action(node_id, "drain")

    async def undrain(self, node_id: str) -> dict[str, Any]:
        return await self._node_action(node_id, "undrain")

    async def _node_action(self, node_id: str, action: str) -> dict[str, Any]:
        try:
            async with self._client() as client:
                resp = await client.post(f"/admin/nodes/{quote(node_id, safe='')}/{action}")
        except httpx.HTTPError as exc:
            raise DrainFailed(f"could not reach the router at {self._url} to {action} {node_id!r} ({exc})") from exc
        if resp.is_error:
            raise DrainFailed(f"the router would not {action} {node_id!r}: {resp.status_code} {_error_message(resp)}")
        try:
            node: Any = resp.json()
        except ValueError:
            node = {}
        return node if isinstance(node, dict) else {}
