"""The dashboard screen, and the dialogs over it: help, the keys with limits, every account and every node a page at
a time, and the confirmations before draining or undraining a node."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Input, Label, Static
from textual.widgets.button import ButtonVariant

from llamakit.text import shown
from llamakit.tui._source import Pages, StatsError, StatsSource
from llamakit.tui._stats import AccountStats, KeyStats, NodeStats, Stats, StatsHistory
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

__all__ = [
    "AccountsScreen",
    "ConfirmDrainScreen",
    "ConfirmUndrainScreen",
    "DashboardScreen",
    "HelpScreen",
    "KeysScreen",
    "NodesScreen",
]


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
        counts = stats.counts
        if stats.accounts is None:
            accounts.border_subtitle = "not reported by this router"
        elif counts is not None and counts.accounts > len(stats.accounts):
            # A snapshot carries the day's biggest spenders; `a` pages through every account.
            accounts.border_subtitle = f"top {len(stats.accounts)} of {counts.accounts:,} today (UTC) · a: all"
        else:
            accounts.border_subtitle = "spent, requests, refused: today (UTC)"
        self.query_one(RefusalsPanel).show(stats)
        self.query_one(RequestsLog).show(stats)
        herd = self.query_one(HerdTable)
        ready = sum(1 for n in stats.nodes if n.state == "ready")
        if counts is not None and counts.nodes > len(stats.nodes):
            herd.border_subtitle = f"{len(stats.nodes)} of {counts.nodes:,} nodes · {ready} ready shown · n: all"
        else:
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
[b]a[/b]       every account, a page at a time: search by name, by spend today
[b]n[/b]       every node of the herd, a page at a time, searched by name
[b]↑ ↓[/b]     select a node
[b]?[/b]       this help (escape closes it)

[b]Herd[/b]      state: ready · busy (no free slot) · draining · down
[b]Queue[/b]     requests waiting per model, the last 5 minutes, the oldest wait
[b]Fees[/b]      credits charged in total (and its price) and over the last minute;
          the books, and what the last audit of them found
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
    """The API keys that have a limit, and how near each is to them; follows the dashboard's snapshots, which carry
    the keys of the day's biggest spenders; `m` reads more of them from the router, a page at a time."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,k", "dismiss", "Close"),
        Binding("m", "more", "More keys"),
    ]

    def __init__(self, stats: Stats | None, source: StatsSource | None = None) -> None:
        super().__init__()
        self._stats = stats
        self._pages = source if isinstance(source, Pages) else None
        self._paged: dict[str, KeyStats] = {}
        self._after: str | None = None
        self._more = True

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
        """Show the keys of a snapshot (one from a router that does not report keys shows none, and says so), with
        those read page by page (`m`); the snapshot's are the fresher."""
        self._stats = stats
        table = self.query_one(KeysTable)
        snapshot = {f"{k.account}/{k.prefix}": k for k in (stats.keys or ())} if stats is not None else {}
        keys = {**self._paged, **snapshot}
        if stats is not None or keys:
            table.show_keys(keys.values())
        if (stats is None or stats.keys is None) and not self._paged:
            table.border_subtitle = "not reported by this router"
        elif self._pages is not None and self._more:
            table.border_subtitle = f"{len(keys)} keys with limits · m: more"
        else:
            table.border_subtitle = f"{len(keys)} keys with limits"

    def action_more(self) -> None:
        if self._pages is not None and self._more:
            self.read_more()

    @work(exclusive=True, group="keys")
    async def read_more(self) -> None:
        assert self._pages is not None
        params = {"limit": "100"} | ({"after": self._after} if self._after else {})
        try:
            page = await self._pages.page("/admin/keys", params)
        except StatsError as exc:
            self.notify(str(exc), title="Keys", severity="error")
            return
        for item in page["data"]:
            if isinstance(item, Mapping):
                key = KeyStats.from_json(item)
                self._paged[f"{key.account}/{key.prefix}"] = key
        self._after, self._more = page.get("next_after"), bool(page.get("has_more"))
        if self.is_mounted:
            self.show(self._stats)


