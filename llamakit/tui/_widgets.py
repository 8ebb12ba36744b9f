"""The dashboard's panels: each one shows one part of a `Stats` snapshot and can be used on its own.

Tables update cell by cell when only values change, so a herd of a hundred nodes updates in milliseconds
and the cursor stays on the selected node.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Label, Sparkline, Static
from textual.widgets.data_table import CellDoesNotExist

from llamakit.money.currency import format_price
from llamakit.text import shown, unsafe_at
from llamakit.tui._format import (
    age,
    bid,
    clock,
    clock_day,
    credits,
    load_bar,
    millis,
    request_id,
    signed,
    state_text,
    wait,
)
from llamakit.tui._stats import (
    AccountStats,
    BatchStats,
    KeyStats,
    NodeStats,
    RequestRecord,
    SpendStats,
    Stats,
    StatsHistory,
)

__all__ = [
    "AccountsTable",
    "AgentsTable",
    "FeesPanel",
    "HerdTable",
    "KeysTable",
    "QueuePanel",
    "RefusalsPanel",
    "RequestsLog",
    "StatusBanner",
]

Cell = str | Text


class Column(NamedTuple):
    key: str
    label: str
    width: int
    numeric: bool = False  # right-aligned, header too


def _right(value: str) -> Text:
    return Text(value, justify="right")


def _natural(name: str) -> tuple[Any, ...]:
    """`node-2` before `node-10`."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower()))


def _crop(value: str, width: int) -> str:
    """`value` cut to `width` with an ellipsis, so a cut name does not pass for a whole one."""
    return value if len(value) <= width else value[: width - 1] + "…"


def _set(label: Static, content: str | Text) -> None:
    """Change a fixed-size label's text only when it differs, and without a new layout (the size is fixed)."""
    if label.content != content:
        label.update(content, layout=False)


class StatusBanner(Static):
    """One plain line across the top when the router cannot be reached; hidden otherwise."""

    DEFAULT_CSS = """
    StatusBanner {
        display: none;
        width: 100%;
        height: auto;
        padding: 0 1;
        background: $error;
        color: $text;
        text-style: bold;
    }
    StatusBanner.-shown {
        display: block;
    }
    """

    def show_problem(self, problem: str | None) -> None:
        self.set_class(problem is not None, "-shown")
        self.update(Text(problem or ""))  # an error's text may quote what the router or a proxy sent


def _plain(cell: Cell) -> Cell:
    """A cell as typed: DataTable reads a str as Rich markup, so a name with brackets in it (an account, or a
    model a client made up) would be restyled, or crash the dashboard ("closing tag '[/x]' …"); and its
    control characters escaped, since an escape sequence in a name would clear or recolour the screen."""
    if isinstance(cell, str):
        return Text(shown(cell))
    return (
        Text(shown(cell.plain), style=cell.style, justify=cell.justify) if unsafe_at(cell.plain) is not None else cell
    )


class _KeyedTable(DataTable[Cell]):
    """A table whose rows have stable keys and are updated in place when only their values change."""

    COLUMNS: Sequence[Column] = ()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self._order: list[str] = []
        self._cells: dict[str, tuple[Cell, ...]] = {}
        # Columns exist from the start, so rows may arrive before the table is mounted.
        for column in self.COLUMNS:
            label = Text(column.label, justify="right" if column.numeric else "left")
            self.add_column(label, key=column.key, width=column.width)

    @property
    def selected_key(self) -> str | None:
        if not self.row_count or self.cursor_row < 0:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return row_key.value

    def set_rows(self, rows: Iterable[tuple[str, tuple[Cell, ...]]]) -> None:
        """Show `rows` (key, cells) in this order; when the keys or their order change the table is rebuilt, and
        `_rebuilt` puts the cursor or the view back."""
        rows = list(rows)
        order = [key for key, _ in rows]
        if order != self._order:
            selected = self.selected_key
            top = self._top_key()
            self.clear()
            for key, cells in rows:
                self.add_row(*map(_plain, cells), key=key)
            self._rebuilt(order, selected=selected, top=top)
        else:
            columns = [column.key for column in self.COLUMNS]
            for key, cells in rows:
                old = self._cells.get(key, ())
                for column, new, before in zip(columns, cells, old, strict=False):
                    if new != before:
                        self.update_cell(key, column, _plain(new))
        self._order = order
        self._cells = dict(rows)

    def _top_key(self) -> str | None:
        """The key of the first row in view (rows are one line high), or None when the table is empty."""
        index = int(self.scroll_y)
        return self._order[index] if 0 <= index < len(self._order) else None

    def _rebuilt(self, order: list[str], *, selected: str | None, top: str | None) -> None:
        """After a rebuild (which leaves the cursor and the view on the first row): the cursor goes back to the
        row that was `selected`, wherever it moved to, so the node or account the operator picked stays picked."""
        if selected in order:
            self.move_cursor(row=order.index(selected), animate=False)


