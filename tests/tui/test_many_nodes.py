"""A hundred nodes and a busy queue, updated ten times a second: the dashboard keeps up and answers keys."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llamakit.tui import DashboardApp, HelpScreen, HerdTable, Stats, StatsHistory
from tests.tui.support import NOW, FixedSource, fixed_snapshot, wait_until


def herd_of(count: int, tick: int) -> dict[str, Any]:
    """`count` nodes whose load, requests and speed all change from one tick to the next."""
    snapshot = fixed_snapshot(nodes=count, at=NOW + tick * 0.1, depth=40 + tick % 7)
    for i, node in enumerate(snapshot["nodes"]):
        node["busy"] = (i + tick) % (node["slots"] + 1) if node["state"] == "ready" else 0
        node["requests"] += tick
        node["tokens_per_second"] = round(10 + (i * tick) % 17 / 3, 2)
    return snapshot


async def test_a_hundred_nodes_update_fast_and_keys_still_answer() -> None:
    snapshots = [herd_of(100, tick) for tick in range(40)]
    app = DashboardApp(FixedSource(snapshots, delay=0.1))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: app.updates >= 1, what="the first snapshot")
        table = app.query_one(HerdTable)
        assert table.row_count == 100

        # Time every update, and how late the event loop wakes up, while snapshots come ten a second.
        shown: list[float] = []
        show = app.dashboard.show

        def timed_show(stats: Stats, history: StatsHistory) -> None:
            started = time.perf_counter()
            show(stats, history)
            shown.append(time.perf_counter() - started)

        app.dashboard.show = timed_show  # type: ignore[method-assign]
        lags: list[float] = []

        async def watch_loop() -> None:
            while True:
                started = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - started - 0.01)

        watcher = asyncio.create_task(watch_loop())
        try:
            for _ in range(15):
                await pilot.press("down")
            await pilot.press("question_mark")
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), within=2, what="help")
            await pilot.press("escape")
            await wait_until(pilot, lambda: len(shown) >= 15, what="15 timed updates")
        finally:
            watcher.cancel()

        # The selection follows the node, not the row number, across updates.
        assert table.selected_node is not None and table.selected_node.name == "gemma-3-270m-16"
        assert table.row_count == 100
        # How long updates took is printed, not asserted: timings on a shared machine are not a test.
        mean_ms, stall_ms = sum(shown) / len(shown) * 1000, max(lags) * 1000
        print(f"100 nodes: mean update {mean_ms:.1f} ms, longest loop stall {stall_ms:.0f} ms")
