"""The dashboard's look, from fixed stats: compared with accepted SVG snapshots (pytest-textual-snapshot).

After a deliberate change of the layout, look at the new pictures and accept them with
`pytest tests/tui/test_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from llamakit.tui import DashboardApp
from tests.tui.support import FailingSource, FixedSource, fixed_series, wait_until

SIZE = (120, 40)
SnapCompare = Callable[..., bool]


def all_shown(count: int) -> Callable[[Pilot[Any]], Any]:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, DashboardApp)
        await wait_until(pilot, lambda: app.updates >= count, what=f"{count} snapshots shown")

    return run_before


@pytest.mark.usefixtures("utc")
def test_dashboard(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30))


@pytest.mark.usefixtures("utc")
def test_router_unreachable_keeps_the_last_data_greyed(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FailingSource(fixed_series(30)), retry_min=60, retry_max=60)

    async def run_before(pilot: Pilot[Any]) -> None:
        await wait_until(pilot, lambda: app.updates >= 30 and app.problem is not None, what="the banner")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


@pytest.mark.usefixtures("utc")
def test_help(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30), press=["question_mark"])


@pytest.mark.usefixtures("utc")
def test_keys(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30), press=["k"])


@pytest.mark.usefixtures("utc")
def test_drain_confirmation(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30), press=["down", "down", "d"])


@pytest.mark.usefixtures("utc")
def test_undrain_confirmation(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30), press=["down", "down", "down", "u"])


@pytest.mark.usefixtures("utc")
def test_paused(snap_compare: SnapCompare) -> None:
    app = DashboardApp(FixedSource(fixed_series(30)))
    assert snap_compare(app, terminal_size=SIZE, run_before=all_shown(30), press=["p"])


def test_the_readme_screenshot_shows_every_panel() -> None:
    """docs/tui.svg is made by `python -m tests.tui.screenshot docs/tui.svg`; remake it when the layout changes."""
    svg = (Path(__file__).parents[2] / "docs" / "tui.svg").read_text()
    for text in (
        "Herd", "Queue", "Fees", "Agents", "Accounts", "Refusals", "Requests", "Busy/slots", "last&#160;multiplier",
        "trader-bot", "insufficient_funds", "TTFT",
    ):  # fmt: skip
        assert text in svg, text
