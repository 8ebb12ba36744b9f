"""The router's stats as the dashboard reads them: SSE, the polling fallback, refusals and parsing."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from llamakit.money.currency import CreditValue
from llamakit.tui import DashboardApp, DrainFailed, RouterRefused, RouterStats, RouterUnreachable, Stats, StatsHistory
from tests.tui.support import NOW, FixedSource, fixed_snapshot, screen_text, wait_until

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


async def test_drain_and_undrain_post_to_the_node_and_report_refusals() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/admin/nodes/127.0.0.1:9000/drain":
            return httpx.Response(200, json={"id": "127.0.0.1:9000", "state": "draining"})
        if request.url.path == "/admin/nodes/127.0.0.1:9000/undrain":
            return httpx.Response(200, json={"id": "127.0.0.1:9000", "state": "ready"})
        return httpx.Response(404, json={"error": {"message": "no node 'ghost' in the herd"}})

    source = RouterStats(URL, "key", transport=httpx.MockTransport(handler))
    assert (await source.drain("127.0.0.1:9000"))["state"] == "draining"
    assert (await source.undrain("127.0.0.1:9000"))["state"] == "ready"
    with pytest.raises(DrainFailed, match="no node 'ghost' in the herd"):
        await source.drain("ghost")
    with pytest.raises(DrainFailed, match="would not undrain 'ghost': 404 no node 'ghost' in the herd"):
        await source.undrain("ghost")


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


def test_accounts_refusals_and_request_fields_parse_and_an_older_router_reads_as_not_reported() -> None:
    stats = Stats.from_json(fixed_snapshot())
    assert stats.accounts is not None and stats.refusals is not None
    bot = next(a for a in stats.accounts if a.name == "trader-bot")
    assert (bot.id, bot.balance, bot.held, bot.spent, bot.requests, bot.refusals) == ("2", 0, 0, 25_000, 92, 5)
    assert stats.refusals.today == 6
    assert list(stats.refusals.by_code.items()) == [("insufficient_funds", 5), ("model_not_found", 1)]
    by_status = {r.status: r for r in stats.requests.recent}
    refused = by_status["insufficient_funds"]
    assert (refused.refused, refused.http_status, refused.queue_ms, refused.ttft_ms) == (True, 402, None, None)
    served = stats.requests.recent[1]
    assert (served.bid, served.queue_ms, served.ttft_ms, served.refused) == ("1.5", 253.0, 96.0, False)

    # An older router: none of the new fields. A newer one with odd values: read as empty, never a failure.
    old = fixed_snapshot()
    del old["accounts"], old["refusals"]
    for record in old["requests"]["recent"]:
        for name in ("bid", "queue_ms", "ttft_ms", "http_status", "user"):
            record.pop(name, None)
    older = Stats.from_json(old)
    assert older.accounts is None and older.refusals is None
    assert {(r.bid, r.queue_ms, r.ttft_ms, r.http_status) for r in older.requests.recent} == {("", None, None, None)}
    odd = Stats.from_json(
        {
            "accounts": [{"name": "a", "balance": "lots", "last_seen": "never"}, 7],
            "refusals": {"today": None, "by_status": {"x": "y"}},
            "requests": {"recent": [{"bid": 2, "http_status": True, "queue_ms": "1"}]},
        }
    )
    assert odd.accounts is not None and [(a.name, a.balance, a.last_seen) for a in odd.accounts] == [("a", 0, None)]
    assert odd.refusals is not None and odd.refusals.today == 0 and dict(odd.refusals.by_code) == {"x": 0}
    record = odd.requests.recent[0]
    assert (record.bid, record.http_status, record.queue_ms) == ("2", None, None)


def test_the_credit_value_and_costs_parse_and_an_older_router_has_credits_only() -> None:
    stats = Stats.from_json(fixed_snapshot())
    assert stats.money == CreditValue(Decimal("0.000001"), "USD")
    assert [r.cost_credits for r in stats.requests.recent][:2] == [0, 159]
    old = fixed_snapshot()
    for name in ("currency", "credit_value", "credit_value_exact"):
        del old[name]
    for record in old["requests"]["recent"]:
        record["cost"] = record.pop("cost_credits")  # an older router's cost was the credits
        del record["currency"]
    older = Stats.from_json(old)
    assert older.money is None and [r.cost_credits for r in older.requests.recent][:2] == [0, 159]
    odd = Stats.from_json({"currency": "dollars", "credit_value": -1})
    assert odd.money is None


async def test_an_older_router_shows_credits_without_a_price() -> None:
    old = fixed_snapshot()
    for name in ("currency", "credit_value", "credit_value_exact"):
        del old[name]
    app = DashboardApp(FixedSource([old]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="a snapshot shown")
        screen = screen_text(app)
        assert "earned           1,234,567" in screen and "in USD" not in screen and "credits · 1 =" not in screen


def test_history_spans_the_last_minutes_in_fixed_buckets() -> None:
    history = StatsHistory(window=60, step=10)
    for k, depth in enumerate([1, 5, 2]):
        history.add(Stats.from_json(fixed_snapshot(at=NOW + 10 * k, depth=depth)))
    assert history.queue_values("smollm2-135m-instruct") == [0, 0, 0, 1, 5, 2]
    history.add(Stats.from_json(fixed_snapshot(at=NOW + 100, depth=7)))
    assert history.queue_values("smollm2-135m-instruct") == [0, 0, 0, 0, 0, 7]
    assert history.queue_values("unknown-model") == [0] * 6
