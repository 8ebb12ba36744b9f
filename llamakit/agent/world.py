"""Where the agent's chat history comes from: a chat log the operator brings, or a simulated chat room.

A `World` advances one tick at a time; after each tick it has new messages and a price. The simulated room
goes through every mood (positive, neutral, negative) in a seeded order; what its people say follows the mood, and
the price follows it a tick later, so an agent that reads the mood well makes money.

A chat log (`--world chat.jsonl` or `chat.csv`) has one message per JSON line or CSV row:

    {"author": "ana", "text": "new high, I'm buying more", "time": "2026-01-05T09:30:00+00:00", "price": 101.5}

- `author`, `text`: non-empty strings.
- `time`: ISO 8601 (`2026-01-05T09:30:00+00:00`; without an offset it is UTC) or Unix seconds (`1767605400`).
- `price` (optional): the token's price in the quote currency at that message, a positive number. Where a
  log has prices, the replay's price follows them; a log without any gets a seeded random walk from 100.

A CSV file has a header row naming these columns (in any order; other columns are ignored). A malformed row
raises `ChatLogError`, whose message names the file, the line and what to fix. `llamakit/agent/data/` has
`example-chat.jsonl` and `example-chat.csv`.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "EXAMPLE_CHAT_CSV",
    "EXAMPLE_CHAT_JSONL",
    "ChatLogError",
    "Message",
    "Mood",
    "ReplayWorld",
    "SimulatedRoom",
    "World",
    "load_chat_log",
]

_DATA = Path(__file__).resolve().parent / "data"
EXAMPLE_CHAT_JSONL = _DATA / "example-chat.jsonl"
EXAMPLE_CHAT_CSV = _DATA / "example-chat.csv"

Mood = Literal["positive", "neutral", "negative"]


@dataclass(frozen=True)
class Message:
    """One chat message. `price` is the token's price when it was written, if the source knows it."""

    author: str
    text: str
    time: datetime
    price: float | None = None


class World(Protocol):
    def advance(self) -> None:
        """Move one tick forward: new messages, a new price."""

    def history(self, n: int) -> list[Message]:
        """The latest `n` messages, oldest first."""

    def price(self) -> float:
        """The trade token's price in the quote currency now."""

    @property
    def exhausted(self) -> bool:
        """True when `advance` brings nothing new any more (the end of a chat log)."""


