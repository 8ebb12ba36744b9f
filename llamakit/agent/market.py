"""A paper market: one trade token against a quote currency, fills at the current price with a fee.

The books are kept so they can be checked: cash + fees paid + cost of the position held = starting cash, and
profit and loss is marked to the current price.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["Fill", "InsufficientCash", "PaperMarket"]


class InsufficientCash(Exception):
    """A buy for more quote currency than the account has."""


@dataclass(frozen=True)
class Fill:
    time: str
    side: str
    price: float
    quantity: float
    quote: float
    fee: float
    cash_after: float
    position_after: float


class PaperMarket:
    def __init__(
        self,
        price: Callable[[], float],
        *,
        cash: float = 10_000.0,
        fee_rate: float = 0.001,
        trade_log: Path | None = None,
    ) -> None:
        if cash < 0 or not 0 <= fee_rate < 1:
            raise ValueError("cash must be >= 0 and fee_rate in [0, 1)")
        self._price = price
        self.starting_cash = cash
        self.cash = cash
        self.fee_rate = fee_rate
        self.position = 0.0
        self.cost_basis = 0.0  # quote currency spent on the position held, fees excluded
        self.fees_paid = 0.0
        self.fills: list[Fill] = []
        self._log = trade_log
        self._lock = threading.Lock()

    def price(self) -> float:
        return self._price()

    def buy(self, quote: float) -> Fill:
        """Spend `quote` (fee included) on the token at the current price."""
        if quote <= 0:
            raise ValueError("a buy must spend a positive amount")
        with self._lock:
            if quote > self.cash + 1e-9:
                raise InsufficientCash(f"a buy of {quote:.2f} needs more than the {self.cash:.2f} cash left")
            price = self._price()
            fee = quote * self.fee_rate
            quantity = (quote - fee) / price
            self.cash -= quote
            self.position += quantity
            self.cost_basis += quote - fee
            self.fees_paid += fee
            return self._record("buy", price, quantity, quote, fee)

    def sell_all(self) -> Fill | None:
        """Sell the whole position at the current price (fee taken from the proceeds)."""
        with self._lock:
            if self.position <= 0:
                return None
            price = self._price()
            gross = self.position * price
            fee = gross * self.fee_rate
            quantity = self.position
            self.cash += gross - fee
            self.fees_paid += fee
            self.position, self.cost_basis = 0.0, 0.0
            return self._record("sell", price, quantity, gross, fee)

    def _record(self, side: str, price: float, quantity: float, quote: float, fee: float) -> Fill:
        fill = Fill(datetime.now(UTC).isoformat(), side, price, quantity, quote, fee, self.cash, self.position)
        self.fills.append(fill)
        if self._log is not None:
            with self._log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(fill)) + "\n")
        return fill

    def equity(self) -> float:
        return self.cash + self.position * self._price()

    def pnl(self) -> float:
        """Profit and loss marked to market, fees included."""
        return self.equity() - self.starting_cash
