"""The queue panel shows the batches at work in one line while there are any, and nothing while there are none."""

from __future__ import annotations

from typing import Any

from llamakit.tui import DashboardApp
from tests.tui.support import FixedSource, fixed_snapshot, screen_text, wait_until


def with_batches(open_: int, shown: list[tuple[int, int, int]]) -> dict[str, Any]:
    """A snapshot with `open_` batches at work, the oldest as (total, completed, failed)."""
    snapshot = fixed_snapshot()
    snapshot["batches"] = {
        "open": {"in_progress": open_, "cancelling": 0},
        "lines": {"pending": 120, "running": 2},
        "here": {"lines": 2, "waiting": 1, "on_nodes": 1},
        "shown": [
            {
                "id": f"batch_{i}",
                "account": "alice",
                "endpoint": "/v1/chat/completions",
                "model": "m",
                "status": "in_progress",
                "created": 0,
                "total": t,
                "completed": c,
                "failed": f,
                "cost_credits": 0,
            }
            for i, (t, c, f) in enumerate(shown)
        ],
    }
    return snapshot


async def test_the_queue_panel_shows_the_batches_at_work() -> None:
    source = FixedSource([with_batches(2, [(100, 37, 3), (50, 0, 0)])], delay=0.05)
    app = DashboardApp(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: "batches 2" in screen_text(app), what="the batches line")
        text = screen_text(app)
        assert "batches 2 · 40/150 lines done" in text


async def test_no_batch_no_line() -> None:
    idle = with_batches(0, [])
    source = FixedSource([idle, fixed_snapshot()], delay=0.05)
    app = DashboardApp(source)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: "waiting 4" in screen_text(app), what="the queue")
        assert "batches" not in screen_text(app)
