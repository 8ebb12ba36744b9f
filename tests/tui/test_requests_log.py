"""The request log follows the newest request as requests arrive, after dialogs too; a scrolled log stays put."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llamakit.tui import DashboardApp, RequestsLog
from tests.tui.support import NOW, fixed_snapshot, wait_until


class SteppedSource:
    """A router whose snapshots the test hands over one at a time, so it knows which requests the log has seen."""

    url = "http://router.test:8080"

    def __init__(self) -> None:
        self.snapshots: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.snapshots.get()


def with_requests(count: int) -> dict[str, Any]:
    """A snapshot whose recent requests are `req-0000` … one a second, the newest `count - 1` (the router's last 50)."""
    snapshot = fixed_snapshot(at=NOW + count)
    template = snapshot["requests"]["recent"][1]  # an "ok" one
    recent = [{**copy.deepcopy(template), "time": NOW + j, "request_id": f"req-{j:04d}"} for j in range(count)]
    snapshot["requests"]["recent"] = recent[-50:]
    return snapshot


def top_request(log: RequestsLog) -> str:
    """The request id shown on the first row in view (the log drops the `req-` its ids begin with)."""
    return str(log.get_row_at(int(log.scroll_y))[1]).strip()


async def show(app: DashboardApp, source: SteppedSource, pilot: Any, count: int) -> None:
    await source.snapshots.put(with_requests(count))
    await wait_until(pilot, lambda: app.query_one(RequestsLog).row_count == count, what=f"{count} requests")
    await pilot.pause(0.05)  # and any scrolling after the refresh


@pytest.mark.parametrize("dialog", ["k", "question_mark"])
async def test_the_newest_request_stays_on_top_after_a_dialog(dialog: str) -> None:
    source = SteppedSource()
    app = DashboardApp(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await show(app, source, pilot, 3)
        await pilot.press(dialog)
        await pilot.pause(0.1)
        await pilot.press("escape")
        log = app.query_one(RequestsLog)
        # More new requests than the panel has rows: an old row followed would have been scrolled off the top.
        for count in range(4, 20):
            await show(app, source, pilot, count)
            assert (log.scroll_y, top_request(log)) == (0, f"{count - 1:04d}")


async def test_an_operator_who_scrolled_down_keeps_reading_the_same_rows() -> None:
    source = SteppedSource()
    app = DashboardApp(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await show(app, source, pilot, 30)
        log = app.query_one(RequestsLog)
        log.focus()
        for _ in range(5):
            await pilot.press("down")
        await pilot.pause(0.1)
        assert top_request(log) == "0024"

        for count in range(31, 35):
            await show(app, source, pilot, count)
            assert top_request(log) == "0024"

        # Back on top, the log follows the newest again.
        for _ in range(10):
            await pilot.press("up")
        await show(app, source, pilot, 35)
        assert (log.scroll_y, top_request(log)) == (0, "0034")
