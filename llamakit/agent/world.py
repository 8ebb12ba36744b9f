"""Where the agent's chat history comes from: a replayed chat log, or a simulated chat room with a price.

A `World` advances one tick at a time; after each tick it has new messages and (for the simulated room) a
new price. The simulated room's mood drifts, colours what its people say, and moves the price a tick later,
so an agent that reads the mood well can make money.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

__all__ = ["Message", "ReplayWorld", "SimulatedRoom", "World", "load_chat_log"]


@dataclass(frozen=True)
class Message:
    author: str
    text: str
    time: datetime


class World(Protocol):
    def advance(self) -> None:
        """Move one tick forward: new messages, a new price."""

    def history(self, n: int) -> list[Message]:
        """The latest `n` messages, oldest first."""

    def price(self) -> float:
        """The trade token's price in the quote currency now."""


def load_chat_log(path: Path) -> list[Message]:
    """Read a chat log: JSONL objects or CSV rows with `author`, `text` and `time` (ISO 8601 or epoch seconds)."""
    messages: list[Message] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows: list[dict[str, str]] = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, row in enumerate(rows, start=1):
        try:
            raw_time = row["time"]
            when = (
                datetime.fromtimestamp(float(raw_time), UTC)
                if isinstance(raw_time, int | float) or str(raw_time).replace(".", "", 1).isdigit()
                else datetime.fromisoformat(str(raw_time))
            )
            messages.append(Message(str(row["author"]), str(row["text"]), when))
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: entry {number} needs author, text and time ({exc!r})") from exc
    if not messages:
        raise ValueError(f"{path}: the chat log is empty")
    return messages


class ReplayWorld:
    """A chat log played back a message per tick, with a seeded random-walk price (a log has no market)."""

    def __init__(self, messages: Sequence[Message], *, seed: int = 0, start_price: float = 100.0) -> None:
        self._messages = list(messages)
        self._shown = 0
        self._rng = random.Random(seed)
        self._price = start_price

    @classmethod
    def from_file(cls, path: Path, *, seed: int = 0) -> ReplayWorld:
        return cls(load_chat_log(path), seed=seed)

    def advance(self) -> None:
        self._shown = min(self._shown + 1, len(self._messages))
        self._price *= math.exp(self._rng.gauss(0.0, 0.01))

    def history(self, n: int) -> list[Message]:
        return self._messages[max(0, self._shown - n) : self._shown]

    def price(self) -> float:
        return self._price

    @property
    def exhausted(self) -> bool:
        return self._shown >= len(self._messages)


_AUTHORS = ["ana", "bo", "chen", "dee", "eli", "fay", "gus", "hana"]
_SAYINGS = {
    "good": [
        "This is going great, I'm buying more!",
        "Amazing news today, the team shipped everything on time.",
        "Love the new release, best thing this year.",
        "Prices are climbing, everyone is happy here.",
        "Fantastic results, I'm really optimistic.",
    ],
    "neutral": [
        "Anyone know when the next update is?",
        "Just checking in, not much happening.",
        "The meeting moved to Thursday.",
        "I had a sandwich for lunch.",
        "Hard to say where this goes.",
    ],
    "bad": [
        "This is a disaster, I'm selling everything.",
        "Terrible news, the launch failed again.",
        "I hate how this is going, total mess.",
        "Everyone is panicking, prices are crashing.",
        "Awful week, I'm really worried.",
    ],
}


class SimulatedRoom:
    """A seeded chat room whose mood drifts, shapes its messages, and moves the price one tick later."""

    def __init__(
        self, *, seed: int = 0, start_price: float = 100.0, drift: float = 0.02, noise: float = 0.005,
        messages_per_tick: int = 3,
    ) -> None:  # fmt: skip
        self._rng = random.Random(seed)
        self._price = start_price
        self._drift = drift
        self._noise = noise
        self._per_tick = messages_per_tick
        self.mood = 0.0  # from -1 (gloom) to +1 (euphoria)
        self._messages: list[Message] = []
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)

    def advance(self) -> None:
        # The price follows the mood people showed last tick: sentiment leads, the market follows.
        self._price *= math.exp(self._drift * self.mood + self._rng.gauss(0.0, self._noise))
        self.mood = max(-1.0, min(1.0, 0.7 * self.mood + self._rng.gauss(0.0, 0.5)))
        for _ in range(self._per_tick):
            self._clock += timedelta(seconds=self._rng.randint(5, 60))
            tone = self._tone()
            text = self._rng.choice(_SAYINGS[tone])
            self._messages.append(Message(self._rng.choice(_AUTHORS), text, self._clock))
        del self._messages[:-100]

    def _tone(self) -> str:
        roll = self._rng.random() * 2 - 1  # most messages follow the mood; some do not
        level = 0.75 * self.mood + 0.25 * roll
        return "good" if level > 0.2 else "bad" if level < -0.2 else "neutral"

    def history(self, n: int) -> list[Message]:
        return self._messages[-n:] if n > 0 else []

    def price(self) -> float:
        return self._price