class ChatLogError(ValueError):
    """A chat log that cannot be read; the message names the file, the line (1-based) and the fix."""

    def __init__(self, path: Path, line: int | None, problem: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


_FIELDS = ("author", "text", "time")
_TIME_HELP = "ISO 8601 such as 2026-01-05T09:30:00+00:00, or Unix seconds such as 1767605400"


def load_chat_log(path: Path) -> list[Message]:
    """Read a chat log (`.jsonl` or `.csv`, format in the module docstring), oldest message first.

    Raises `ChatLogError` naming the line of the first malformed row, for an unknown suffix, or for a log
    without messages; `OSError` when the file cannot be read.
    """
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ChatLogError(
            path, None, f"a chat log is a .jsonl or a .csv file, not {suffix or 'a file without suffix'!r}"
        )
    rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path)
    messages = [_message(path, line, row) for line, row in rows]
    if not messages:
        raise ChatLogError(path, None, "the chat log has no messages")
    return messages


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    with path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ChatLogError(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise ChatLogError(
                    path,
                    line,
                    f'expected a JSON object like {{"author": …, "text": …, "time": …}}, got {raw.strip()[:40]}',
                )
            yield line, row


def _csv_rows(path: Path) -> Iterator[tuple[int, Mapping[str, object]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ChatLogError(path, None, "the chat log has no messages")
        names = [name.strip().lower() for name in header]
        missing = [name for name in _FIELDS if name not in names]
        if missing:
            raise ChatLogError(
                path, 1, f"the header row needs the columns author, text, time (missing: {', '.join(missing)})"
            )
        line = reader.line_num + 1  # a quoted field may span lines: a row starts where the last one ended
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(names):
                raise ChatLogError(
                    path, start, f"{len(cells)} fields where the header has {len(names)} (quote a text with commas)"
                )
            yield (
                start,
                {name: cell for name, cell in zip(names, cells, strict=True) if cell.strip() or name in _FIELDS},
            )


def _message(path: Path, line: int, row: Mapping[str, object]) -> Message:
    missing = [name for name in _FIELDS if name not in row]
    if missing:
        raise ChatLogError(path, line, f"missing {', '.join(missing)} (every message needs author, text and time)")
    author, text = row["author"], row["text"]
    if not isinstance(author, str) or not author.strip():
        raise ChatLogError(path, line, f"author must be a non-empty string, got {author!r}")
    if not isinstance(text, str) or not text.strip():
        raise ChatLogError(path, line, f"text must be a non-empty string, got {text!r}")
    return Message(author.strip(), text.strip(), _time(path, line, row["time"]), _price(path, line, row.get("price")))


def _time(path: Path, line: int, raw: object) -> datetime:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ChatLogError(path, line, f"time must be {_TIME_HELP}; got {raw!r}")
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return datetime.fromtimestamp(seconds, UTC)
    try:
        when = datetime.fromisoformat(str(raw).strip())
    except ValueError:
        raise ChatLogError(path, line, f"time must be {_TIME_HELP}; got {raw!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _price(path: Path, line: int, raw: object) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        price = float(raw) if not isinstance(raw, bool) and isinstance(raw, str | int | float) else math.nan
    except ValueError:
        price = math.nan
    if not (math.isfinite(price) and price > 0):
        raise ChatLogError(path, line, f"price must be a positive number (or left out), got {raw!r}")
    return price


class ReplayWorld:
    """A chat log played back a message per tick, oldest first; `exhausted` once the last one is shown.

    The price (quote currency per token) follows the log's `price` fields where it has them, else it is a
    seeded random walk from `start_price` (log-normal steps of 1 % standard deviation a tick).
    """

    def __init__(self, messages: Sequence[Message], *, seed: int = 0, start_price: float = 100.0) -> None:
        self._messages = list(messages)
        self._shown = 0
        self._rng = random.Random(seed)
        self._walk = not any(m.price is not None for m in self._messages)
        first = next((m.price for m in self._messages if m.price is not None), None)
        self._price = first if first is not None else start_price

    @classmethod
    def from_file(cls, path: Path, *, seed: int = 0) -> ReplayWorld:
        """Raises `ChatLogError` (a `ValueError`) for a malformed log, `OSError` for one that cannot be read."""
        return cls(load_chat_log(path), seed=seed)

    def advance(self) -> None:
        if self._shown < len(self._messages):
            self._shown += 1
            price = self._messages[self._shown - 1].price
            if price is not None:
                self._price = price
        if self._walk:
            self._price *= math.exp(self._rng.gauss(0.0, 0.01))

    def history(self, n: int) -> list[Message]:
        return self._messages[max(0, self._shown - n) : self._shown] if n > 0 else []

    def price(self) -> float:
        return self._price

    @property
    def exhausted(self) -> bool:
        return self._shown >= len(self._messages)


_AUTHORS = ["ana", "bo", "chen", "dee", "eli", "fay", "gus", "hana"]
# What people say in each mood. Written apart from the labelled set the grader is measured on
# (tests/agent/data/sentiment.jsonl), so the demo does not grade the benchmark's own windows.
_SAYINGS: dict[Mood, list[str]] = {
    "positive": [
        "This is going great, I'm buying more!",
        "Amazing news today, the team shipped everything on time.",
        "Love the new release, best thing this year.",
        "Price is climbing and everyone here is happy.",
        "Fantastic results, I'm really optimistic.",
        "Big green candle, bulls are back!",
        "Just added to my bag, this rally looks strong.",
        "Another exchange listing confirmed, huge win.",
        "Record volume and new highs, so bullish.",
        "Great quarter, revenue is way up.",
    ],
    "neutral": [
        "Anyone know when the next update is?",
        "Just checking in, not much happening.",
        "The community call moved to Thursday.",
        "I had a sandwich for lunch.",
        "Where do I find the staking docs?",
        "Price hasn't moved much today.",
        "What time is the AMA?",
        "Switching to a new wallet this weekend.",
        "The forum thread about fees is pinned.",
        "Back from holiday, catching up on the chat.",
    ],
    "negative": [
        "This is a disaster, I'm selling everything.",
        "Terrible news, the launch failed again.",
        "I hate how this is going, total mess.",
        "Everyone is panicking, prices are crashing.",
        "Awful week, I'm really worried.",
        "Got liquidated, this dump is brutal.",
        "Another hack, funds are gone, I'm out.",
        "Red everywhere, worst day this year.",
        "The team keeps missing deadlines, so disappointed.",
        "Sell pressure is huge, this is going lower.",
    ],
}
_MOOD_VALUE: dict[Mood, float] = {"positive": 1.0, "neutral": 0.0, "negative": -1.0}


class SimulatedRoom:
    """A seeded chat room that goes through every mood, says things in that mood, and moves the price.

    The moods come in rounds of three to six ticks: each round holds each of the three moods once, in a
    seeded order, for one or two ticks (so the first three to six ticks already show every mood). A tick
    brings `messages_per_tick` messages in the tick's mood (a few off-mood ones, as in a real room: `stray`
    is their share); the price moves at the next tick by `drift` (a fraction) in the direction of the mood,
    plus noise of `noise` standard deviation.
    `mood` is the current tick's mood: +1.0 positive, 0.0 neutral, -1.0 negative.
    """

    def __init__(
        self, *, seed: int = 0, start_price: float = 100.0, drift: float = 0.02, noise: float = 0.005,
        messages_per_tick: int = 3, stray: float = 0.1,
    ) -> None:  # fmt: skip
        if messages_per_tick < 1 or not 0 <= stray < 1 or start_price <= 0:
            raise ValueError("messages_per_tick must be ≥ 1, stray in [0, 1) and start_price > 0")
        self._rng = random.Random(seed)
        self._price = start_price
        self._drift = drift
        self._noise = noise
        self._per_tick = messages_per_tick
        self._stray = stray
        self._moods: list[Mood] = []
        self.current: Mood | None = None  # the mood of the latest tick (None before the first)
        self._messages: list[Message] = []
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)

    @property
    def mood(self) -> float:
        return 0.0 if self.current is None else _MOOD_VALUE[self.current]

    def advance(self) -> None:
        # The price follows the mood people showed last tick: sentiment leads, the market follows.
        self._price *= math.exp(self._drift * self.mood + self._rng.gauss(0.0, self._noise))
        if not self._moods:
            order: list[Mood] = ["positive", "neutral", "negative"]
            self._rng.shuffle(order)
            if order[0] == self.current:  # no mood lasts more than two ticks in a row
                order.reverse()
            for mood in order:
                self._moods += [mood] * self._rng.choice((1, 2))
        self.current = self._moods.pop(0)
        for _ in range(self._per_tick):
            self._clock += timedelta(seconds=self._rng.randint(5, 60))
            tone: Mood = self.current
            if self._rng.random() < self._stray:
                tone = "neutral" if tone != "neutral" else self._rng.choice(("positive", "negative"))
            self._messages.append(Message(self._rng.choice(_AUTHORS), self._rng.choice(_SAYINGS[tone]), self._clock))
        del self._messages[:-100]

    def history(self, n: int) -> list[Message]:
        return self._messages[-n:] if n > 0 else []

    def price(self) -> float:
        return self._price

    @property
    def exhausted(self) -> bool:
        return False
