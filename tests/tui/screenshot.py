"""Write the dashboard's picture for the README from fixed stats: `python -m tests.tui.screenshot docs/tui.svg`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from llamakit.tui import DashboardApp
from tests.tui.support import FixedSource, fixed_series, wait_until


async def screenshot(*, nodes: int = 6, size: tuple[int, int] = (120, 40)) -> str:
    app = DashboardApp(FixedSource(fixed_series(30, nodes=nodes)))
    async with app.run_test(size=size) as pilot:
        await wait_until(pilot, lambda: app.updates >= 30, what="the fixed stats shown")
        return app.export_screenshot(title="llamakit-tui")


def main() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/tui.svg")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(asyncio.run(screenshot()))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
