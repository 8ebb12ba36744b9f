"""How numbers, ages, states and loads read on the dashboard: short, aligned, and coloured by meaning."""

from __future__ import annotations

import time

from rich.text import Text

__all__ = ["age", "bid", "clock", "credits", "load_bar", "millis", "request_id", "signed", "state_text", "wait"]

STATE_STYLES = {"ready": "green", "busy": "yellow", "draining": "magenta", "down": "bold red"}


def credits(value: float) -> str:
    return f"{value:,.0f}"


def signed(value: float | None) -> Text:
    if value is None:
        return Text("–", style="dim", justify="right")
    style = "green" if value > 0 else "red" if value < 0 else ""
    text = f"{value:+,.2f}" if value != int(value) else f"{value:+,.0f}"
    return Text(text, style=style, justify="right")


def age(seconds: float | None) -> str:
    """How long ago, coarsely: `now`, `12s ago`, `3m ago`, `2h ago`, `4d ago`."""
    if seconds is None:
        return "–"
    seconds = max(0.0, seconds)
    if seconds < 2:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def wait(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def millis(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1000:
        return f"{value:.0f}ms"
    return f"{value / 1000:.1f}s"


def bid(text: str) -> str:
    """`×1.5`: the multiplier bid exactly as the router wrote it, or `–` when it did not say."""
    return f"×{text}" if text else "–"


def request_id(value: str) -> str:
    """A request id without the router's `req-` prefix: the part that tells requests apart, cropped first."""
    return value.removeprefix("req-") or "–"


def clock(at: float) -> str:
    """Local wall-clock time of day (the operator's zone)."""
    return time.strftime("%H:%M:%S", time.localtime(at)) if at > 0 else "--:--:--"


def clock_day(at: float) -> str:
    """Local date and time to the minute (the operator's zone): `2026-12-30 14:05`."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, "dim"))


def load_bar(busy: int, slots: int, width: int = 8) -> Text:
    """`▰▰▰▱▱▱▱▱  3/8`: slots busy of total, green below half, yellow to full, red when full."""
    ratio = 0.0 if slots <= 0 else min(1.0, busy / slots)
    filled = round(ratio * width)
    if busy > 0 and filled == 0:
        filled = 1  # one busy slot of many still shows
    style = "red" if ratio >= 1 else "yellow" if ratio >= 0.5 else "green"
    bar = Text("▰" * filled, style=style)
    bar.append("▱" * (width - filled), style="dim")
    bar.append(f" {busy:>2}/{slots:<2}")
    return bar
