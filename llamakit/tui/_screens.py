"""The dashboard screen, and the two dialogs over it: help, and the confirmation before draining a node."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Label, Static

from llamakit.tui._stats import NodeStats, Stats, StatsHistory
from llamakit.tui._widgets import AgentsTable, FeesPanel, HerdTable, QueuePanel, RequestsLog, StatusBanner

__all__ = ["ConfirmDrainScreen", "DashboardScreen", "HelpScreen"]


class DashboardScreen(Screen[None]):
    """Herd on top; queue, fees and agents in the middle; the request log below."""

    problem: var[str | None] = var(None, init=False)
    """Why the router cannot be reached, or None while it can; while set, the last data is shown greyed."""

    def compose(self) -> ComposeResult:
        yield Header(icon="≡")
        yield StatusBanner(id="banner")
        yield HerdTable(id="herd", classes="panel")
        with Horizontal(id="middle"):
            yield QueuePanel(id="queue", classes="panel")
            yield FeesPanel(id="fees", classes="panel")
            yield AgentsTable(id="agents", classes="panel")
        yield RequestsLog(id="requests", classes="panel")
        yield Footer()

    def __init__(self) -> None:
        super().__init__()
        self._ready = False
        self._pending: tuple[Stats, StatsHistory] | None = None

    def on_mount(self) -> None:
        titles = {"herd": "Herd", "queue": "Queue", "fees": "Fees", "agents": "Agents", "requests": "Requests"}
        for widget_id, title in titles.items():
            self.query_one(f"#{widget_id}").border_title = title
        self.query_one(HerdTable).focus()
        self._ready = True
        self.watch_problem(self.problem)
        if self._pending is not None:
            self.show(*self._pending)

    def show(self, stats: Stats, history: StatsHistory) -> None:
        if not self._ready:  # the first snapshot can come before the panels exist
            self._pending = (stats, history)
            return
        self._pending = None
        self.query_one(HerdTable).show(stats)
        self.query_one(QueuePanel).show(stats, history)
        self.query_one(FeesPanel).show(stats, history)
        self.query_one(AgentsTable).show(stats)
        self.query_one(RequestsLog).show(stats)
        herd = self.query_one(HerdTable)
        ready = sum(1 for n in stats.nodes if n.state == "ready")
        herd.border_subtitle = f"{len(stats.nodes)} nodes · {ready} ready"

    def watch_problem(self, problem: str | None) -> None:
        if not self._ready:
            return
        self.query_one(StatusBanner).show_problem(problem)
        self.set_class(problem is not None, "-stale")

    @property
    def selected_node(self) -> NodeStats | None:
        return self.query_one(HerdTable).selected_node


class HelpScreen(ModalScreen[None]):
    """The keys, and what the panels show."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]

    TEXT = """\
[b]llamakit-tui[/b] — the operator's live view of the router and its herd

[b]q[/b]       quit
[b]p[/b]       pause / resume the display (data keeps arriving)
[b]d[/b]       drain the selected node (asks first): it finishes its work and takes no more
[b]↑ ↓[/b]     select a node
[b]?[/b]       this help (escape closes it)

[b]Herd[/b]      state: ready · busy (no free slot) · draining · down
[b]Queue[/b]     requests waiting per model, the last 5 minutes, the oldest wait
[b]Fees[/b]      credits charged in total and over the last minute
[b]Agents[/b]    agent accounts' outcome events: requests, buy, skip, error
[b]Requests[/b]  the latest finished requests, newest on top"""

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static(self.TEXT, id="help-text")
            yield Label("press escape to close", classes="dialog--hint")


class ConfirmDrainScreen(ModalScreen[bool]):
    """Asks before draining: a drained node finishes what it has and takes nothing new."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Drain"),
        Binding("n,escape", "cancel", "Cancel"),
    ]

    def __init__(self, node: NodeStats) -> None:
        super().__init__()
        self.node = node

    def compose(self) -> ComposeResult:
        node = self.node
        busy = f"{node.busy} of {node.slots} slots busy"
        with Vertical(id="drain-dialog", classes="dialog"):
            yield Label(f"Drain node [b]{node.name}[/b]?", id="drain-question")
            yield Label(
                f"It serves {', '.join(node.models) or 'no model'} and has {busy}. It will finish that work "
                "and take no new requests until an operator undrains it.",
                id="drain-detail",
            )
            with Horizontal(classes="dialog--buttons"):
                yield Button("Drain (y)", variant="error", id="drain-yes")
                yield Button("Cancel (n)", variant="primary", id="drain-no")

    def on_mount(self) -> None:
        self.query_one("#drain-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "drain-yes")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)
