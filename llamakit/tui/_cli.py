"""`llamakit-tui`: the dashboard from the command line, or in the foreground of `llamakit up`.

Textual is imported only when the dashboard runs, so this module loads (and explains) without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from llamakit.tui._config import NotConfigured, resolve_config

__all__ = ["main", "run_dashboard"]

NO_TEXTUAL = "the dashboard needs Textual, which is not installed: pip install 'llamakit[tui]'"


def run_dashboard(*, url: str, admin_key: str, interval: float = 1.0) -> None:
    """Show the dashboard of the router at `url` in this terminal until the operator quits (or SIGTERM)."""
    from llamakit.tui._app import DashboardApp
    from llamakit.tui._source import RouterStats

    DashboardApp(RouterStats(url, admin_key, interval=interval), exit_on_sigterm=True).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamakit-tui",
        description="The operator's live dashboard of a llamakit router: herd, queue, fees, agents, requests.",
        epilog="Without flags it watches the router of the profile that 'llamakit up' writes.",
    )
    parser.add_argument("--url", help="router URL (default: $LLAMAKIT_URL, else the profile)")
    parser.add_argument(
        "--admin-key",
        help="admin key (default: $LLAMAKIT_ADMIN_KEY, else the profile; prefer the variable, as ps shows flags)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(url=args.url, admin_key=args.admin_key, interval=args.interval)
    except NotConfigured as exc:
        print(f"llamakit-tui: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if importlib.util.find_spec("textual") is None:
        print(f"llamakit-tui: {NO_TEXTUAL}", file=sys.stderr)
        raise SystemExit(2)
    run_dashboard(url=config.url, admin_key=config.admin_key, interval=config.interval)
