"""`k` shows the API keys that have limits, live from a real router: names, spend against each cap, rates, expiry."""

from __future__ import annotations

from typing import Any

import httpx

from llamakit.tui import DashboardApp, KeysScreen, KeysTable, RouterStats
from tests.support.fake_node import FakeNode
from tests.support.herd import Herd
from tests.tui.conftest import ADMIN_KEY
from tests.tui.support import FixedSource, fixed_snapshot, screen_text, wait_until


def rows(table: KeysTable) -> list[list[str]]:
    def plain(cell: Any) -> str:
        return str(cell.plain if hasattr(cell, "plain") else cell).strip()

    return [[plain(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_the_keys_dialog_follows_a_router_and_the_fullest_key_is_on_top(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    router = await herd.start()
    assert herd.admin is not None
    await herd.account("alice", 100_000)
    capped = (
        await herd.admin.post(
            "/admin/accounts/alice/keys", json={"name": "ci runner", "limits": {"spend_cap_day": 100}}
        )
    ).json()
    rated = (
        await herd.admin.post(
            "/admin/accounts/alice/keys", json={"limits": {"rpm_limit": 60, "models": ["fake-model"]}}
        )
    ).json()
    app = DashboardApp(RouterStats(router.url, ADMIN_KEY, interval=0.2))
    async with app.run_test(size=(150, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="a snapshot")
        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KeysScreen), what="the keys dialog")
        table = app.screen.query_one(KeysTable)
        await wait_until(pilot, lambda: table.row_count == 2, what="two keys with limits")
        first, second = rows(table)
        assert first[:7] == ["alice", capped["api_key"][:8] + "…", "ci runner", "active", "0/100", "–", "–"]
        assert second[1:3] == [rated["api_key"][:8] + "…", "–"]  # no name
        assert second[7] == "60" and second[-1] == "fake-model"

        # The capped key spends: its row shows it at the next snapshot, still on top (nearest its cap).
        async with httpx.AsyncClient(
            base_url=router.url, headers={"Authorization": f"Bearer {capped['api_key']}"}
        ) as key:
            assert (await key.post("/v1/completions", json={"prompt": "one", "max_tokens": 1})).status_code == 200
        await wait_until(pilot, lambda: rows(table)[0][4] != "0/100", what="the spend shown")
        spent = int(rows(table)[0][4].split("/")[0])
        assert 0 < spent <= 100
        assert "API keys with limits" in screen_text(app)

        # Renamed at the router: the next snapshot shows the new name, as typed (brackets are not markup).
        renamed = await herd.admin.patch(f"/admin/keys/{capped['api_key']}", json={"name": "[/b] nightly [red]"})
        assert renamed.status_code == 200
        await wait_until(pilot, lambda: rows(table)[0][2] == "[/b] nightly [r…", what="the new name")
        await herd.admin.patch(f"/admin/keys/{capped['api_key']}", json={"name": None})
        await wait_until(pilot, lambda: rows(table)[0][2] == "–", what="the name removed")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.dashboard, what="the dialog closed")


async def test_a_router_that_reports_no_keys_says_so() -> None:
    snapshot = fixed_snapshot()
    snapshot.pop("keys", None)
    app = DashboardApp(FixedSource([snapshot]))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the snapshot shown")
        await pilot.press("k")
        await wait_until(pilot, lambda: isinstance(app.screen, KeysScreen), what="the keys dialog")
        assert "not reported by this router" in screen_text(app)
