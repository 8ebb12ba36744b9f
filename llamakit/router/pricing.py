"""The price list: a fee schedule per model, a default for the rest, changeable while the router runs; and a
charge's price in the headers of an answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamakit.money.currency import CreditValue, format_price
from llamakit.money.fees import FeeSchedule
from llamakit.wire.headers import COST_CREDITS_HEADER, COST_HEADER

__all__ = ["PriceList", "cost_headers"]

DEFAULT_KEY = "*"


class PriceList:
    def __init__(self, default: FeeSchedule, per_model: dict[str, FeeSchedule] | None = None) -> None:
        self.default = default
        self.per_model = dict(per_model or {})

    @classmethod
    def from_file(cls, path: Path, default: FeeSchedule) -> PriceList:
        """Read `{"<model>": {"base_fee": …, "prompt_token_fee": …, "completion_token_fee": …}, "*": {…}}`; a
        schedule may add `cached_prompt_token_fee` (see FeeSchedule)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the fee file {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"the fee file {str(path)!r} must hold a JSON object of model → fee schedule")
        schedules: dict[str, FeeSchedule] = {}
        for model, fees in data.items():
            try:
                schedules[model] = FeeSchedule.from_dict(fees)
            except ValueError as exc:
                raise ValueError(f"fee file {str(path)!r}, model {model!r}: {exc}") from exc
        return cls(schedules.pop(DEFAULT_KEY, default), schedules)

    def fees(self, model: str) -> FeeSchedule:
        return self.per_model.get(model, self.default)

    def set(self, model: str, fees: FeeSchedule) -> None:
        if model == DEFAULT_KEY:
            self.default = fees
        else:
            self.per_model[model] = fees

    def remove(self, model: str) -> FeeSchedule | None:
        """Drop `model`'s own fees (it costs the default again); the fees removed, None when it had none."""
        return self.per_model.pop(model, None)

    def to_dict(self, models: list[str] | None = None) -> dict[str, Any]:
        names = sorted(set(self.per_model) | set(models or []))
        return {DEFAULT_KEY: self.default.to_dict(), **{m: self.fees(m).to_dict() for m in names}}


def cost_headers(money: CreditValue, charge: int) -> dict[str, str]:
    """The charge of a whole answer in its headers: the price as exact decimal text, and the credits."""
    return {COST_HEADER: format_price(money.price(charge)), COST_CREDITS_HEADER: str(charge)}
