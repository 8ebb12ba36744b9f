"""What the snapshot carries only the first of, the dashboard pages through on demand: every account (searched by
name, or by spend today), every node, more keys; and an audit that disagrees is an alarm on the fees panel."""

from __future__ import annotations

from typing import Any

from llamakit.tui import AccountsScreen, AccountsTable, DashboardApp, HerdTable, KeysScreen, NodesScreen, RouterStats
from llamakit.tui._widgets import FeesPanel, KeysTable
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import FixedSource, fixed_snapshot, screen_text, wait_until


def names(table: Any) -> list[str]:
    return [str(table.get_row_at(i)[0]).strip() for i in range(table.row_count)]


async def test_an_audit_that_disagrees_is_an_alarm_on_the_dashboard() -> None:
    snapshot = fixed_snapshot()
    snapshot["books"]["audit"] = {
        "ok": False, "checked": snapshot["time"] - 60, "count": 2,
        "discrepancies": [{"what": "totals: charges", "kept": 1_234_572, "counted": 1_234_567}],
    }  # fmt: skip
    app = DashboardApp(FixedSource([snapshot]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        assert "books AUDIT: 2 differ" in screen_text(app)
        assert app.shown is not None and app.shown.audit is not None
        assert app.shown.audit.first == "totals: charges: kept 1,234,572, counted 1,234,567"
        snapshot["books"]["audit"] = {"ok": True, "count": 0, "discrepancies": []}
        app.receive(type(app.shown).from_json(snapshot))
        await pilot.pause()
        assert "books balance ✓" in str(app.query_one(FeesPanel).query_one(".fees--books").content)


async def test_every_account_every_node_and_more_keys_a_page_at_a_time(herd: Herd) -> None:
    for name in ("n1", "n2"):
        await herd.add_node(FakeNode(name, script=Script(tokens=2)))
    router = await herd.start()
    assert herd.admin is not None
    for i in range(5):
        await herd.admin.post("/admin/accounts", json={"name": f"acct-{i}", "limits": {"rpm_limit": 10 + i}})
    spender = await herd.account("spender", 10_000)
    assert (await spender.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 200
    await spender.aclose()

    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    async with app.run_test(size=(150, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="a snapshot")
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, AccountsScreen), what="the accounts dialog")
        table = app.screen.query_one(AccountsTable)
        await wait_until(pilot, lambda: table.row_count == 6, what="every account")
        assert names(table) == ["acct-0", "acct-1", "acct-2", "acct-3", "acct-4", "spender"]
        await pilot.press(*"ACCT-3", "enter")
        await wait_until(pilot, lambda: names(table) == ["acct-3"], what="the account searched for")
        await pilot.press("ctrl+u", "enter")  # no search: every account again
        await wait_until(pilot, lambda: table.row_count == 6, what="every account again")
        app.screen.query_one(AccountsTable).focus()
        await pilot.press("o")  # by spend today: only who spent, the biggest first
        await wait_until(pilot, lambda: names(table) == ["spender"], what="today's spenders")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.dashboard, what="the dashboard again")

        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, NodesScreen), what="the nodes dialog")
        nodes = app.screen.query_one(HerdTable)
        await wait_until(pilot, lambda: names(nodes) == ["n1", "n2"], what="every node")
        await pilot.press("escape")

        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KeysScreen), what="the keys dialog")
        keys = app.screen.query_one(KeysTable)
        await wait_until(pilot, lambda: keys.row_count == 5, what="the snapshot's keys")
        assert "m: more" in screen_text(app)
        await pilot.press("m")
        await wait_until(pilot, lambda: "m: more" not in screen_text(app), what="every key read")
        assert keys.row_count == 5


async def test_a_source_that_cannot_page_says_so() -> None:
    app = DashboardApp(FixedSource([fixed_snapshot()]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, AccountsScreen), what="the accounts dialog")
        await wait_until(pilot, lambda: "does not page" in screen_text(app), what="the reason")
