"""What the `llamakit` admin commands share: a client with the operator's admin key, and plain output."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from typing import Any
from urllib.parse import quote

import httpx

from llamakit.profile import read_profile
from llamakit.text import shown

__all__ = ["admin_client", "segment", "show", "table", "when"]


def admin_client(args: argparse.Namespace) -> httpx.Client:
    profile = read_profile()
    url = args.url or os.environ.get("LLAMAKIT_URL") or (profile.url if profile else None)
    key = os.environ.get("LLAMAKIT_ADMIN_KEY") or (profile.admin_key if profile else None)
    if not url or not key:
        raise SystemExit("no router configured: run 'llamakit up', or set LLAMAKIT_URL and LLAMAKIT_ADMIN_KEY")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def show(resp: httpx.Response) -> int:
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text
    print(json.dumps(body, indent=2))
    return 0 if resp.is_success else 1


def segment(name: str) -> str:
    """`name` as one segment of a URL path: an account named `a/b` or `a?b` stays one name."""
    return quote(name, safe="")


def when(epoch: float | None) -> str:
    """An epoch time as UTC `2026-11-30 14:05:00`; as the number itself when no date can show it."""
    if epoch is None:
        return ""
    try:
        return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{epoch:g}"


def table(header: list[str], rows: list[list[Any]]) -> None:
    """Print `rows` under `header` in aligned columns; text others typed (a model a client named, an OpenAI
    `user`) is shown with its control characters escaped, so that it cannot drive the terminal."""
    cells = [header, *[[shown(str(c)) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
