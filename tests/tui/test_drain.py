"""`d` drains the selected node and `u` undrains it, each after a confirmation; the router then reports it so."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from textual.widgets import Button

import llamakit.tui
from llamakit.tui import ConfirmDrainScreen, ConfirmUndrainScreen, DashboardApp, HerdTable, RouterStats
from tests.support.fake_node import FakeNode
from tests.support.herd import Herd
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import FixedSource, fixed_snapshot, screen_text, wait_until


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


async def test_undrain_asks_first_and_the_router_gives_the_node_work_again(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", slots=2))
    await herd.add_node(FakeNode("beta", slots=2))
    router = await herd.start()
    assert herd.admin is not None
    beta = next(n["id"] for n in (await herd.admin.get("/admin/nodes")).json()["data"] if n["name"] == "beta")
    assert (await herd.admin.post(f"/admin/nodes/{beta}/drain")).status_code == 200
    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(HerdTable)

        def states() -> dict[str, str]:
            return {n.name: n.state for n in table.nodes.values()}

        await wait_until(pilot, lambda: states() == {"alpha": "ready", "beta": "draining"}, what="beta draining")
        await pilot.press("down")
        assert table.selected_node is not None and table.selected_node.name == "beta"

        # Asked, with Cancel focused, and declined: nothing happens.
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmUndrainScreen), what="the dialog")
        assert "Undrain node beta?" in screen_text(app)
        assert "take new requests again" in screen_text(app)
        focused = app.screen.focused
        assert isinstance(focused, Button) and focused.id == "undrain-no"
        await pilot.press("enter")  # the focused button: Cancel
        await wait_until(pilot, lambda: app.screen is app.dashboard, what="the dialog closed")
        await asyncio.sleep(0.3)
        assert await herd.node_states() == {"alpha": "ready", "beta": "draining"}

        # Asked, and confirmed.
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmUndrainScreen), what="the dialog")
        await pilot.press("y")
        deadline = time.monotonic() + 5
        while (router_states := await herd.node_states()) != {"alpha": "ready", "beta": "ready"}:
            assert time.monotonic() < deadline, router_states
            await pilot.pause(0.05)
        await wait_until(pilot, lambda: states() == {"alpha": "ready", "beta": "ready"}, what="beta ready")
        assert table.selected_node is not None and table.selected_node.name == "beta"


class NoticedApp(DashboardApp):
    """The dashboard, keeping what it told the operator in toasts."""

    CSS_PATH = Path(llamakit.tui.__file__).with_name("dashboard.tcss")  # a subclass's own would be looked up here

    def __init__(self, source: FixedSource) -> None:
        super().__init__(source)
        self.notices: list[str] = []

    def notify(self, message: str, **kwargs: Any) -> None:
        self.notices.append(message)
        super().notify(message, **kwargs)


async def test_undrain_on_a_node_that_is_not_draining_only_says_so() -> None:
    source = FixedSource([fixed_snapshot(nodes=4)])
    app = NoticedApp(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        table = app.query_one(HerdTable)
        assert table.selected_node is not None and table.selected_node.state == "ready"
        await pilot.press("u")
        await pilot.pause(0.2)
        assert app.screen is app.dashboard
        assert app.notices == ["gemma-3-270m-1 is ready, not draining: there is nothing to undrain."]

        # The draining one (third in name order here) undrains after the confirmation, escape cancels it.
        while table.selected_node is None or table.selected_node.state != "draining":
            await pilot.press("down")
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmUndrainScreen), what="the dialog")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.dashboard, what="the dialog closed")
        assert source.undrained == []
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmUndrainScreen), what="the dialog")
        await pilot.click("#undrain-yes")
        await wait_until(pilot, lambda: source.undrained == ["smollm2-135m-instruct-2"], what="undrain asked")
        await wait_until(pilot, lambda: len(app.notices) == 2, what="the notice")
        assert app.notices[1] == "smollm2-135m-instruct-2 is ready: it takes new requests again."
