"""`d` drains the selected node, after a confirmation; the router then reports it draining."""

from __future__ import annotations

import asyncio
import time

from llamakit.tui import ConfirmDrainScreen, DashboardApp, HerdTable, RouterStats
from tests.router.conftest import Herd
from tests.router.fake_node import FakeNode
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import screen_text, wait_until


async def test_drain_asks_first_and_the_router_drains_the_selected_node(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", slots=2))
    await herd.add_node(FakeNode("beta", slots=2))
    router = await herd.start()
    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(HerdTable)

        def states() -> dict[str, str]:
            return {n.name: n.state for n in table.nodes.values()}

        await wait_until(pilot, lambda: states() == {"alpha": "ready", "beta": "ready"}, what="two ready nodes")
        await pilot.press("down")
        assert table.selected_node is not None and table.selected_node.name == "beta"

        # Asked, and declined: nothing happens.
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDrainScreen), what="the dialog")
        assert "Drain node beta?" in screen_text(app)
        await pilot.press("n")
        await wait_until(pilot, lambda: app.screen is app.dashboard, what="the dialog closed")
        await asyncio.sleep(0.3)
        assert await herd.node_states() == {"alpha": "ready", "beta": "ready"}

        # Asked, and confirmed.
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDrainScreen), what="the dialog")
        await pilot.press("y")
        deadline = time.monotonic() + 5
        while (router_states := await herd.node_states()) != {"alpha": "ready", "beta": "draining"}:
            assert time.monotonic() < deadline, router_states
            await pilot.pause(0.05)
        await wait_until(pilot, lambda: states() == {"alpha": "ready", "beta": "draining"}, what="beta draining")
        assert "draining" in screen_text(app)
        # Still selected after the rows refreshed.
        assert table.selected_node is not None and table.selected_node.name == "beta"
