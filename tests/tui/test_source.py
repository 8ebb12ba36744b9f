"""The router's stats as the dashboard reads them: SSE, the polling fallback, refusals and parsing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from llamakit.tui import DrainFailed, RouterRefused, RouterStats, RouterUnreachable, Stats, StatsHistory
from tests.tui.support import NOW, fixed_snapshot

URL = "http://router.test:8080"


def sse(*snapshots: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(s).encode() + b"\n\n" for s in snapshots)


async def take(source: RouterStats, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async for snapshot in source.follow():
        got.append(snapshot)
        if len(got) == count:
            break
    return got


async def test_the_stream_is_read_with_the_admin_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=sse(fixed_snapshot(at=NOW), fixed_snapshot(at=NOW + 1)))

    source = RouterStats(URL, "key-1", interval=0.5, transport=httpx.MockTransport(handler))
    got = await take(source, 2)
    assert [s["time"] for s in got] == [NOW, NOW + 1]
    assert seen[0].url.path == "/admin/stats/stream"
    assert seen[0].url.params["interval"] == "0.5"
    assert seen[0].headers["Authorization"] == "Bearer key-1"


async def test_a_router_without_the_stream_is_polled() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/admin/stats/stream":
            return httpx.Response(404, json={"error": {"message": "not found"}})
        return httpx.Response(200, json=fixed_snapshot(at=NOW + len(paths)))

    source = RouterStats(URL, "key", interval=0.1, transport=httpx.MockTransport(handler))
    got = await take(source, 3)
    assert len(got) == 3
    assert paths == ["/admin/stats/stream", "/admin/stats", "/admin/stats", "/admin/stats"]
    assert not source.streaming


async def test_a_refused_key_says_which_setting_to_check() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "a valid admin key is required"}})

    source = RouterStats(URL, "wrong", transport=httpx.MockTransport(handler))
    with pytest.raises(RouterRefused, match="LLAMAKIT_ADMIN_KEY"):
        await take(source, 1)


async def test_no_connection_is_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    source = RouterStats(URL, "key", transport=httpx.MockTransport(handler))
    with pytest.raises(RouterUnreachable, match=f"Router unreachable at {URL}: cannot connect"):
        await take(source, 1)


async def test_a_stream_that_ends_or_sends_junk_is_unreachable() -> None:
    def ends(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(fixed_snapshot()))

    with pytest.raises(RouterUnreachable, match="closed the stats stream"):
        await take(RouterStats(URL, "key", transport=httpx.MockTransport(ends)), 5)

    def junk(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data: <html>\n\n")

    with pytest.raises(RouterUnreachable, match="not JSON"):
        await take(RouterStats(URL, "key", transport=httpx.MockTransport(junk)), 1)


async def test_drain_posts_to_the_node_and_reports_refusals() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/admin/nodes/127.0.0.1:9000/drain":
            return httpx.Response(200, json={"id": "127.0.0.1:9000", "state": "draining"})
        return httpx.Response(404, json={"error": {"message": "no node 'ghost' in the herd"}})

    source = RouterStats(URL, "key", transport=httpx.MockTransport(handler))
    assert (await source.drain("127.0.0.1:9000"))["state"] == "draining"
    with pytest.raises(DrainFailed, match="no node 'ghost' in the herd"):
        await source.drain("ghost")


def test_a_snapshot_parses_and_tolerates_missing_or_odd_fields() -> None:
    stats = Stats.from_json(fixed_snapshot(nodes=4))
    assert [n.shown_state for n in stats.nodes] == ["busy", "ready", "draining", "down"]
    assert stats.queue.models["smollm2-135m-instruct"].depth == 3
    bot = stats.agents[0]
    assert (bot.account, bot.requests, bot.buys, bot.skips, bot.errors, bot.position, bot.pnl) == (
        "trader-bot", 40, 22, 15, 3, 7.0, 182.5,
    )  # fmt: skip
    odd = Stats.from_json({"nodes": [{"name": "n", "slots": "two"}, "junk"], "queue": None, "new_field": 1})
    assert [(n.name, n.slots, n.state) for n in odd.nodes] == [("n", 0, "unknown")]
    assert odd.queue.total == 0 and odd.agents == () and odd.books_balanced is None
    with pytest.raises(ValueError, match="JSON object"):
        Stats.from_json([1, 2])


def test_history_spans_the_last_minutes_in_fixed_buckets() -> None:
    history = StatsHistory(window=60, step=10)
    for k, depth in enumerate([1, 5, 2]):
        history.add(Stats.from_json(fixed_snapshot(at=NOW + 10 * k, depth=depth)))
    assert history.queue_values("smollm2-135m-instruct") == [0, 0, 0, 1, 5, 2]
    history.add(Stats.from_json(fixed_snapshot(at=NOW + 100, depth=7)))
    assert history.queue_values("smollm2-135m-instruct") == [0, 0, 0, 0, 0, 7]
    assert history.queue_values("unknown-model") == [0] * 6
