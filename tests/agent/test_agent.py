"""The sentiment-trading agent with the real model through a real router: counts, trades, events, failures."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from llamakit.agent import AccountExhausted, PaperMarket, SentimentAgent, SimulatedRoom, grade_of
from llamakit.sdk import Client, Generation
from tests.sdk.conftest import ADMIN_KEY, LiveRouter

pytestmark = pytest.mark.model


def new_account(router: LiveRouter, name: str, deposit: int) -> str:
    with httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        key: str = admin.post("/admin/accounts", json={"name": name, "kind": "agent", "deposit": deposit}).json()[
            "api_key"
        ]
        return key


def stats(router: LiveRouter) -> dict[str, object]:
    with httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        data: dict[str, object] = admin.get("/admin/stats").json()
        return data


def test_grade_of() -> None:
    assert [grade_of(t) for t in ("4", " 2\n", "0", "6", "45", "", "four")] == [4, 2, None, None, None, None, None]


def test_rounds_with_the_real_model_add_up(live_router: LiveRouter) -> None:
    key = new_account(live_router, "agent-rounds", 100_000)
    room = SimulatedRoom(seed=11)
    market = PaperMarket(room.price, cash=1_000.0)
    with Client(url=live_router.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, market, trade_size=100.0, bid=1.5)
        outcomes = agent.run(8)
        account = client.account()
    counts = agent.counts
    assert counts["buy"] + counts["skip"] + counts["error"] == counts["requests"] == 8
    for outcome in outcomes:
        assert outcome.grade is not None and 1 <= outcome.grade <= 5
        assert outcome.action == ("buy" if outcome.grade > 3 else "skip")
        assert outcome.cost > 0 and outcome.request_id
    assert counts["buy"] == len(market.fills)
    assert market.cash + market.cost_basis + market.fees_paid == pytest.approx(1_000.0)
    assert market.position == pytest.approx(sum(f.quantity for f in market.fills))
    assert agent.spent == account.spent == sum(o.cost for o in outcomes)
    summary = stats(live_router)["agents"]["agent-rounds"]  # type: ignore[index]
    assert summary["total"] == 8
    assert {k: v for k, v in summary["counts"].items() if v} == {
        k: v for k, v in counts.items() if v and k != "requests"
    }
    assert summary["pnl"] == pytest.approx(outcomes[-1].pnl)
    frame = agent.frame()
    assert list(frame["action"]) == [o.action for o in outcomes] and str(frame["grade"].dtype) == "Int64"


class GarbledOnce(Client):
    """A client whose second reply comes back unusable, as a broken model or proxy might send."""

    calls = 0

    def chat(self, *args: object, **kwargs: object) -> Generation:
        result = super().chat(*args, **kwargs)  # type: ignore[arg-type]
        GarbledOnce.calls += 1
        return result.model_copy(update={"text": "banana"}) if GarbledOnce.calls == 2 else result


def test_an_unusable_reply_is_an_error_and_the_agent_goes_on(live_router: LiveRouter) -> None:
    key = new_account(live_router, "agent-garbled", 100_000)
    room = SimulatedRoom(seed=2)
    with GarbledOnce(url=live_router.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, PaperMarket(room.price))
        outcomes = agent.run(4)
    assert [o.action == "error" for o in outcomes] == [False, True, False, False]
    assert outcomes[1].error == "unusable reply 'banana'" and outcomes[1].cost > 0
    assert agent.counts["requests"] == 4


def test_an_empty_account_stops_the_agent_with_its_message(live_router: LiveRouter) -> None:
    key = new_account(live_router, "agent-poor", 500)
    room = SimulatedRoom(seed=1)
    with Client(url=live_router.url, api_key=key, usage_log=None) as client:
        agent = SentimentAgent(client, room, PaperMarket(room.price))
        with pytest.raises(AccountExhausted, match=r"cannot pay for another grade: it needs \d+ credits"):
            agent.run(50)
    assert 0 < len(agent.outcomes) < 50
    proc = subprocess.run(
        [sys.executable, "-m", "llamakit.agent", "--router", live_router.url, "--rounds", "20", "--interval", "0"],
        env={**os.environ, "LLAMAKIT_API_KEY": key, "LLAMAKIT_USAGE_LOG": ""},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "stopping: the agent's account cannot pay" in proc.stderr
