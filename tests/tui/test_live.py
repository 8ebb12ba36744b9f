"""The dashboard against a real router with fake nodes and traffic: it shows what the router reports."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import httpx

from llamakit.money.currency import format_price
from llamakit.tui import AgentsTable, DashboardApp, HerdTable, RouterStats
from llamakit.tui._widgets import QueueRow
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import screen_text, wait_until


def plain(row: list[Any]) -> list[str]:
    return [str(cell.plain if hasattr(cell, "plain") else cell).strip() for cell in row]


def node_row(table: HerdTable, name: str) -> list[str]:
    """A node's row as text, found by name (a static node's key is its address)."""
    key = next(key for key, node in table.nodes.items() if node.name == name)
    return plain(table.get_row(key))


async def test_nodes_queue_fees_and_agents_are_what_the_router_reports(herd: Herd) -> None:
    gate = asyncio.Event()
    await herd.add_node(FakeNode("alpha", slots=1, script=Script(tokens=4, gate=gate)))
    await herd.add_node(FakeNode("beta", model="other-model", slots=2))
    router = await herd.start()
    alice = await herd.account("alice", 100_000)
    bot = await herd.account("trader-bot", 100_000)

    async def complete() -> httpx.Response:
        body = {"model": "fake-model", "prompt": "the market looks calm", "max_tokens": 4}
        return await alice.post("/v1/completions", json=body)

    # One request on alpha's only slot (held by the gate) and two waiting behind it.
    requests = [asyncio.create_task(complete()) for _ in range(3)]
    # The sentiment agent's outcomes, as it reports them.
    outcomes = [
        ("request", {}),
        ("buy", {"position": 1, "pnl": 0}),
        ("request", {}),
        ("skip", {}),
        ("request", {}),
        ("error", {"message": "sentiment model timed out"}),
        ("buy", {"position": 2, "pnl": 12.5}),
    ]
    for kind, data in outcomes:
        assert (await bot.post("/v1/events", json={"kind": kind, "data": data})).status_code == 201

    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    try:
        await watch(app, gate, requests)
    finally:
        gate.set()
        await asyncio.gather(*requests, return_exceptions=True)
        await alice.aclose()
        await bot.aclose()


async def watch(app: DashboardApp, gate: asyncio.Event, requests: list[asyncio.Task[httpx.Response]]) -> None:
    """Look at the dashboard while one request runs and two wait, then after all three are paid for."""
    async with app.run_test(size=(120, 40)) as pilot:

        def queued() -> bool:
            stats = app.shown
            return stats is not None and stats.queue.total == 2 and any(n.busy for n in stats.nodes)

        await wait_until(pilot, queued, what="two requests waiting and one running")
        table = app.query_one(HerdTable)
        assert node_row(table, "alpha")[:4] == ["alpha", "fake-model", "busy", "▰▰▰▰▰▰  1/1"]
        assert node_row(table, "beta")[:4] == ["beta", "other-model", "ready", "▱▱▱▱▱▱  0/2"]
        await wait_until(pilot, lambda: "fake-model" in {r.model for r in app.query(QueueRow)})
        row = next(r for r in app.query(QueueRow) if r.model == "fake-model")
        assert str(row.query_one(".queue--depth").render()) == "2"

        agents = app.query_one(AgentsTable)
        assert plain(agents.get_row("trader-bot")) == ["trader-bot", "3", "2", "1", "1", "2", "+12.50"]
        screen = screen_text(app)
        assert "waiting 2" in screen
        assert "trader-bot" in screen

        gate.set()
        answers = await asyncio.gather(*requests)
        assert [a.status_code for a in answers] == [200, 200, 200]
        charged = sum(int(a.headers["X-Llamakit-Cost-Credits"]) for a in answers)

        await wait_until(pilot, lambda: app.shown is not None and app.shown.fees.earned == charged, what="fees")
        await wait_until(pilot, lambda: node_row(table, "alpha")[5] == "3", what="alpha served 3")
        assert node_row(table, "alpha")[6] == f"{charged:,}"
        await pilot.pause(0.3)  # one more frame for the request log
        screen = screen_text(app)
        assert re.search(rf"earned +{charged:,} ", screen), screen
        # ... and its price at the router's credit value (a millionth of a dollar by default)
        price = format_price(Decimal(charged) / 10**6)
        assert re.search(rf"in USD +{price} ", screen) and "credits · 1 = 0.000001 USD" in screen, screen
        assert screen.count("alice ") >= 3, screen
        assert "waiting 0" in screen
