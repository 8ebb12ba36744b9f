"""JSON numbers as llamakit reads them from a request body: exactly where money is.

`json.loads` reads `1.000000000000000000001` as the float 1.0, so a bid written with more digits than a float
holds would pass the exact-decimal check as 1. `read_float` (the `parse_float` of `wire.completions.parse_json`)
keeps the text of such a number: a float whose shortest form means the same decimal as the JSON text (`1.5`,
`0.7`: nearly every number a client writes) is a plain float; any other is an `InexactFloat`, a float that
carries its text. The `Bid` type reads a bid from that text, so that the bid's own decimal digits are checked
(at most 20 decimal places, see `llamakit.money.fees.parse_bid`), never a float's rounding of them.

A number written with a fraction or an exponent that is a whole number (`10.0`, `1e3`) is read as that integer,
as JSON Schema's `integer` (what /openapi.json says of the integer fields) counts it: request models are strict
(a string or a boolean is no number), and `10.0` is ten tokens, `10.5` is a 400.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictFloat, StrictInt

from llamakit.money.fees import BID_TEXT, MAX_BID, MIN_BID

__all__ = ["Bid", "InexactFloat", "exact_number", "read_float"]


class InexactFloat(float):
    """A JSON number that no float holds exactly as written: the nearest float, with the JSON `text`."""

    text: str

    def __new__(cls, text: str) -> InexactFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


# Whole numbers up to this size are read as ints; past it a float's integers are no longer every integer.
_EXACT_INTEGERS = 2**53


def read_float(text: str) -> float | int:
    """A JSON number with a fraction or an exponent: an int when it is a whole number a float holds exactly
    (`10.0`, `1e3`), a float, or an InexactFloat when the float's shortest form is another decimal than `text`
    (`1.000000000000000000001` reads as 1.0)."""
    number = float(text)
    exact = Decimal(repr(number)) == Decimal(text)
    if exact and number.is_integer() and abs(number) < _EXACT_INTEGERS:
        return int(number)
    return number if exact else InexactFloat(text)


def exact_number(value: Any) -> Any:
    """A field validator's first step for money: an InexactFloat becomes its JSON text, which the field's
    own parsing reads exactly (or refuses, naming the digits it cannot hold)."""
    return value.text if isinstance(value, InexactFloat) else value


# A bid in a request body: a JSON number, or its decimal text as in the header; read exactly, never as a float.
# Its range and digits are checked where it is priced (`parse_bid`: 400 `invalid_bid`, which says what a bid
# is); the schema says the same range and text.
_RANGE = {"minimum": int(MIN_BID), "maximum": int(MAX_BID)}
Bid = Annotated[
    Annotated[StrictInt, Field(json_schema_extra=_RANGE)]
    | Annotated[StrictFloat, Field(json_schema_extra=_RANGE)]
    | Annotated[str, Field(json_schema_extra={"pattern": f"^({BID_TEXT.pattern})$"})],
    BeforeValidator(exact_number),
    Field(
        description="llamakit's bid: a multiplier on every fee, from 1 to 1000 with at most 20 decimal places, "
        "read exactly from the number's text (default 1; also the X-Llamakit-Bid header)"
    ),
]
