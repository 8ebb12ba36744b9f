"""The sentiment-trading agent: reads the chat, pays for a 1–5 sentiment grade, buys when it is above 3.

Every round is one paid request and one outcome (Buy, Skip or Error), so Buy + Skip + Error = Requests. The
outcomes go to the router's events route, where the operator's dashboard sums them, and into a DataFrame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from llamakit.agent.market import InsufficientCash, PaperMarket
from llamakit.agent.world import Message, World
from llamakit.sdk import Client, InsufficientFunds, LlamakitError

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["GRADE_GRAMMAR", "AccountExhausted", "Outcome", "SentimentAgent", "grade_of"]

log = logging.getLogger(__name__)

# One digit, 1 to 5: the model cannot answer anything else.
GRADE_GRAMMAR = "root ::= [1-5]"
SYSTEM = (
    "You grade the sentiment of a group chat about a traded token. "
    "Answer with a single digit: 1 very negative, 2 negative, 3 neutral, 4 positive, 5 very positive."
)

Action = Literal["buy", "skip", "error"]


class AccountExhausted(Exception):
    """The agent's account cannot pay for another grade: the agent stops."""


@dataclass(frozen=True)
class Outcome:
    round: int
    time: datetime
    action: Action
    grade: int | None
    price: float
    position: float
    cash: float
    pnl: float
    cost: int  # credits paid for the grade
    spent: int  # credits paid so far
    request_id: str | None
    error: str | None


def grade_of(text: str) -> int | None:
    """The grade in a reply, or None when the reply is not a single digit from 1 to 5."""
    text = text.strip()
    return int(text) if len(text) == 1 and text in "12345" else None


def prompt_for(messages: list[Message]) -> list[dict[str, str]]:
    chat = "\n".join(f"{m.author}: {m.text}" for m in messages)
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Chat:\n{chat}\n\nSentiment grade (1-5):"},
    ]


class SentimentAgent:
    def __init__(
        self,
        client: Client,
        world: World,
        market: PaperMarket,
        *,
        model: str | None = None,
        bid: float | Literal["auto"] = 1.0,
        history: int = 3,
        trade_size: float = 100.0,
        report: bool = True,
    ) -> None:
        self.client = client
        self.world = world
        self.market = market
        self.model = model
        self.bid = bid
        self.history = history
        self.trade_size = trade_size
        self.report = report
        self.outcomes: list[Outcome] = []
        self.spent = 0

    @property
    def counts(self) -> dict[str, int]:
        counts = {"buy": 0, "skip": 0, "error": 0}
        for outcome in self.outcomes:
            counts[outcome.action] += 1
        return {**counts, "requests": len(self.outcomes)}

    def step(self) -> Outcome:
        """One round: advance the world, grade the latest messages, act, report. Raises AccountExhausted."""
        self.world.advance()
        messages = self.world.history(self.history)
        grade: int | None = None
        cost, request_id, error = 0, None, None
        try:
            result = self.client.chat(
                prompt_for(messages), grammar=GRADE_GRAMMAR, max_tokens=2, temperature=0.0, bid=self.bid,
                model=self.model,
            )  # fmt: skip
            cost, request_id = result.cost or 0, result.request_id
            grade = grade_of(result.text)
            if grade is None:
                error = f"unusable reply {result.text!r}"
        except InsufficientFunds as exc:
            raise AccountExhausted(
                f"the agent's account cannot pay for another grade: it needs {exc.needed} credits and has "
                f"{exc.balance}; deposit more (llamakit deposit <account> <credits>) and start it again"
            ) from exc
        except LlamakitError as exc:
            error = f"{type(exc).__name__}: {exc}"
        action: Action = "error" if error else "skip"
        if grade is not None and grade > 3:
            try:
                self.market.buy(min(self.trade_size, self.market.cash))
                action = "buy"
            except (InsufficientCash, ValueError) as exc:
                action, error = "error", f"cannot buy: {exc}"
        self.spent += cost
        outcome = Outcome(
            round=len(self.outcomes) + 1,
            time=datetime.now(UTC),
            action=action,
            grade=grade,
            price=self.market.price(),
            position=self.market.position,
            cash=self.market.cash,
            pnl=self.market.pnl(),
            cost=cost,
            spent=self.spent,
            request_id=request_id,
            error=error,
        )
        self.outcomes.append(outcome)
        if self.report:
            self._report(outcome)
        return outcome

    def _report(self, outcome: Outcome) -> None:
        data = {k: v for k, v in asdict(outcome).items() if k not in ("time", "action")}
        try:
            self.client.report_event(outcome.action, data)
        except LlamakitError as exc:  # the trade happened; a lost report must not stop the agent
            log.warning("could not report round %d to the router: %s", outcome.round, exc)

    def run(self, rounds: int | None, *, interval: float = 0.0) -> list[Outcome]:
        """Run `rounds` rounds (None: until stopped), one every `interval` seconds."""
        done = 0
        while rounds is None or done < rounds:
            started = time.monotonic()
            outcome = self.step()
            done += 1
            log.info(
                "round %d: grade %s → %s at %.2f, position %.4f, PnL %+.2f, spent %d credits",
                outcome.round, outcome.grade, outcome.action, outcome.price, outcome.position, outcome.pnl,
                outcome.spent,
            )  # fmt: skip
            if rounds is None or done < rounds:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        return self.outcomes

    def frame(self) -> pd.DataFrame:
        """The outcomes as a DataFrame, a row per round."""
        import pandas as pd

        frame = pd.DataFrame([asdict(o) for o in self.outcomes], columns=list(Outcome.__dataclass_fields__))
        return frame.astype({"round": "int64", "action": "category", "grade": "Int64", "cost": "int64"})
