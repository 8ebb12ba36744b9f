"""The accounts panel, refusals and the request columns, from fixed stats and from a real router refusing."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any

import pytest

from llamakit.tui import AccountsTable, DashboardApp, RefusalsPanel, RequestsLog, RouterStats
from llamakit.tui._widgets import FeesPanel
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import FixedSource, fixed_snapshot, screen_text, wait_until


def plain(row: list[Any]) -> list[str]:
    return [str(cell.plain if hasattr(cell, "plain") else cell).strip() for cell in row]


def rows(table: AccountsTable | RequestsLog) -> list[list[str]]:
    return [plain(table.get_row_at(i)) for i in range(table.row_count)]


@pytest.mark.usefixtures("utc")
async def test_accounts_refusals_and_request_columns_from_a_snapshot() -> None:
    app = DashboardApp(FixedSource([fixed_snapshot()]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")

        # The most recently seen on top; today's spend, requests and refusals; no holds reads as a dash.
        assert rows(app.query_one(AccountsTable)) == [
            ["alice", "48,210", "600", "1,790", "14", "0", "5s ago"],
            ["trader-bot", "0", "–", "25,000", "92", "5", "20s ago"],
            ["dev", "1,000,000", "–", "0", "1", "1", "60m ago"],
            ["idle-co", "5,000", "–", "0", "0", "0", "–"],
        ]
        log = rows(app.query_one(RequestsLog))
        header = [str(c.label.plain) for c in app.query_one(RequestsLog).columns.values()]
        assert header == [
            "Time", "Request", "Account", "Model", "Bid", "Queue", "TTFT", "Latency", "Tok p+c", "Cost", "Status",
        ]  # fmt: skip
        newest, refused = log[0], log[3]
        assert newest == [
            "11:59:55", "117f3e9a…", "dev", "gemma-3-270m", "×2", "753ms", "106ms", "530ms", "31+64", "169", "ok",
        ]  # fmt: skip
        assert refused == ["11:59:40", "087f3e9a…", "dev", "smollm2-135…", "×1", "–", "–", "–", "–", "–",
                           "model_not_found"]  # fmt: skip
        assert [row[-1] for row in log].count("insufficient_funds") == 1

        screen = screen_text(app)
        assert "refused today 6" in screen
        assert "402 insufficient_funds        5" in screen
        assert "404 model_not_found           1" in screen
        assert "spent, requests, refused: today (UTC)" in screen
        # Refusals are not counted as failures: only the 12 errors are.
        assert "requests 1,201 · 12 failed" in screen


async def test_a_refusal_code_no_longer_among_the_latest_requests_keeps_its_http_status() -> None:
    snapshot = fixed_snapshot()
    assert all(r["status"] != "invalid_value" for r in snapshot["requests"]["recent"])
    snapshot["refusals"]["by_status"]["invalid_value"] = 2
    snapshot["refusals"]["http_status"] = {"invalid_value": 400, "insufficient_funds": 402}
    app = DashboardApp(FixedSource([snapshot]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        assert "400 invalid_value" in screen_text(app)


async def test_a_router_without_accounts_or_refusals_says_so() -> None:
    old = fixed_snapshot()
    del old["accounts"], old["refusals"]
    app = DashboardApp(FixedSource([old]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        screen = screen_text(app)
        assert screen.count("not reported by this router") == 2, screen
        assert app.query_one(AccountsTable).row_count == 0
        assert "Busy/slots" in screen and "trader-bot" in screen


async def test_refusals_by_a_real_router_show_per_account_and_in_the_log(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", slots=2))
    router = await herd.start()
    alice = await herd.account("alice", 100_000)
    broke = await herd.account("broke", 0)
    try:
        body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3}
        assert (await alice.post("/v1/completions", json=body)).status_code == 200
        for _ in range(2):
            assert (await broke.post("/v1/completions", json=body)).status_code == 402
        missing = {**body, "model": "no-such-model"}
        assert (await alice.post("/v1/completions", json=missing)).status_code == 404

        app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
        async with app.run_test(size=(120, 40)) as pilot:
            accounts = app.query_one(AccountsTable)
            await wait_until(pilot, lambda: accounts.row_count == 2, what="two accounts")
            by_name = {row[0]: row for row in rows(accounts)}
            # Balance, held, spent, requests, refused today, last seen.
            assert by_name["broke"][1:6] == ["0", "–", "0", "2", "2"]
            assert by_name["alice"][3:6] == [by_name["alice"][3], "2", "1"] and by_name["alice"][3] != "0"

            await wait_until(pilot, lambda: app.query_one(RequestsLog).row_count == 4, what="four requests")
            statuses = [(row[2], row[-1]) for row in rows(app.query_one(RequestsLog))]
            assert sorted(statuses) == [
                ("alice", "model_not_found"), ("alice", "ok"), ("broke", "insufficient_funds"),
                ("broke", "insufficient_funds"),
            ]  # fmt: skip
            await pilot.pause(0.3)
            screen = screen_text(app)
            assert "refused today 3" in screen, screen
            assert "402 insufficient_funds" in screen and "404 model_not_found" in screen, screen
            panel = app.query_one(RefusalsPanel)
            assert panel.http_status == {"insufficient_funds": 402, "model_not_found": 404}
    finally:
        await asyncio.gather(alice.aclose(), broke.aclose())


async def test_names_that_look_like_markup_are_shown_as_sent_and_crash_nothing(herd: Herd) -> None:
    """A client names any model it likes; its refusal reaches the operator's dashboard as typed."""
    await herd.add_node(FakeNode("alpha", slots=2))
    router = await herd.start()
    client = await herd.account("[i]a[/i]", 100_000)
    try:
        hostile = {"model": "[/x] [bold]m", "prompt": "hello", "max_tokens": 3}
        assert (await client.post("/v1/completions", json=hostile)).status_code == 404
        # An escape sequence would clear the operator's screen: it is shown escaped, as text.
        clearing = {**hostile, "model": "\x1b[2J\u202eq"}
        assert (await client.post("/v1/completions", json=clearing)).status_code == 404
        app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
        async with app.run_test(size=(160, 40)) as pilot:
            log = app.query_one(RequestsLog)
            await wait_until(pilot, lambda: log.row_count == 2, what="the refused requests")
            await pilot.pause(0.3)
            assert sorted(row[3] for row in rows(log)) == ["[/x] [bold]m", "\\x1b[2J\\u202eq"]
            assert all(row[2] == "[i]a[/i]" for row in rows(log))
            assert rows(app.query_one(AccountsTable))[0][0] == "[i]a[/i]"
            screen = screen_text(app)
            assert "[/x] [bold]m" in screen and "[i]a[/i]" in screen, screen
    finally:
        await client.aclose()


