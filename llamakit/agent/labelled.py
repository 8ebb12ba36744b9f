"""Labelled chat windows: the sets that sentiment grading methods are measured on.

A labelled set is a JSONL file, a window per line:

    {"id": "pos-01", "label": "positive", "messages": [{"author": "ana", "text": "new high, buying more"}, …]}

`label` is positive, neutral or negative; `messages` (oldest first, at least one) have a non-empty `author`
and `text`. The project's own set is `tests/agent/data/sentiment.jsonl` (measured by `bench/sentiment.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from llamakit.agent.world import ChatLogError, Message, Mood

__all__ = ["LabelledWindow", "load_labelled"]

_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class LabelledWindow:
    """One window of a labelled set: its id, the sentiment it clearly has, its messages (oldest first, their
    times one minute apart from 2026-01-01 UTC, since a labelled set has none)."""

    id: str
    label: Mood
    messages: tuple[Message, ...]


def load_labelled(path: Path) -> list[LabelledWindow]:
    """Read a labelled set; raises `ChatLogError` naming the line of a malformed window, `OSError` if unreadable."""
    windows: list[LabelledWindow] = []
    for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            label = row["label"]
            if label not in ("positive", "neutral", "negative"):
                raise ValueError(f"label must be positive, neutral or negative, got {label!r}")
            messages = tuple(
                Message(str(m["author"]), str(m["text"]), _EPOCH + timedelta(minutes=i))
                for i, m in enumerate(row["messages"])
                if str(m["author"]).strip() and str(m["text"]).strip()
            )
            if not messages or len(messages) != len(row["messages"]):
                raise ValueError("messages must be a non-empty list of {author, text} with non-empty strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ChatLogError(path, line, f"not a labelled window ({exc})") from exc
        windows.append(LabelledWindow(str(row.get("id", line)), cast(Mood, label), messages))
    return windows
