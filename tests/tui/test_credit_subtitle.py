"""The fees panel's border says what a credit is worth in the longest wording that fits, never cut short."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llamakit.tui._widgets import _credit_subtitle


@pytest.mark.parametrize("value", ["0.000001", "2.5", "0.000000123456789012", "123456.789"])
@pytest.mark.parametrize("width", [24, 30, 36, 48, 80])
def test_the_credit_value_fits_its_border_and_keeps_its_value(value: str, width: int) -> None:
    text = _credit_subtitle(Decimal(value), "USD", width)
    assert len(text) <= width - 6 or (text.startswith("1 = ") and "E" in text)  # the shortest form at the least
    number = text.removesuffix(" USD").rsplit(" ", 1)[-1]
    assert Decimal(number) == Decimal(value)


def test_a_wide_border_gets_the_whole_wording() -> None:
    assert _credit_subtitle(Decimal("0.000001"), "USD", 60) == "credits · 1 = 0.000001 USD"
    assert _credit_subtitle(Decimal("0.000000123456789012"), "EUR", 30) == "1 = 1.23456789012E-7 EUR"