async def test_a_long_credit_value_is_shown_whole_on_the_fees_panel(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", slots=2))
    router = await herd.start(credit_value="0.000000000000123456", currency="eur")
    client = await herd.account("alice", 100_000)
    try:
        answer = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3})
    finally:
        await client.aclose()
    earned = answer.json()["usage"]["cost_credits"]
    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    for width in (160, 100):
        async with app.run_test(size=(width, 40)) as pilot:
            panel = app.query_one(FeesPanel)
            await wait_until(pilot, lambda: bool(panel.border_subtitle), what="the credit value")  # noqa: B023
            await pilot.pause(0.3)
            screen = screen_text(app)
            shown = re.search(r"1 = ([0-9.E-]+) EUR", screen)
            assert shown is not None and Decimal(shown[1]) == Decimal("0.000000000000123456"), screen
            price = re.search(r"in EUR +([0-9.]+)", screen)  # what was earned, in euros: whole, not cut
            assert price is not None and Decimal(price[1]) == earned * Decimal("0.000000000000123456"), screen
        app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))


async def test_the_fees_panel_says_what_cached_prompt_tokens_saved_once_they_saved_anything(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", script=Script(tokens=3, cache=True)))
    router = await herd.start()
    assert herd.admin is not None
    fees = {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2, "cached_prompt_token_fee": 1}
    await herd.admin.put("/admin/fees/fake-model", json=fees)
    client = await herd.account("alice", 100_000)
    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            panel = app.query_one(FeesPanel)
            await wait_until(pilot, lambda: app.updates >= 1, what="the first snapshot")
            assert panel.border_title == "Fees"  # nothing cached yet
            for _ in range(2):
                await client.post("/v1/completions", json={"prompt": "one two three four five", "max_tokens": 3})
            # the second prompt's 5 words were cached: 3 credits less each
            await wait_until(pilot, lambda: panel.border_title == "Fees · cache saved 15", what="the saving")
            await pilot.pause(0.3)
            screen = screen_text(app)
            assert "Fees · cache saved 15" in screen and "books balance" in screen, screen
    finally:
        await client.aclose()
