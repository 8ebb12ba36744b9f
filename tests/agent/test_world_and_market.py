"""The agent's chat worlds (the simulated room, chat logs the operator brings) and its paper market."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from llamakit.agent import (
    EXAMPLE_CHAT_CSV,
    EXAMPLE_CHAT_JSONL,
    ChatLogError,
    InsufficientCash,
    PaperMarket,
    ReplayWorld,
    SimulatedRoom,
    load_chat_log,
)


def at(minute: int) -> datetime:
    return datetime(2026, 1, 5, 9, 30, tzinfo=UTC) + timedelta(minutes=minute)


def test_chat_logs_load_from_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        json.dumps({"author": "ana", "text": "great day", "time": "2026-01-01T10:00:00+00:00"}) + "\n\n"
        + json.dumps({"author": "bo", "text": "meh", "time": 1767261660, "extra": "ignored"}) + "\n"
    )  # fmt: skip
    csv = tmp_path / "chat.csv"
    csv.write_text('Author,text,time,channel\nana,great day,2026-01-01T10:00:00,x\nbo,"meh, really",1767261660,y\n')
    for path in (jsonl, csv):
        messages = load_chat_log(path)
        assert [m.author for m in messages] == ["ana", "bo"]
        assert messages[0].time == datetime(2026, 1, 1, 10, tzinfo=UTC)  # no offset: UTC
        assert messages[1].time == datetime.fromtimestamp(1767261660, UTC)
        assert all(m.price is None for m in messages)
    world = ReplayWorld.from_file(csv)
    world.advance()
    assert [m.text for m in world.history(3)] == ["great day"]
    world.advance()
    assert [m.text for m in world.history(3)] == ["great day", "meh, really"]
    assert world.exhausted


def test_the_example_world_files_load_and_a_replay_follows_their_prices() -> None:
    jsonl, csv = load_chat_log(EXAMPLE_CHAT_JSONL), load_chat_log(EXAMPLE_CHAT_CSV)
    assert [m.text for m in jsonl] == [m.text for m in csv] and len(jsonl) >= 12
    assert all(m.price is not None for m in jsonl) and all(m.price is None for m in csv)
    world = ReplayWorld(jsonl)
    prices = []
    while not world.exhausted:
        world.advance()
        prices.append(world.price())
    assert prices == [m.price for m in jsonl]
    walk = ReplayWorld(csv, seed=3)
    walk.advance()
    walk.advance()
    assert walk.price() != 100.0 and walk.price() == pytest.approx(100.0, rel=0.1)


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("a.jsonl", '{"author": "ana", "text": "hi", "time": 1767261660}\n{"author": "bo", "time": 1}\n',
         "a.jsonl, line 2: missing text (every message needs author, text and time)"),
        ("b.jsonl", '\n{"author": "ana", "text": "hi", "time": 1767261660}\n{"author": "bo", "text": "hi",\n',
         "b.jsonl, line 3: not valid JSON"),
        ("c.jsonl", '["ana", "hi", 1767261660]\n', "c.jsonl, line 1: expected a JSON object"),
        ("d.jsonl", '{"author": "ana", "text": "hi", "time": "yesterday"}\n',
         "d.jsonl, line 1: time must be ISO 8601 such as 2026-01-05T09:30:00+00:00, or Unix seconds"),
        ("e.jsonl", '{"author": "", "text": "hi", "time": 1}\n', "e.jsonl, line 1: author must be a non-empty string"),
        ("f.jsonl", '{"author": "ana", "text": 5, "time": 1}\n', "f.jsonl, line 1: text must be a non-empty string"),
        ("g.jsonl", '{"author": "ana", "text": "hi", "time": 1, "price": -3}\n',
         "g.jsonl, line 1: price must be a positive number"),
        ("h.csv", "author,text\nana,hi\n",
         "h.csv, line 1: the header row needs the columns author, text, time (missing: time)"),
        ("i.csv", 'author,text,time\nana,"hello\nthere",1\nbo,hi, there,2\n',
         "i.csv, line 4: 4 fields where the header has 3 (quote a text with commas)"),
        ("j.csv", "author,text,time,price\nana,hi,1,cheap\n", "j.csv, line 2: price must be a positive number"),
        ("k.csv", "author,text,time\n", "k.csv: the chat log has no messages"),
        ("l.jsonl", "\n\n", "l.jsonl: the chat log has no messages"),
        ("m.txt", "ana: hi\n", "m.txt: a chat log is a .jsonl or a .csv file, not '.txt'"),
    ],
)  # fmt: skip
def test_a_malformed_chat_log_names_its_line_and_the_fix(tmp_path: Path, name: str, content: str, error: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ChatLogError, match=re.escape(error)) as caught:
        load_chat_log(path)
    assert str(caught.value).startswith(str(path))
    assert isinstance(caught.value, ValueError)


def test_the_agent_command_refuses_a_malformed_world_file_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.csv"
    path.write_text("author,text,time\nana,hi,1767261660\nbo,hi,soon\n")
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.agent", "--world", str(path), "--router", "http://127.0.0.1:9",
         "--api-key", "k"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"error: {path}, line 3: time must be ISO 8601" in proc.stderr


def test_the_simulated_room_is_seeded_and_goes_through_every_mood() -> None:
    for seed in range(20):
        a, b = SimulatedRoom(seed=seed), SimulatedRoom(seed=seed)
        moods = []
        for _ in range(6):
            a.advance()
            b.advance()
            assert a.history(3) == b.history(3) and a.price() == b.price() and a.current == b.current
            moods.append(a.current)
        assert set(moods) == {"positive", "neutral", "negative"}, (seed, moods)
        assert all(moods[i : i + 3].count(moods[i]) < 3 for i in range(4)), "a mood lasts at most two ticks"
    assert SimulatedRoom(seed=6).history(3) == []


def test_the_simulated_room_says_what_its_mood_is_and_its_mood_moves_the_price() -> None:
    room = SimulatedRoom(seed=5, stray=0.0)
    room.advance()
    moods, returns = [], []
    for _ in range(400):
        before, mood = room.price(), room.mood
        said = {m.text for m in room.history(3)}
        from llamakit.agent.world import _SAYINGS

        assert said <= set(_SAYINGS[room.current])  # type: ignore[index]
        room.advance()
        moods.append(mood)
        returns.append(room.price() / before - 1)
    # Good sentiment now, higher price next tick: a good grader can make money.
    up = [r for m, r in zip(moods, returns, strict=True) if m > 0]
    down = [r for m, r in zip(moods, returns, strict=True) if m < 0]
    assert sum(up) / len(up) > 0.01 and sum(down) / len(down) < -0.01


def test_the_market_fills_at_the_price_with_a_fee_and_keeps_its_books(tmp_path: Path) -> None:
    price = [100.0]
    log = tmp_path / "trades.jsonl"
    market = PaperMarket(lambda: price[0], cash=1_000.0, fee_rate=0.01, trade_log=log)
    fill = market.buy(200.0)
    assert fill.fee == pytest.approx(2.0) and fill.quantity == pytest.approx(1.98)
    price[0] = 110.0
    assert market.pnl() == pytest.approx(800 + 1.98 * 110 - 1000)
    market.buy(100.0)
    assert market.cash + market.cost_basis + market.fees_paid == pytest.approx(1_000.0)
    with pytest.raises(InsufficientCash, match="cash left"):
        market.buy(5_000.0)
    sold = market.sell_all()
    assert sold is not None and market.position == 0
    assert market.pnl() == pytest.approx(market.cash - 1_000.0)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["side"] for line in lines] == ["buy", "buy", "sell"]