class HerdTable(_KeyedTable):
    """One row per node: name, models, state, slots busy of total with a load bar, tok/s, requests, fees, last seen."""

    COLUMNS = (
        Column("name", "Node", 23),
        Column("models", "Models", 22),
        Column("state", "State", 8),
        Column("load", "Busy/slots", 12),
        Column("tps", "tok/s", 6, numeric=True),
        Column("requests", "Requests", 8, numeric=True),
        Column("fees", "Fees earned", 11, numeric=True),
        Column("seen", "Last seen", 9, numeric=True),
    )

    DEFAULT_CSS = """
    HerdTable {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.nodes: dict[str, NodeStats] = {}

    @property
    def selected_node(self) -> NodeStats | None:
        key = self.selected_key
        return self.nodes.get(key) if key is not None else None

    def show(self, stats: Stats) -> None:
        self.show_nodes(stats.nodes, stats.time)

    def show_nodes(self, nodes: Iterable[NodeStats], now: float) -> None:
        """These nodes, by name; ages as of `now` (the router's clock)."""
        ordered = sorted(nodes, key=lambda n: _natural(n.name))
        self.nodes = {n.id: n for n in ordered}
        self.set_rows((n.id, self._cells_for(n, now)) for n in ordered)

    @staticmethod
    def _cells_for(node: NodeStats, now: float) -> tuple[Cell, ...]:
        seen = None if node.last_seen is None else now - node.last_seen
        return (
            node.name,
            ", ".join(node.models) or "–",
            state_text(node.shown_state),
            load_bar(node.busy, node.slots, width=6),
            _right(f"{node.tokens_per_second:.1f}"),
            _right(f"{node.requests:,}"),
            _right(credits(node.fees_earned)),
            _right(age(seen)),
        )


class AgentsTable(_KeyedTable):
    """Per agent account: requests, Buy, Skip, Error, position and profit and loss."""

    # No cell padding here (the panel is narrow): number columns are one wider than their header instead.
    COLUMNS = (
        Column("agent", "Agent", 10),
        Column("requests", "Req", 5, numeric=True),
        Column("buy", "Buy", 4, numeric=True),
        Column("skip", "Skip", 5, numeric=True),
        Column("error", "Err", 4, numeric=True),
        Column("position", "Position", 9, numeric=True),
        Column("pnl", "PnL", 9, numeric=True),
    )

    DEFAULT_CSS = """
    AgentsTable {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.cell_padding = 0
        self.show_cursor = False

    def show(self, stats: Stats) -> None:
        rows = []
        for agent in stats.agents:
            error = _right(f"{agent.errors:,}")
            if agent.errors:
                error.stylize("red")
            rows.append(
                (
                    agent.account,
                    (
                        agent.account,
                        _right(f"{agent.requests:,}"),
                        _right(f"{agent.buys:,}"),
                        _right(f"{agent.skips:,}"),
                        error,
                        _right("–" if agent.position is None else f"{agent.position:,g}"),
                        signed(agent.pnl),
                    ),
                )
            )
        self.set_rows(rows)


class AccountsTable(_KeyedTable):
    """Per account: balance, credits held for requests in flight, and today's (UTC) spend, requests, refusals;
    the most recently seen on top."""

    COLUMNS = (
        Column("account", "Account", 13),
        Column("balance", "Balance", 11, numeric=True),
        Column("held", "Held", 8, numeric=True),
        Column("spent", "Spent", 9, numeric=True),
        Column("requests", "Requests", 8, numeric=True),
        Column("refusals", "Refused", 7, numeric=True),
        Column("seen", "Last seen", 9, numeric=True),
    )

    DEFAULT_CSS = """
    AccountsTable {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.show_cursor = False
        self.accounts: dict[str, AccountStats] = {}

    def show(self, stats: Stats) -> None:
        accounts = sorted(stats.accounts or (), key=lambda a: (-(a.last_seen or 0.0), _natural(a.name)))
        self.show_accounts(accounts, stats.time)

    def show_accounts(self, accounts: Iterable[AccountStats], now: float) -> None:
        """These accounts in this order; ages as of `now` (the router's clock)."""
        accounts = list(accounts)
        self.accounts = {a.id: a for a in accounts}
        self.set_rows((a.id, self._cells_for(a, now)) for a in accounts)

    @staticmethod
    def _cells_for(account: AccountStats, now: float) -> tuple[Cell, ...]:
        balance = _right(credits(account.balance))
        if account.balance <= 0:
            balance.stylize("bold red")
        refusals = _right(f"{account.refusals:,}")
        if account.refusals:
            refusals.stylize("red")
        return (
            _crop(account.name, AccountsTable.COLUMNS[0].width),
            balance,
            _right(credits(account.held) if account.held else "–"),
            _right(credits(account.spent)),
            _right(f"{account.requests:,}"),
            refusals,
            _right(age(None if account.last_seen is None else now - account.last_seen)),
        )


class KeysTable(_KeyedTable):
    """The API keys that have a limit: their names, spend today, this month and in all against each cap (open
    holds count, as the router counts them), rate limits, expiry and models; the keys nearest a cap on top."""

    COLUMNS = (
        Column("account", "Account", 11),
        Column("key", "Key", 9),
        Column("name", "Name", 16),
        Column("state", "State", 7),
        Column("today", "Today", 13, numeric=True),
        Column("month", "Month", 14, numeric=True),
        Column("total", "Total", 13, numeric=True),
        Column("rpm", "RPM", 5, numeric=True),
        Column("tpm", "TPM", 6, numeric=True),
        Column("parallel", "Par.", 4, numeric=True),
        Column("expires", "Expires", 16),
        Column("models", "Models", 20),
    )

    def show(self, stats: Stats) -> None:
        self.show_keys(stats.keys or ())

    def show_keys(self, keys: Iterable[KeyStats]) -> None:
        """These keys, the fullest first."""
        ordered = sorted(keys, key=lambda k: (-_fullest(k), _natural(k.account), k.prefix))
        self.set_rows((f"{k.account}/{k.prefix}", self._cells_for(k)) for k in ordered)

    @staticmethod
    def _cells_for(key: KeyStats) -> tuple[Cell, ...]:
        state = Text(key.state)
        if key.state != "active":
            state.stylize("red")
        return (
            _crop(key.account, KeysTable.COLUMNS[0].width),
            key.prefix + "…",
            # Text, not markup: a name is whatever the operator typed, brackets included.
            "–" if key.name is None else Text(_crop(key.name, KeysTable.COLUMNS[2].width)),
            state,
            _spend(key.today),
            _spend(key.month),
            _spend(key.total),
            _right(_limit(key.rpm_limit)),
            _right(_limit(key.tpm_limit)),
            _right(_limit(key.max_parallel_requests)),
            "–" if key.expires_at is None else clock_day(key.expires_at),
            _crop("all" if key.models is None else ",".join(key.models), KeysTable.COLUMNS[-1].width),
        )


def _fullest(key: KeyStats) -> float:
    return max((s.share for s in (key.today, key.month, key.total) if s.share is not None), default=-1.0)


def _spend(spend: SpendStats) -> Text:
    if spend.cap is None:
        return _right(credits(spend.spent) if spend.spent else "–")
    cell = _right(f"{credits(spend.spent)}/{credits(spend.cap)}")
    share = spend.share or 0.0
    if share >= 1.0:
        cell.stylize("bold red")
    elif share >= 0.8:
        cell.stylize("yellow")
    return cell


def _limit(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


class RefusalsPanel(Vertical):
    """Refused requests: how many today (UTC), and this router's by error code with their HTTP status."""

    DEFAULT_CSS = """
    RefusalsPanel {
        height: 1fr;
    }
    RefusalsPanel > Label {
        height: 1;
        width: 100%;
    }
    RefusalsPanel > .refusals--heading {
        color: $text-muted;
    }
    RefusalsPanel > .refusals--codes {
        height: 1fr;
        width: 100%;
    }
    """

    CODE_WIDTH = 21

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        # The HTTP status of each refusal code, as learnt from the request log (the counts do not carry it).
        self.http_status: dict[str, int] = {}

    def compose(self) -> ComposeResult:
        yield Label("none today", classes="refusals--today")
        yield Label("this router, by code", classes="refusals--heading")
        yield Static("", classes="refusals--codes")

    def show(self, stats: Stats) -> None:
        for record in stats.requests.recent:
            if record.refused and record.http_status is not None:
                self.http_status[record.status] = record.http_status
        refusals = stats.refusals
        if refusals is not None:  # the router's own map, for codes no longer among its latest requests
            self.http_status.update(refusals.http_status)
        today = self.query_one(".refusals--today", Label)
        codes = self.query_one(".refusals--codes", Static)
        if refusals is None:
            _set(today, Text("not reported by this router", style="dim"))
            _set(codes, "")
            return
        if refusals.today:
            _set(today, Text(f"refused today {refusals.today:,}", style="bold red"))
        else:
            _set(today, Text("none refused today", style="green"))
        lines = Text(no_wrap=True, overflow="ellipsis")
        for code, count in refusals.by_code.items():
            status = self.http_status.get(code)
            if lines:
                lines.append("\n")
            lines.append(f"{status or '':>3} ", style="dim")
            lines.append(f"{_crop(code, self.CODE_WIDTH):<{self.CODE_WIDTH}}")
            lines.append(f"{count:>6,}")
        _set(codes, lines if refusals.by_code else Text("–", style="dim"))


class RequestsLog(_KeyedTable):
    """The latest requests, refused ones included, newest on top; it keeps the last `MAX_ROWS` it has seen."""

    COLUMNS = (
        Column("time", "Time", 8),
        Column("request", "Request", 9),
        Column("account", "Account", 10),
        Column("model", "Model", 12),
        Column("bid", "Bid", 5, numeric=True),
        Column("queue", "Queue", 5, numeric=True),
        Column("ttft", "TTFT", 5, numeric=True),
        Column("latency", "Latency", 7, numeric=True),
        Column("tokens", "Tok p+c", 9, numeric=True),
        Column("cost", "Cost", 6, numeric=True),
        Column("status", "Status", 18),
    )
    MAX_ROWS = 200

    DEFAULT_CSS = """
    RequestsLog {
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.show_cursor = False
        # Newest first. The router reports only its last 50, so older ones are kept here.
        self._records: dict[str, RequestRecord] = {}

    def show(self, stats: Stats) -> None:
        fresh = [r for r in stats.requests.recent if r.key not in self._records]
        if not fresh and self.row_count:
            return
        merged = sorted([*self._records.values(), *fresh], key=lambda r: r.time, reverse=True)[: self.MAX_ROWS]
        self._records = {r.key: r for r in merged}
        self.set_rows((r.key, self._cells_for(r)) for r in merged)

    def _rebuilt(self, order: list[str], *, selected: str | None, top: str | None) -> None:
        """The log follows the newest request, on top, rather than a selected row: its cursor is hidden, and
        following it would scroll an old request up as new ones arrive. An operator who scrolled down to read
        (`top` is then not the newest) keeps those rows where they were, and the log follows again once they
        scroll back up."""
        if top is None or top == self._order[0] or top not in order:
            return  # clear() left the view on the first row, the newest
        # After the refresh: the table's height, which scrolling is bound by, is only known then.
        self.call_after_refresh(self.scroll_to, y=order.index(top), animate=False)

    @staticmethod
    def _cells_for(record: RequestRecord) -> tuple[Cell, ...]:
        # A refusal is the client's doing (credit, a bad model, a full queue); an error is ours.
        if record.status == "ok":
            status_style = "green"
        elif record.status == "cut":
            status_style = "yellow"
        elif record.refused:
            status_style = "red"
        else:
            status_style = "bold red"
        tokens = "–" if record.refused else f"{record.prompt_tokens}+{record.completion_tokens}"
        width = {column.key: column.width for column in RequestsLog.COLUMNS}
        return (
            clock(record.time),
            _crop(request_id(record.request_id), width["request"]),
            _crop(record.account, width["account"]),
            _crop(record.model or "–", width["model"]),
            _right(bid(record.bid)),
            _right(millis(record.queue_ms)),
            _right(millis(record.ttft_ms)),
            _right(millis(record.latency_ms)),
            _right(tokens),
            _right("–" if record.refused else credits(record.cost_credits)),
            Text(_crop(record.status, width["status"]), style=status_style),
        )


class QueueRow(Horizontal):
    """One model's queue: its name, depth now, a sparkline of the last minutes, and its oldest wait."""

    DEFAULT_CSS = """
    QueueRow {
        height: 1;
    }
    QueueRow > .queue--model {
        width: 14;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    QueueRow > .queue--depth {
        width: 5;
        text-align: right;
        margin-right: 1;
    }
    QueueRow > .queue--history {
        width: 1fr;
    }
    QueueRow > .queue--wait {
        width: 7;
        text-align: right;
    }
    QueueRow.-heading {
        color: $text-muted;
    }
    """

    def __init__(
        self,
        model: str,
        depth: int = 0,
        oldest_wait: float = 0.0,
        history: Sequence[float] = (),
        *,
        heading: bool = False,
    ) -> None:
        super().__init__(classes="-heading" if heading else None)
        self.model = model
        self.heading = heading
        self._first = (depth, oldest_wait, list(history))

    def compose(self) -> ComposeResult:
        yield Label(Text(shown(self.model)), classes="queue--model")  # a name as the nodes gave it, not markup
        if self.heading:
            yield Label("now", classes="queue--depth")
            yield Label("last 5m", classes="queue--history")
            yield Label("oldest", classes="queue--wait")
        else:
            depth, oldest_wait, history = self._first
            yield Label(f"{depth:,}", classes="queue--depth")
            yield Sparkline(history, summary_function=max, classes="queue--history")
            yield Label(wait(oldest_wait), classes="queue--wait")

    def show(self, depth: int, oldest_wait: float, history: Sequence[float]) -> None:
        _set(self.query_one(".queue--depth", Label), f"{depth:,}")
        self.query_one(Sparkline).data = list(history)
        _set(self.query_one(".queue--wait", Label), wait(oldest_wait))


class QueuePanel(Vertical):
    """Depth now and over the last minutes per model, the oldest wait, and the last multiplier dispatched; while
    batches run, a line with their progress (their lines wait behind every request in the queue)."""

    DEFAULT_CSS = """
    QueuePanel {
        height: 1fr;
    }
    QueuePanel > .queue--summary {
        height: 1;
    }
    QueuePanel > .queue--batches {
        height: 1;
        display: none;
    }
    QueuePanel > .queue--batches.-running {
        display: block;
    }
    QueuePanel > VerticalScroll {
        height: 1fr;
    }
    """

    def compose(self) -> ComposeResult:
        yield Label("waiting 0 · last multiplier ×1", classes="queue--summary")
        yield Label("", classes="queue--batches")
        yield QueueRow("model", heading=True)
        yield VerticalScroll()

    def show(self, stats: Stats, history: StatsHistory) -> None:
        queue = stats.queue
        _set(
            self.query_one(".queue--summary", Label),
            f"waiting {queue.total:,} · last multiplier ×{queue.last_multiplier_text}",
        )
        line = self.query_one(".queue--batches", Label)
        batches = stats.batches
        line.set_class(batches is not None and batches.open > 0, "-running")
        if batches is not None and batches.open > 0:
            _set(line, batch_line(batches))
        rows = self.query_one(VerticalScroll)
        shown = {row.model: row for row in rows.query_children(QueueRow)}
        for model in list(shown):
            if model not in queue.models:
                shown.pop(model).remove()
        for model, entry in queue.models.items():
            row = shown.get(model)
            if row is None:
                rows.mount(QueueRow(model, entry.depth, entry.oldest_wait, history.queue_values(model)))
            else:
                row.show(entry.depth, entry.oldest_wait, history.queue_values(model))


def batch_line(batches: BatchStats) -> Text:
    """The open batches in one line: how many, and the lines done of the shown ones (all of them, unless more are
    open than a snapshot carries); /admin/stats has the lines running and pending."""
    done = sum(b.done for b in batches.shown)
    total = sum(b.total for b in batches.shown)
    return Text(f"batches {batches.open:,} · {done:,}/{total:,} lines done", style="cyan")


def _credit_subtitle(value: Decimal, currency: str, width: int) -> str:
    """What a credit is worth, in the longest wording that fits a border `width` cells wide (a border title
    longer than its border is cut short): a long credit value falls back to scientific notation."""
    plain = format_price(value)
    forms = [f"credits · 1 = {plain} {currency}", f"1 credit = {plain} {currency}", f"1 = {plain} {currency}"]
    forms.append(f"1 = {value.normalize():E} {currency}".replace("E-0", "E-").replace("E+0", "E+"))
    room = width - 6  # "╰─ " and " ─╯"
    return next((form for form in forms if len(form) <= room), forms[-1]) if width > 0 else forms[0]


class FeesPanel(Vertical):
    """Fees earned in credits, in total (and its price in the operator's currency) and per minute with a
    sparkline (and in the title, once cached prompt tokens saved the clients anything, what they saved); request
    counts and latency below."""

    DEFAULT_CSS = """
    FeesPanel {
        height: 1fr;
    }
    FeesPanel > Label {
        height: 1;
        width: 100%;
    }
    FeesPanel > Sparkline {
        height: 1;
    }
    FeesPanel > .fees--earned {
        text-style: bold;
    }
    """

    def compose(self) -> ComposeResult:
        yield Label("earned 0", classes="fees--earned")
        yield Label("", classes="fees--price")
        yield Label("per minute 0", classes="fees--rate")
        yield Sparkline([], summary_function=max)
        yield Label("requests 0", classes="fees--requests")
        yield Label("latency –", classes="fees--latency")
        yield Label("", classes="fees--tail")
        yield Label("", classes="fees--books")

    def show(self, stats: Stats, history: StatsHistory) -> None:
        fees, requests = stats.fees, stats.requests
        _set(self.query_one(".fees--earned", Label), f"earned      {credits(fees.earned):>14}")
        money, price = stats.money, self.query_one(".fees--price", Label)
        if money is None:  # a router that does not say what a credit is worth
            _set(price, "")
            self.border_subtitle = ""
        else:
            value = format_price(money.price(fees.earned))
            # A long price (a small credit value) gives up the column it shares with "earned" rather than be cut.
            wide = f"{'in ' + money.currency:<12}{value:>14}" if len(value) <= 14 else f"in {money.currency} {value}"
            _set(price, Text(wide, style="dim"))
            self.border_subtitle = _credit_subtitle(money.value, money.currency, self.outer_size.width)
        _set(self.query_one(".fees--rate", Label), f"per minute  {fees.per_minute:>14,.1f}")
        self.query_one(Sparkline).data = history.fee_values()
        # In the title, which has room, rather than a line of its own, which would push the books out of a
        # 40-line terminal; how many tokens were cached is in /admin/stats (fees.cached_tokens).
        saved = f"Fees · cache saved {credits(fees.cache_discount)}" if fees.cache_discount > 0 else "Fees"
        if self.border_title != saved:
            self.border_title = saved
        # Refusals have their own panel; "failed" is what went wrong after a request was taken.
        refused = stats.refusals.by_code if stats.refusals is not None else {}
        failed = sum(n for status, n in requests.by_status.items() if status not in ("ok", "cut", *refused))
        line = Text(f"requests {requests.total:,}")
        if failed:
            line.append(f" · {failed:,} failed", style="red")
        _set(self.query_one(".fees--requests", Label), line)
        _set(self.query_one(".fees--latency", Label), f"latency p50 {millis(requests.p50_ms)}")
        tail = f"p90 {millis(requests.p90_ms)} · p99 {millis(requests.p99_ms)}"
        # Under "latency p50" when it fits; less indented than cut short when the figures are long.
        indent = max(0, min(8, self.size.width - len(tail))) if self.size.width else 8
        _set(self.query_one(".fees--tail", Label), " " * indent + tail)
        books = self.query_one(".fees--books", Label)
        audit = stats.audit
        if audit is not None and audit.ok is False:  # an alarm: the running totals disagree with the history
            _set(books, Text(f"books AUDIT: {audit.count:,} differ", style="bold red"))
        elif stats.books_balanced is None:
            _set(books, "")
        elif stats.books_balanced:
            _set(books, Text("books balance ✓", style="green"))
        else:
            _set(books, Text("books DO NOT balance", style="bold red"))
