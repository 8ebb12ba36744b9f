"""JSON numbers as llamakit reads them from a request body: exactly where money is.

`json.loads` reads `1.000000000000000000001` as the float 1.0, so a bid written with more digits than a float
holds would pass the exact-decimal check as 1. `read_float` (the `parse_float` of `wire.completions.parse_json`)
keeps the text of such a number: a float whose shortest form means the same decimal as the JSON text (`1.5`,
`0.7`, `1e3`: nearly every number a client writes) is a plain float; any other is an `InexactFloat`, a float
that carries its text. The `Bid` type reads a bid from that text, so that the bid's own decimal digits are
checked (at most 20 decimal places, see `llamakit.money.fees.parse_bid`), never a float's rounding of them.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictFloat, StrictInt

__all__ = ["Bid", "InexactFloat", "exact_number", "read_float"]


class InexactFloat(float):
    """A JSON number that no float holds exactly as written: the nearest float, with the JSON `text`."""

    text: str

    def __new__(cls, text: str) -> InexactFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def read_float(text: str) -> float:
    """A JSON number with a fraction or an exponent: a float, or an InexactFloat when the float's shortest
    form is another decimal than `text` (`1.000000000000000000001` reads as 1.0)."""
    number = float(text)
    if Decimal(repr(number)) == Decimal(text):
        return number
    return InexactFloat(text)


def exact_number(value: Any) -> Any:
    """A field validator's first step for money: an InexactFloat becomes its JSON text, which the field's
    own parsing reads exactly (or refuses, naming the digits it cannot hold)."""
    return value.text if isinstance(value, InexactFloat) else value


# A bid in a request body: a JSON number, or its decimal text as in the header; read exactly, never as a float.
# Its range and digits are checked where it is priced (`parse_bid`: 400 `invalid_bid`).
Bid = Annotated[
    StrictInt | StrictFloat | str,
    BeforeValidator(exact_number),
    Field(
        description="llamakit's bid: a multiplier on every fee, from 1 to 1000 with at most 20 decimal places, "
        "read exactly from the number's text (default 1; also the X-Llamakit-Bid header)"
    ),
]
