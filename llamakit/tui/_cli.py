"""`llamakit-tui`: the dashboard from the command line, in the foreground of `llamakit up`, or (`--serve`) as a web
page.

Textual is imported only when the dashboard runs, so this module loads (and explains) without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from collections.abc import Sequence

from llamakit.tui._config import NotConfigured, resolve_config
from llamakit.tui._sign_in_limit import MAX_FAILURES, WINDOW_SECONDS

__all__ = ["main", "run_dashboard"]

NO_TEXTUAL = "the dashboard needs Textual, which is not installed: pip install 'llamakit[tui]'"
NO_TEXTUAL_SERVE = "--serve needs textual-serve, which is not installed: pip install 'llamakit[tui]'"


def run_dashboard(*, url: str, admin_key: str, interval: float = 1.0) -> None:
    """Show the dashboard of the router at `url` in this terminal until the operator quits (or SIGTERM)."""
    from llamakit.tui._app import DashboardApp
    from llamakit.tui._source import RouterStats

    # textual-serve runs us with its web driver, for a page of `llamakit-tui --serve`.
    served = os.environ.get("TEXTUAL_DRIVER", "").startswith("textual.drivers.web_driver")
    DashboardApp(RouterStats(url, admin_key, interval=interval), exit_on_sigterm=True, exit_with_parent=served).run()


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, not {text!r}")
    return int(text)


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a number of wrong keys is a whole number from 1 up, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"a window is a number of seconds over 0, not {text!r}")
    return seconds


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
    web = parser.add_argument_group("in a browser")
    web.add_argument(
        "--serve", action="store_true", help="serve the dashboard as a web page, to be opened with the admin key"
    )
    web.add_argument("--host", default="127.0.0.1", help="address of the web page (default 127.0.0.1)")
    web.add_argument("--port", type=_port, default=8000, help="port of the web page (default 8000)")
    web.add_argument(
        "--max-sign-in-failures",
        type=_at_least_one,
        default=MAX_FAILURES,
        metavar="N",
        help=f"wrong admin keys one client address may send in a window, then 429 until it passes "
        f"(default {MAX_FAILURES})",
    )
    web.add_argument(
        "--sign-in-window",
        type=_seconds,
        default=WINDOW_SECONDS,
        metavar="SECONDS",
        help=f"the window of --max-sign-in-failures, in seconds (default {WINDOW_SECONDS:g})",
    )
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
    if args.serve:
        if importlib.util.find_spec("textual_serve") is None:
            print(f"llamakit-tui: {NO_TEXTUAL_SERVE}", file=sys.stderr)
            raise SystemExit(2)
        from llamakit.tui._serve import serve_dashboard

        serve_dashboard(
            url=config.url,
            admin_key=config.admin_key,
            interval=config.interval,
            host=args.host,
            port=args.port,
            max_sign_in_failures=args.max_sign_in_failures,
            sign_in_window=args.sign_in_window,
        )
        return
    run_dashboard(url=config.url, admin_key=config.admin_key, interval=config.interval)
