"""`DashboardApp`: follows the router's stats in a worker and shows them; keys to pause, drain, undrain and get help."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import suppress
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.reactive import var

from llamakit.tui._format import clock
from llamakit.tui._screens import (
    AccountsScreen,
    ConfirmDrainScreen,
    ConfirmUndrainScreen,
    DashboardScreen,
    HelpScreen,
    KeysScreen,
    NodesScreen,
)
from llamakit.tui._source import DrainFailed, StatsError, StatsSource
from llamakit.tui._stats import NodeStats, Stats, StatsHistory

__all__ = ["DashboardApp"]


class DashboardApp(App[None]):
    """The operator's live dashboard of one router.

    `source` gives the snapshots (the router's admin stats, or fixed ones in tests). When it fails the
    dashboard keeps the last data, greyed, under a banner that says why, and reconnects by itself with
    a back-off from `retry_min` to `retry_max` seconds.
    """

    CSS_PATH = "dashboard.tcss"
    TITLE = "llamakit"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("d", "drain", "Drain node"),
        Binding("u", "undrain", "Undrain node"),
        Binding("k", "keys", "Keys"),
        Binding("a", "accounts", "Accounts", show=False),
        Binding("n", "nodes", "Nodes", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    stats: var[Stats | None] = var(None, init=False)
    """The newest snapshot received (shown unless paused)."""
    paused: var[bool] = var(False, init=False)
    problem: var[str | None] = var(None, init=False)
    """Why there are no fresh snapshots, or None while they arrive."""

    def __init__(
        self,
        source: StatsSource,
        *,
        retry_min: float = 0.25,
        retry_max: float = 2.0,
        exit_on_sigterm: bool = False,
        exit_with_parent: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self.retry_min, self.retry_max = retry_min, retry_max
        self.exit_on_sigterm = exit_on_sigterm
        # Drawn in a browser by `llamakit-tui --serve`: a server that is killed cannot tell its pages' dashboards
        # to quit, and their input just ends, so each one watches for its parent to go.
        self.exit_with_parent = exit_with_parent
        self.history = StatsHistory()
        self.shown: Stats | None = None
        self.updates = 0
        self._dashboard: DashboardScreen | None = None

    @property
    def dashboard(self) -> DashboardScreen:
        if self._dashboard is None:
            self._dashboard = DashboardScreen()
        return self._dashboard

    def get_default_screen(self) -> DashboardScreen:
        return self.dashboard

    def on_mount(self) -> None:
        self._set_sub_title()
        if self.exit_on_sigterm:
            # `llamakit up` runs us in the foreground: a SIGTERM must still stop the herd behind us.
            with suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.exit)
        if self.exit_with_parent:
            parent = os.getppid()
            self.set_interval(1.0, lambda: None if os.getppid() == parent else self.exit())
        self.follow_router()

    def on_unmount(self) -> None:
        if self.exit_on_sigterm:
            with suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)

    @work(exclusive=True, group="stats")
    async def follow_router(self) -> None:
        delay = self.retry_min
        while True:
            try:
                async for data in self.source.follow():
                    self.receive(Stats.from_json(data))
                    delay = self.retry_min
            except StatsError as exc:
                if self.is_running:
                    self.problem = str(exc)
            else:
                if self.is_running:
                    self.problem = f"Router unreachable at {self.source.url}: the stats stream ended."
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    def receive(self, stats: Stats) -> None:
        """Take one snapshot: it feeds the sparklines, and it is shown unless the display is paused."""
        if not self.is_running:  # shutting down: the panels may already be gone
            return
        self.history.add(stats)
        self.problem = None
        self.stats = stats

    def watch_stats(self, stats: Stats | None) -> None:
        if stats is not None and not self.paused:
            self._show(stats)

    def _show(self, stats: Stats) -> None:
        self.dashboard.show(stats, self.history)
        if isinstance(self.screen, KeysScreen):
            self.screen.show(stats)
        self.shown = stats
        self.updates += 1
        self._set_sub_title()

    def watch_paused(self, paused: bool) -> None:
        if not paused and self.stats is not None and self.stats is not self.shown:
            self._show(self.stats)
        self._set_sub_title()

    def watch_problem(self, problem: str | None) -> None:
        if problem is None:
            self.dashboard.problem = None
            return
        if self.shown is None:
            self.dashboard.problem = f"{problem} Reconnecting…"
        else:
            self.dashboard.problem = f"{problem} Showing the last data, from {clock(self.shown.time)}. Reconnecting…"

    def _set_sub_title(self) -> None:
        parts = [self.source.url]
        if self.shown is not None:
            parts.append(f"updated {clock(self.shown.time)}")
        if self.paused:
            parts.append("PAUSED (p resumes)")
        self.sub_title = " · ".join(parts)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The dashboard's own keys do nothing while a dialog is open over it.
        if action in ("toggle_pause", "drain", "undrain", "help", "keys", "accounts", "nodes"):
            return self.screen is self.dashboard
        return True

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_keys(self) -> None:
        self.push_screen(KeysScreen(self.shown, self.source))

    def action_accounts(self) -> None:
        self.push_screen(AccountsScreen(self.source, self._now()))

    def action_nodes(self) -> None:
        self.push_screen(NodesScreen(self.source, self._now()))

    def _now(self) -> float:
        """The router's clock, as of the last snapshot (ages are shown against it)."""
        return self.shown.time if self.shown is not None else time.time()

    def action_drain(self) -> None:
        node = self.dashboard.selected_node
        if node is None:
            self.notify("Select a node in the herd table first (↑ ↓).", severity="warning")
            return
        if node.state == "draining":
            self.notify(f"{node.name} is already draining.")
            return

        def confirmed(drain: bool | None) -> None:
            if drain:
                self.drain_node(node)

        self.push_screen(ConfirmDrainScreen(node), confirmed)

    @work(group="drain")
    async def drain_node(self, node: NodeStats) -> None:
        try:
            reported: dict[str, Any] = await self.source.drain(node.id)
        except DrainFailed as exc:
            self.notify(str(exc), title="Drain failed", severity="error", timeout=8)
            return
        state = reported.get("state", "draining")
        self.notify(f"{node.name} is {state}: it finishes its work and takes no new requests.", title="Drain")

    def action_undrain(self) -> None:
        node = self.dashboard.selected_node
        if node is None:
            self.notify("Select a node in the herd table first (↑ ↓).", severity="warning")
            return
        if node.state != "draining":
            self.notify(f"{node.name} is {node.shown_state}, not draining: there is nothing to undrain.")
            return

        def confirmed(undrain: bool | None) -> None:
            if undrain:
                self.undrain_node(node)

        self.push_screen(ConfirmUndrainScreen(node), confirmed)

    @work(group="drain")
    async def undrain_node(self, node: NodeStats) -> None:
        try:
            reported: dict[str, Any] = await self.source.undrain(node.id)
        except DrainFailed as exc:
            self.notify(str(exc), title="Undrain failed", severity="error", timeout=8)
            return
        state = reported.get("state", "ready")
        self.notify(f"{node.name} is {state}: it takes new requests again.", title="Undrain")
