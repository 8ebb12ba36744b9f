"""The agent's chat worlds and paper market, on their own (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamakit.agent import InsufficientCash, PaperMarket, ReplayWorld, SimulatedRoom, load_chat_log


def test_chat_logs_load_from_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(
        json.dumps({"author": "ana", "text": "great day", "time": "2026-01-01T10:00:00+00:00"}) + "\n"
        + json.dumps({"author": "bo", "text": "meh", "time": 1767261660}) + "\n"
    )  # fmt: skip
    csv = tmp_path / "chat.csv"
    csv.write_text('author,text,time\nana,great day,2026-01-01T10:00:00+00:00\nbo,"meh, really",1767261660\n')
    for path in (jsonl, csv):
        messages = load_chat_log(path)
        assert [m.author for m in messages] == ["ana", "bo"]
        assert messages[1].time.year == 2026
    world = ReplayWorld.from_file(csv)
    world.advance()
    assert [m.text for m in world.history(3)] == ["great day"]
    world.advance()
    assert [m.text for m in world.history(3)] == ["great day", "meh, really"]
    assert world.exhausted


def test_a_bad_chat_log_says_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"author": "ana", "time": "2026-01-01T10:00:00"}) + "\n")
    with pytest.raises(ValueError, match="entry 1 needs author, text and time"):
        load_chat_log(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("author,text,time\n")
    with pytest.raises(ValueError, match="empty"):
        load_chat_log(empty)


def test_the_simulated_room_is_seeded_and_its_mood_moves_the_price() -> None:
    a, b = SimulatedRoom(seed=5), SimulatedRoom(seed=5)
    moods, returns = [], []
    for _ in range(400):
        a.advance()
        b.advance()
        before, mood = a.price(), a.mood
        a_next = a.price()
        assert a.history(3) == b.history(3) and a_next == b.price()
        moods.append(mood)
        a.advance()
        b.advance()
        returns.append(a.price() / before - 1)
    # Good sentiment now, higher price next tick: a good grader can make money.
    mean_m, mean_r = sum(moods) / len(moods), sum(returns) / len(returns)
    cov = sum((m - mean_m) * (r - mean_r) for m, r in zip(moods, returns, strict=True))
    assert cov > 0
    assert len(a.history(3)) == 3 and SimulatedRoom(seed=6).history(3) == []


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
