"""The router goes away and comes back: the dashboard says so plainly, greys the last data, and recovers."""

from __future__ import annotations

from pathlib import Path

import httpx

from llamakit.tui import DashboardApp, HerdTable, RouterStats, StatusBanner
from tests.support.fake_node import FakeNode
from tests.support.servers import RunningServer
from tests.tui.conftest import ADMIN_KEY, RestartableRouter
from tests.tui.support import screen_text, wait_until


async def complete(router: RestartableRouter, api_key: str) -> int:
    """One paid request; returns what it cost."""
    async with httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {api_key}"}) as client:
        resp = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hello", "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    return int(resp.headers["X-Llamakit-Cost-Credits"])


async def test_banner_while_the_router_is_down_and_recovery_when_it_is_back(tmp_path: Path) -> None:
    node_server = await RunningServer(FakeNode("alpha", slots=2).app()).start()
    router = RestartableRouter(tmp_path / "ledger.db", [node_server.url])
    await router.start()
    admin = httpx.AsyncClient(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    try:
        created = await admin.post("/admin/accounts", json={"name": "alice", "deposit": 10_000})
        api_key = created.json()["api_key"]
        app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2), retry_max=0.5)
        async with app.run_test(size=(120, 40)) as pilot:
            banner = app.query_one(StatusBanner)

            def alpha_ready() -> bool:
                return app.shown is not None and [(n.name, n.state) for n in app.shown.nodes] == [("alpha", "ready")]

            await wait_until(pilot, alpha_ready, what="alpha ready")
            cost = await complete(router, api_key)
            await wait_until(pilot, lambda: app.shown is not None and app.shown.fees.earned == cost, what="fees")
            assert not banner.display

            await router.stop()
            await wait_until(pilot, lambda: banner.display, what="the banner")
            last = app.shown
            assert last is not None
            screen = screen_text(app)
            assert f"Router unreachable at {router.url}" in screen, screen
            assert "Showing the last data" in screen
            assert app.dashboard.has_class("-stale")
            # The last data stays on screen, and nothing newer arrives from nowhere.
            await pilot.pause(0.6)
            assert app.shown is last
            assert banner.display
            assert [n.name for n in app.query_one(HerdTable).nodes.values()] == ["alpha"]

            await router.start()  # same port, same SQLite ledger
            await wait_until(pilot, lambda: not banner.display, what="the banner gone")
            assert not app.dashboard.has_class("-stale")
            assert app.shown is not None and app.shown.time > last.time
            assert app.shown.uptime < last.uptime + 1  # a new router, not the old snapshot
            await wait_until(pilot, alpha_ready, what="alpha ready again")
            assert app.shown.fees.earned == cost  # the ledger kept what was earned
            more = await complete(router, api_key)
            await wait_until(
                pilot, lambda: app.shown is not None and app.shown.fees.earned == cost + more, what="new fees"
            )
            assert "Router unreachable" not in screen_text(app)
    finally:
        await admin.aclose()
        await router.stop()
        await node_server.stop()
