"""The sentiment-trading agent: reads the chat, pays the herd for a sentiment grade, buys when it is positive.

Every round is one grade (one or a few paid requests) and one outcome (Buy, Skip or Error), so Buy + Skip +
Error = Requests. The outcomes go to the router's events route, where the operator's dashboard sums them, and
into a DataFrame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from llamakit.agent.grader import PREFERRED_MODELS, Grade, Method, SentimentGrader, default_method
from llamakit.agent.market import InsufficientCash, PaperMarket
from llamakit.agent.world import World
from llamakit.sdk import Client, InsufficientFunds, LlamakitError

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = ["AccountExhausted", "Outcome", "SentimentAgent", "choose_model", "decide"]

log = logging.getLogger(__name__)

Action = Literal["buy", "skip", "error"]


class AccountExhausted(Exception):
    """The agent's account cannot pay for another grade: the agent stops."""


@dataclass(frozen=True)
class Outcome:
    """One round. Prices, cash and PnL are in the quote currency, `position` in tokens, costs in credits."""

    round: int
    time: datetime
    action: Action
    sentiment: str | None  # positive, neutral, negative; None when the grade failed
    score: float | None  # -1.0 (all votes negative) … +1.0 (all positive)
    price: float
    position: float
    cash: float
    pnl: float
    cost: int  # credits paid for this round's grade
    spent: int  # credits paid so far
    request_id: str | None
    error: str | None


def decide(grade: Grade, *, buy_above: float = 0.5) -> Action:
    """Buy when the grade is positive with a score of at least `buy_above` (in -1…1), skip otherwise.

    A single request's positive grade scores 1.0; with votes, the score is the positive share minus the
    negative share, so the default 0.5 asks for a clear majority. A grade without a sentiment is an error.
    """
    if grade.sentiment is None:
        return "error"
    return "buy" if grade.sentiment == "positive" and grade.score >= buy_above else "skip"


def choose_model(client: Client) -> str | None:
    """The first of `PREFERRED_MODELS` the herd serves (the one that graded best), else None (its default)."""
    served = {model.id for model in client.models()}
    return next((model for model in PREFERRED_MODELS if model in served), None)


class SentimentAgent:
    """Grades the latest `history` messages of `world` each round and buys `trade_size` (quote currency) of
    the token on `market` when the grade is positive enough (`decide`).

    `model` None picks the best model the herd serves (`choose_model`) at the first round; `method` None
    takes the method measured best for that model (`grader.default_method`).
    """

    def __init__(
        self,
        client: Client,
        world: World,
        market: PaperMarket,
        *,
        model: str | None = None,
        method: Method | None = None,
        bid: float | Literal["auto"] = 1.0,
        history: int = 3,
        trade_size: float = 100.0,
        buy_above: float = 0.5,
        report: bool = True,
    ) -> None:
        self.client = client
        self.world = world
        self.market = market
        self.model = model
        self.method = method
        self.bid = bid
        self.history = history
        self.trade_size = trade_size
        self.buy_above = buy_above
        self.report = report
        self.outcomes: list[Outcome] = []
        self.spent = 0
        self._grader: SentimentGrader | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = {"buy": 0, "skip": 0, "error": 0}
        for outcome in self.outcomes:
            counts[outcome.action] += 1
        return {**counts, "requests": len(self.outcomes)}

    def grader(self) -> SentimentGrader:
        """The grader, made at the first call (which asks the herd for its models when `model` is None)."""
        if self._grader is None:
            if self.model is None:
                self.model = choose_model(self.client)
            method = self.method or default_method(self.model)
            self.method = method
            self._grader = SentimentGrader(self.client, method=method, model=self.model, bid=self.bid)
            log.info("grading with %s on %s", method.name, self.model or "the router's default model")
        return self._grader

    def step(self) -> Outcome:
        """One round: advance the world, grade the latest messages, act, report. Raises AccountExhausted."""
        self.world.advance()
        messages = self.world.history(self.history)
        grade: Grade | None = None
        error = None
        try:
            grade = self.grader().grade(messages)
        except InsufficientFunds as exc:
            raise AccountExhausted(
                f"the agent's account cannot pay for another grade: it needs {exc.needed} credits and has "
                f"{exc.balance}; deposit more (llamakit deposit <account> <credits>) and start it again"
            ) from exc
        except LlamakitError as exc:
            error = f"{type(exc).__name__}: {exc}"
        action: Action = "error" if grade is None else decide(grade, buy_above=self.buy_above)
        if grade is not None and grade.sentiment is None:
            error = f"unusable reply {' / '.join(repr(r) for r in grade.replies)}"
        if action == "buy":
            try:
                self.market.buy(min(self.trade_size, self.market.cash))
            except (InsufficientCash, ValueError) as exc:
                action, error = "error", f"cannot buy: {exc}"
        cost = grade.cost if grade is not None else 0
        self.spent += cost
        outcome = Outcome(
            round=len(self.outcomes) + 1,
            time=datetime.now(UTC),
            action=action,
            sentiment=None if grade is None else grade.sentiment,
            score=None if grade is None or grade.sentiment is None else grade.score,
            price=self.market.price(),
            position=self.market.position,
            cash=self.market.cash,
            pnl=self.market.pnl(),
            cost=cost,
            spent=self.spent,
            request_id=grade.request_ids[0] if grade is not None and grade.request_ids else None,
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
        """Run `rounds` rounds (None: until stopped or the world is exhausted), one every `interval` seconds.

        Returns every outcome so far. Raises AccountExhausted when the account cannot pay for a grade.
        """
        done = 0
        while (rounds is None or done < rounds) and not self.world.exhausted:
            started = time.monotonic()
            outcome = self.step()
            done += 1
            log.info(
                "round %d: %s → %s at %.2f, position %.4f, PnL %+.2f, spent %d credits",
                outcome.round, outcome.sentiment or outcome.error, outcome.action, outcome.price, outcome.position,
                outcome.pnl, outcome.spent,
            )  # fmt: skip
            if (rounds is None or done < rounds) and not self.world.exhausted:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
        return self.outcomes

    def frame(self) -> pd.DataFrame:
        """The outcomes as a DataFrame, a row per round."""
        import pandas as pd

        frame = pd.DataFrame([asdict(o) for o in self.outcomes], columns=list(Outcome.__dataclass_fields__))
        return frame.astype({"round": "int64", "action": "category", "sentiment": "category", "cost": "int64"})
