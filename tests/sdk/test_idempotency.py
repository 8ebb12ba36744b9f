"""A call retried after its answer was lost must be paid once: the router's idempotency, through the SDK."""

from __future__ import annotations

import httpx
import pytest
from aiohttp import web

import llamakit.sdk as sdk
from llamakit.sdk import _retry
from tests.sdk.conftest import ThreadedHerd, fees
from tests.support.fake_node import FakeNode, Script
from tests.support.servers import RunningServer

PROMPT = "one two three four"
_FORWARDED = ("Authorization", "Content-Type", "Idempotency-Key", "X-Llamakit-Bid")


class DroppingProxy:
    """Forwards to the router, and for the first `drops` requests hangs up after the router has answered.

    That is the worst moment for a client: the request was served and settled, the answer never arrived.
    """

    def __init__(self, target: str, drops: int = 1) -> None:
        self.target = target
        self.drops = drops
        self.keys: list[str | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        self.keys.append(request.headers.get("Idempotency-Key"))
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED}
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(
                request.method, self.target + request.path_qs, content=await request.read(), headers=headers
            )
        if self.drops > 0:
            self.drops -= 1
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=204)
        kept = {
            k: v for k, v in answer.headers.items() if k.lower().startswith(("content-type", "x-llamakit", "retry"))
        }
        return web.Response(body=answer.content, status=answer.status_code, headers=kept)


def test_a_call_retried_after_a_dropped_answer_is_charged_once(
    herd: ThreadedHerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_retry, "sleep", lambda seconds: None)
    node = herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    herd.start()
    client = herd.client()
    proxy = DroppingProxy(herd.url)
    server = herd.loop.run(RunningServer(proxy.app()).start())
    try:
        with sdk.Client(url=server.url, api_key=client._config.api_key, usage_log=None) as through_proxy:
            result = through_proxy.generate(PROMPT, max_tokens=5)
    finally:
        herd.loop.run(server.stop())
    assert result.attempts == 2
    assert len(proxy.keys) == 2 and proxy.keys[0] == proxy.keys[1] is not None
    assert result.cost_credits == fees(7, 5)
    assert herd.spent(client) == fees(7, 5), "the retry was charged again"
    assert len(node.received) == 1, "the retry was generated again"
    assert [r["status"] for r in herd.router_usage(client)] == ["ok"]
