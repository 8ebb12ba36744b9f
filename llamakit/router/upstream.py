"""Calls from the router to its nodes: health checks, whole completions and streams of SSE events.

Failures are sorted by what the router should do next: `NodeFailed` (before any token: try another node),
`NodeRejected` (the node refused the request itself: tell the client, refund), and `StreamBroken`
(after tokens were delivered: end the stream with an error and charge for what was delivered).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp

from llamakit import jsontext
from llamakit.router.herd import HerdNode
from llamakit.wire.headers import CACHE_SALT_HEADER, KEEPALIVE_HEADER, REQUEST_ID_HEADER
from llamakit.wire.node import TokenCounts, split_counts

__all__ = ["EventStream", "NodeFailed", "NodeRejected", "StreamBroken", "Upstream", "parse_event", "token_chunk"]


class NodeFailed(Exception):
    """The node could not serve the request and nothing was generated; `down` when it did not answer at all,
    `hung` when it took the request and then went silent for longer than the node timeout."""

    def __init__(self, reason: str, *, down: bool, hung: bool = False, said: str | None = None) -> None:
        super().__init__(reason)
        self.down = down
        self.hung = hung
        # What a client may be told of it (`reason` is the operator's: it may name hosts and ports).
        self.said = said or ("did not answer" if down else "failed")


class NodeRejected(Exception):
    """The node refused the request as invalid (a 4xx other than 401/503): the client's fault, not the node's."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"node answered {status}")
        self.status = status
        self.body = body


class StreamBroken(Exception):
    """The node's stream ended abnormally after it had started; `hung` when it went silent past the node timeout."""

    def __init__(self, reason: str, *, hung: bool = False) -> None:
        super().__init__(reason)
        self.hung = hung


class _SlotsBusy(Exception):
    """The node answered 503 `slots_busy`: every slot it has is generating."""


# How long a request given a slot its node has not freed yet keeps asking for it (see Upstream._post).
SLOT_FREED_WITHIN = 2.0


