"""The sentiment-trading agent with the real models through a real router: trades, counts, events, failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from llamakit.agent import EXAMPLE_CHAT_JSONL, AccountExhausted, PaperMarket, SentimentAgent, SimulatedRoom
from llamakit.sdk import Client, Generation
from tests.agent.conftest import GradingHerd

pytestmark = pytest.mark.model


def test_the_agent_buys_and_skips_within_a_few_rounds_of_the_simulated_room(grading_herd: GradingHerd) -> None:
    key = grading_herd.account("agent-rounds", 1_000_000)
    room = SimulatedRoom(seed=0)  # as `llamakit up --agent` runs it
    market = PaperMarket(room.price, cash=1_000.0)
    with Client(url=grading_herd.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, market, trade_size=100.0, bid=1.5)
        outcomes = agent.run(6)
        account = client.account()
    assert agent.model == grading_herd.models[-1]  # Gemma when it is installed
    counts = agent.counts
    assert counts["requests"] == 6 and counts["error"] == 0
    assert counts["buy"] >= 1 and counts["skip"] >= 1, [o.sentiment for o in outcomes]
    for outcome in outcomes:
        assert outcome.sentiment in ("positive", "neutral", "negative")
        assert outcome.action == ("buy" if outcome.sentiment == "positive" else "skip")
        assert outcome.cost > 0 and outcome.request_id
    assert counts["buy"] == len(market.fills) and market.position > 0
    assert market.cash + market.cost_basis + market.fees_paid == pytest.approx(1_000.0)
    assert outcomes[-1].pnl != 0
    assert agent.spent == account.spent == sum(o.cost for o in outcomes)
    summary = grading_herd.stats()["agents"]["agent-rounds"]  # type: ignore[index]
    assert summary["total"] == 6
    assert {k: v for k, v in summary["counts"].items() if v} == {
        k: v for k, v in counts.items() if v and k != "requests"
    }
    assert summary["pnl"] == pytest.approx(outcomes[-1].pnl)
    assert summary["position"] == pytest.approx(market.position)
    frame = agent.frame()
    assert list(frame["action"]) == [o.action for o in outcomes]


class GarbledOnce(Client):
    """A client whose second reply comes back unusable, as a broken model or proxy might send."""

    calls = 0

    def generate(self, *args: object, **kwargs: object) -> Generation:
        result = super().generate(*args, **kwargs)  # type: ignore[arg-type]
        GarbledOnce.calls += 1
        return result.model_copy(update={"text": "banana"}) if GarbledOnce.calls == 2 else result


def test_an_unusable_reply_is_an_error_and_the_agent_goes_on(grading_herd: GradingHerd) -> None:
    key = grading_herd.account("agent-garbled", 1_000_000)
    room = SimulatedRoom(seed=2)
    with GarbledOnce(url=grading_herd.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, PaperMarket(room.price), model="gemma-3-270m")
        outcomes = agent.run(4)
    assert [o.action == "error" for o in outcomes] == [False, True, False, False]
    assert outcomes[1].error == "unusable reply 'banana'" and outcomes[1].cost > 0
    assert agent.counts["requests"] == 4


def test_the_agent_replays_a_world_file_to_its_end(grading_herd: GradingHerd) -> None:
    key = grading_herd.account("agent-replay", 1_000_000)
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.agent", "--router", grading_herd.url, "--world", str(EXAMPLE_CHAT_JSONL),
         "--interval", "0", "--history", "2"],
        env={**os.environ, "LLAMAKIT_API_KEY": key, "LLAMAKIT_USAGE_LOG": ""},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "the chat log" in proc.stderr and "has ended" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    summary = re.match(r"(\d+) requests: (\d+) buy, (\d+) skip, (\d+) error", last)
    assert summary is not None, last
    requests, buys, skips, errors = map(int, summary.groups())
    assert (requests, errors) == (18, 0) and buys > 0 and skips > 0, last


def test_an_empty_account_stops_the_agent_with_its_message(grading_herd: GradingHerd) -> None:
    key = grading_herd.account("agent-poor", 2_000)
    room = SimulatedRoom(seed=1)
    with Client(url=grading_herd.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, PaperMarket(room.price))
        with pytest.raises(AccountExhausted, match=r"cannot pay for another grade: it needs \d+ credits"):
            agent.run(50)
    assert 0 < len(agent.outcomes) < 50
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.agent", "--router", grading_herd.url, "--rounds", "20", "--interval", "0"],
        env={**os.environ, "LLAMAKIT_API_KEY": key, "LLAMAKIT_USAGE_LOG": ""},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "stopping: the agent's account cannot pay" in proc.stderr