class _PagedScreen(ModalScreen[None]):
    """A list the router pages through (`PATH`): a search by name, and `m` (or the end of the table) for more."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("m", "more", "More"),
    ]
    PATH = ""
    TITLE = ""
    WHAT = ""

    def __init__(self, source: StatsSource, now: float) -> None:
        super().__init__()
        self._pages = source if isinstance(source, Pages) else None
        self.now = now
        self.items: list[Any] = []
        self._after: str | None = None
        self.has_more = False
        self.search = ""

    def table(self) -> Any:
        raise NotImplementedError

    def params(self) -> dict[str, str]:
        return {"limit": "100"} | ({"search": self.search} if self.search else {})

    def parse(self, item: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def render_items(self) -> None:
        raise NotImplementedError

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog paged-dialog"):
            yield Label(self.TITLE, classes="keys--title")
            yield Input(placeholder=f"search {self.WHAT} by name, then enter", classes="paged--search")
            yield self.table()
            yield Label("", classes="dialog--hint paged--status")

    def on_mount(self) -> None:
        self.query_one(Input).focus()
        self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.search = event.value.strip()
        self.reload()

    def action_more(self) -> None:
        if self.has_more:
            self.read(more=True)

    def reload(self) -> None:
        self.items, self._after, self.has_more = [], None, False
        self.read(more=False)

    @work(exclusive=True, group="page")
    async def read(self, *, more: bool) -> None:
        status = self.query_one(".paged--status", Label)
        if self._pages is None:
            status.update("this dashboard's source does not page: the snapshot's are on the dashboard")
            return
        params = self.params() | ({"after": self._after} if more and self._after else {})
        try:
            page = await self._pages.page(self.PATH, params)
        except StatsError as exc:
            status.update(Text(str(exc), style="red"))
            return
        self.items += [self.parse(item) for item in page["data"] if isinstance(item, Mapping)]
        self._after, self.has_more = page.get("next_after"), bool(page.get("has_more"))
        self.render_items()
        found = f"{len(self.items):,} {self.WHAT}" + (f" matching {self.search!r}" if self.search else "")
        status.update(f"{found}{' · m: more' if self.has_more else ''} · escape closes")


class AccountsScreen(_PagedScreen):
    """Every account, a page at a time: by name (searched by name), or by what it spent today (`o`)."""

    BINDINGS: ClassVar[list[BindingType]] = [*_PagedScreen.BINDINGS, Binding("o", "order", "Order")]
    PATH = "/admin/accounts"
    TITLE = "Accounts: balance, held; spent, requests, refused today (UTC)"
    WHAT = "accounts"

    def __init__(self, source: StatsSource, now: float) -> None:
        super().__init__(source, now)
        self.order = "name"
        self._table = AccountsTable(classes="paged--table")

    def table(self) -> AccountsTable:
        return self._table

    def params(self) -> dict[str, str]:
        return super().params() | {"order": self.order}

    def parse(self, item: Mapping[str, Any]) -> AccountStats:
        today = item.get("today")
        flat = {**item, **(today if isinstance(today, Mapping) else {})}
        return AccountStats.from_json(flat)

    def render_items(self) -> None:
        self._table.show_accounts(self.items, self.now)
        self._table.border_subtitle = "by name · o: by spend today" if self.order == "name" else (
            "by spend today · o: by name")  # fmt: skip

    def action_order(self) -> None:
        self.order = "spent_today" if self.order == "name" else "name"
        self.reload()


class NodesScreen(_PagedScreen):
    """Every node of the herd by name, a page at a time, searched by name."""

    PATH = "/admin/nodes"
    TITLE = "Nodes of the herd"
    WHAT = "nodes"

    def __init__(self, source: StatsSource, now: float) -> None:
        super().__init__(source, now)
        self._table = HerdTable(classes="paged--table")

    def table(self) -> HerdTable:
        return self._table

    def parse(self, item: Mapping[str, Any]) -> NodeStats:
        return NodeStats.from_json(item)

    def render_items(self) -> None:
        self._table.show_nodes(self.items, self.now)


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