class Upstream:
    def __init__(self, session: aiohttp.ClientSession, herd_token: str, *, node_timeout: float) -> None:
        self.session = session
        # A node proves a long answer alive at this interval (whitespace, SSE comments) while it advances.
        keepalive = f"{max(node_timeout / 4, 0.05):.3f}"
        self.headers = {
            "Authorization": f"Bearer {herd_token}",
            KEEPALIVE_HEADER: keepalive,
            "Content-Type": "application/json",
        }
        self._cancel_headers = {"Authorization": f"Bearer {herd_token}"}
        # sock_read bounds the silence between bytes: a hung node is given up on, not waited for forever.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=node_timeout)

    async def health(self, url: str, *, within: float) -> dict[str, Any]:
        async with self.session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=within)) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    async def _post(
        self,
        node: HerdNode,
        path: str,
        body: dict[str, Any],
        request_id: str,
        cache_salt: str,
        trace: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """The node's 200 response (the caller reads and releases it); NodeFailed or NodeRejected otherwise.

        A node that answers 503 `slots_busy` is asked again for up to SLOT_FREED_WITHIN seconds: the router gave
        this request a slot it had just freed (a client cut its stream), and the node frees it only once its
        generation loop sees the cut, a token's time later. Failing over, or failing, would refuse a request
        for a slot that is free in a moment (with one node for the model: a 503 `no_node` to whoever waited)."""
        deadline = time.monotonic() + SLOT_FREED_WITHIN
        pause = 0.005
        while True:
            try:
                return await self._post_once(node, path, body, request_id, cache_salt, trace)
            except _SlotsBusy as busy:
                if time.monotonic() + pause > deadline:
                    raise NodeFailed(
                        f"node {node.name} answered 503: {busy}", down=False, said="answered 503 (slots_busy)"
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def _post_once(
        self,
        node: HerdNode,
        path: str,
        body: dict[str, Any],
        request_id: str,
        cache_salt: str,
        trace: Mapping[str, str] | None,
    ) -> aiohttp.ClientResponse:
        headers = {**self.headers, REQUEST_ID_HEADER: request_id, CACHE_SALT_HEADER: cache_salt}
        if trace:  # the trace's context (traceparent): the node's spans join the request's trace
            headers.update(trace)
        try:
            resp = await self.session.post(
                node.url + path,
                data=jsontext.dumps(body),  # bytes: aiohttp encodes a str again
                headers=headers,
                timeout=self.timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            hung = isinstance(exc, TimeoutError)
            raise NodeFailed(f"node {node.name} did not answer: {exc!r}", down=True, hung=hung) from exc
        if resp.status == 200:
            return resp
        try:
            payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError, TimeoutError):
            payload = {}
        finally:
            resp.release()
        if resp.status in (401, 403):
            raise NodeFailed(f"node {node.name} refused the herd token", down=True, said="refused the herd token")
        if resp.status == 404 and (payload.get("error") or {}).get("code") == "model_not_found":
            raise NodeFailed(
                f"node {node.name} no longer serves this model", down=False, said="no longer serves this model"
            )
        if 400 <= resp.status < 500 and resp.status != 408 and resp.status != 429:
            raise NodeRejected(resp.status, payload if "error" in payload else _error(resp.status))
        error = payload.get("error") if isinstance(payload, dict) else None
        if resp.status == 503 and isinstance(error, dict) and error.get("code") == "slots_busy":
            raise _SlotsBusy(str(error.get("message") or "slots busy"))
        # Its error code, which a client's error may carry (its message is the operator's: it may name hosts).
        code = f" ({str(error['code'])[:64]})" if isinstance(error, dict) and error.get("code") else ""
        raise NodeFailed(
            f"node {node.name} answered {resp.status}{code}", down=False, said=f"answered {resp.status}{code}"
        )

    async def complete(
        self,
        node: HerdNode,
        path: str,
        body: dict[str, Any],
        request_id: str,
        *,
        cache_salt: str = "",
        trace: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """The node's whole answer; `cache_salt` says whose prompt cache it may reuse (see CACHE_SALT_HEADER),
        `trace` the headers that carry the request's trace context (RequestTrace.begin_call)."""
        resp = await self._post(node, path, body, request_id, cache_salt, trace)
        try:
            data: dict[str, Any] = jsontext.loads(await resp.read())
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            hung = isinstance(exc, TimeoutError)
            raise NodeFailed(f"node {node.name} broke off its answer: {exc!r}", down=True, hung=hung) from exc
        finally:
            resp.release()
        if "error" in data:  # it failed after its keepalives had sent the status line
            message = (data["error"] or {}).get("message") if isinstance(data["error"], dict) else data["error"]
            raise NodeFailed(f"node {node.name} failed: {message}", down=False)
        return data

    async def cancel(self, node: HerdNode, request_id: str) -> bool:
        """Ask `node` to stop generating `request_id` (its client left); its answer then holds what was made.
        False when the node could not be told (the answer comes whole, and is charged whole)."""
        try:
            async with self.session.post(
                f"{node.url}/admin/cancel/{request_id}",
                headers=self._cancel_headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def stream(
        self,
        node: HerdNode,
        path: str,
        body: dict[str, Any],
        request_id: str,
        *,
        cache_salt: str = "",
        trace: Mapping[str, str] | None = None,
    ) -> EventStream:
        """The node's SSE events (their JSON text), up to `[DONE]`; raises StreamBroken if it ends in any other way.
        `cache_salt` and `trace` as for `complete`."""
        resp = await self._post(node, path, body, request_id, cache_salt, trace)
        return EventStream(resp, node)


def token_chunk(payload: bytes, prefix: bytes) -> tuple[bytes, TokenCounts] | None:
    """A token chunk of a node's stream whose JSON starts with `prefix`, as the client gets it (without its
    `llamakit` counts), and the counts delivered with it (prompt, of them cached, and completion tokens); None for
    any other event.

    Found without parsing the JSON: a relay passes the node's bytes on, as many times as there are tokens.
    """
    if not payload.startswith(prefix):
        return None
    return split_counts(payload)


def parse_event(node: HerdNode, payload: bytes) -> dict[str, Any]:
    """One event of `node`'s stream as a dict; StreamBroken if it is not a JSON object."""
    try:
        event = jsontext.loads(payload)
    except ValueError as exc:
        raise StreamBroken(f"node {node.name} broke off its stream: {exc!r}") from exc
    if not isinstance(event, dict):
        raise StreamBroken(f"node {node.name} sent an event that is not a JSON object: {payload[:80]!r}")
    return event


class EventStream:
    """The SSE events of a node's stream (the JSON text of each), up to `[DONE]` (then the connection goes back
    to the pool).

    Each read takes every byte that has arrived, so `buffered` tells how many events were read with the one
    just returned, and `ended` whether `[DONE]` came with them: a relay can pass them on in one write.
    StreamBroken if the stream ends in any other way; `aclose()` closes the connection, which is how the
    node learns that nobody listens any more.
    """

    def __init__(self, resp: aiohttp.ClientResponse, node: HerdNode) -> None:
        self._resp = resp
        self._node = node
        self._ready: deque[bytes] = deque()
        self._partial = b""  # the start of a line whose end has not arrived yet
        self._done = False  # [DONE] was read
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._ready)

    @property
    def ended(self) -> bool:
        return self._done

    async def batch(self) -> list[bytes]:
        """Every event that has arrived and not been taken (reading if none has), in order; [] once the stream
        has ended with `[DONE]`. A relay handles them in one go and passes them on in one write."""
        while not self._ready:
            if self._done:
                await self.aclose()
                return []
            if self._closed:
                return []
            await self._read()
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._done:
                await self.aclose()
                raise StopAsyncIteration
            if self._closed:
                raise StopAsyncIteration
            await self._read()
        return self._ready.popleft()

    async def _read(self) -> None:
        try:
            data = await self._resp.content.readany()
            if not data:
                raise StreamBroken(f"node {self._node.name} ended its stream without [DONE]")
            *lines, self._partial = (self._partial + data).split(b"\n")
            for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self._done = True
                    return
                self._ready.append(payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self.aclose()
            hung = isinstance(exc, TimeoutError)
            raise StreamBroken(f"node {self._node.name} broke off its stream: {exc!r}", hung=hung) from exc
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._done:
            self._resp.release()
        else:
            # Closing the connection is how the node learns that nobody listens any more and stops generating.
            self._resp.close()


def _error(status: int) -> dict[str, Any]:
    return {"error": {"message": f"the node refused the request ({status})", "type": "invalid_request_error"}}
