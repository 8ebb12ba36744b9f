"""The dashboard screen, and the dialogs over it: help, and the confirmations before draining or undraining a node."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Label, Static
from textual.widgets.button import ButtonVariant

from llamakit.text import shown
from llamakit.tui._stats import NodeStats, Stats, StatsHistory
from llamakit.tui._widgets import (
    AccountsTable,
    AgentsTable,
    FeesPanel,
    HerdTable,
    KeysTable,
    QueuePanel,
    RefusalsPanel,
    RequestsLog,
    StatusBanner,
)

__all__ = ["ConfirmDrainScreen", "ConfirmUndrainScreen", "DashboardScreen", "HelpScreen", "KeysScreen"]


class DashboardScreen(Screen[None]):
    """Herd on top; queue, fees and agents; accounts and refusals; the request log at the bottom."""

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
        with Horizontal(id="lower"):
            yield AccountsTable(id="accounts", classes="panel")
            yield RefusalsPanel(id="refusals", classes="panel")
        yield RequestsLog(id="requests", classes="panel")
        yield Footer()

    def __init__(self) -> None:
        super().__init__()
        self._ready = False
        self._pending: tuple[Stats, StatsHistory] | None = None

    def on_mount(self) -> None:
        titles = {
            "herd": "Herd",
            "queue": "Queue",
            "fees": "Fees",
            "agents": "Agents",
            "accounts": "Accounts",
            "refusals": "Refusals",
            "requests": "Requests",
        }
        for widget_id, title in titles.items():
            self.query_one(f"#{widget_id}").border_title = title
        self.query_one(AccountsTable).border_subtitle = "spent, requests, refused: today (UTC)"
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
        accounts = self.query_one(AccountsTable)
        accounts.show(stats)
        if stats.accounts is None:
            accounts.border_subtitle = "not reported by this router"
        else:
            accounts.border_subtitle = "spent, requests, refused: today (UTC)"
        self.query_one(RefusalsPanel).show(stats)
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
[b]d[/b]       drain the selected node (asks first): it finishes, takes no more
[b]u[/b]       undrain the selected node (asks first): it takes requests again
[b]k[/b]       the API keys that have limits: spend against each cap, rates, expiry
[b]↑ ↓[/b]     select a node
[b]?[/b]       this help (escape closes it)

[b]Herd[/b]      state: ready · busy (no free slot) · draining · down
[b]Queue[/b]     requests waiting per model, the last 5 minutes, the oldest wait
[b]Fees[/b]      credits charged in total (and its price) and over the last minute
[b]Agents[/b]    agent accounts' outcome events: requests, buy, skip, error
[b]Accounts[/b]  balance, credits held now; spent, requests, refused today (UTC)
[b]Refusals[/b]  refused today (UTC); this router's by error code and HTTP status
[b]Requests[/b]  the latest, refused ones too, newest on top: bid, queue wait,
          time to first token (streams), latency, tokens p+c, credits, status"""

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog", classes="dialog"):
            yield Static(self.TEXT, id="help-text")
            yield Label("press escape to close", classes="dialog--hint")


class KeysScreen(ModalScreen[None]):
    """The API keys that have a limit, and how near each is to them; follows the dashboard's snapshots."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,k", "dismiss", "Close"),
    ]

    def __init__(self, stats: Stats | None) -> None:
        super().__init__()
        self._stats = stats

    def compose(self) -> ComposeResult:
        with Vertical(id="keys-dialog", classes="dialog"):
            yield Label("API keys with limits: spent / cap (credits, open holds included)", classes="keys--title")
            yield KeysTable(id="keys-table")
            yield Label("press escape to close · set limits with: llamakit keys limit KEY --rpm 60 …",
                        classes="dialog--hint")  # fmt: skip

    def on_mount(self) -> None:
        self.show(self._stats)
        self.query_one(KeysTable).focus()

    def show(self, stats: Stats | None) -> None:
        """Show the keys of a snapshot (one from a router that does not report keys shows none, and says so)."""
        self._stats = stats
        table = self.query_one(KeysTable)
        if stats is not None:
            table.show(stats)
        if stats is None or stats.keys is None:
            table.border_subtitle = "not reported by this router"
        else:
            table.border_subtitle = f"{len(stats.keys)} keys with limits"


class _ConfirmNodeScreen(ModalScreen[bool]):
    """Asks one question about one node; y confirms, n or escape cancels, and Cancel has the focus."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Confirm"),
        Binding("n,escape", "cancel", "Cancel"),
    ]
    ACTION = ""
    """The word on the button and in the dialog's ids: `drain`, `undrain`."""
    VARIANT: ClassVar[ButtonVariant] = "primary"

    def __init__(self, node: NodeStats) -> None:
        super().__init__()
        self.node = node

    def detail(self) -> str:
        raise NotImplementedError

    def compose(self) -> ComposeResult:
        action = self.ACTION
        with Vertical(id=f"{action}-dialog", classes="dialog node-dialog"):
            yield Label(
                f"{action.capitalize()} node [b]{escape(shown(self.node.name))}[/b]?", classes="node-dialog--question"
            )
            yield Label(Text(shown(self.detail())), classes="node-dialog--detail")  # model names, as the node gave them
            with Horizontal(classes="dialog--buttons"):
                yield Button(f"{action.capitalize()} (y)", variant=self.VARIANT, id=f"{action}-yes")
                yield Button("Cancel (n)", variant="primary", id=f"{action}-no")

    def on_mount(self) -> None:
        self.query_one(f"#{self.ACTION}-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == f"{self.ACTION}-yes")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)

    def _serves(self) -> str:
        node = self.node
        return f"It serves {', '.join(node.models) or 'no model'} and has {node.busy} of {node.slots} slots busy."


class ConfirmDrainScreen(_ConfirmNodeScreen):
    """Asks before draining: a drained node finishes what it has and takes nothing new."""

    ACTION = "drain"
    VARIANT = "error"

    def detail(self) -> str:
        return f"{self._serves()} It will finish that work and take no new requests until an operator undrains it (u)."


class ConfirmUndrainScreen(_ConfirmNodeScreen):
    """Asks before undraining: the node takes new requests again at once."""

    ACTION = "undrain"
    VARIANT = "success"

    def detail(self) -> str:
        return f"{self._serves()} It will take new requests again at once, as a ready node."
