"""Prices in the operator's currency: what one credit is worth, and credits turned into money exactly.

The ledger moves integer credits; the operator says what a credit is worth (`--credit-value`, `--currency`).
A price is the exact product credits × credit value, a `Decimal` with as many decimal places as the credit
value has, so 62 credits at 0.000001 USD are 0.000062 USD and never 6.2000000000000004e-05. On the wire a
price is a JSON number (OpenRouter's `usage.cost` is one): `price_number` turns it into the float whose
shortest form is that decimal, which is exact while the price has at most 15 significant digits (a credit
value has at most 6, so any charge below 10^9 credits; 10^14 at the default value).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = [
    "DEFAULT_CREDIT_VALUE",
    "DEFAULT_CURRENCY",
    "ISO_4217",
    "CreditValue",
    "format_price",
    "parse_credit_value",
    "parse_currency",
    "price_number",
]

DEFAULT_CREDIT_VALUE = Decimal("0.000001")  # a millionth: 1 credit per token reads as 1 per million tokens
DEFAULT_CURRENCY = "USD"

MAX_CREDIT_DIGITS = 6
MIN_CREDIT_VALUE = Decimal("1e-18")
MAX_CREDIT_VALUE = Decimal("1e6")

# ISO 4217 alphabetic codes in use (funds and precious metals included, and a few withdrawn lately, which
# a ledger started before their withdrawal may still be priced in).
_ISO_4217_CODES = """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
    CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
    GEL GHS GIP GMD GNF GTQ GYD HKD HNL HRK HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD
    NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE
    SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED
    VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG
    ZWL
"""
ISO_4217 = frozenset(_ISO_4217_CODES.split())

# ASCII digits only, as for bids: Decimal() would also take "1_5", "NaN" and non-ASCII digits.
_DECIMAL_TEXT = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?", re.ASCII)


def parse_credit_value(value: object) -> Decimal:
    """What one credit is worth, validated: a positive finite decimal from 1e-18 to 1e6 with at most 6
    significant digits (`0.000001`, `1e-6`, `0.0000025`). Floats go through `str()`, so 0.000001 stays exact.
    ValueError says what was wrong."""
    allowed = (
        f"the credit value must be a number from 1e-18 to 1000000 with at most {MAX_CREDIT_DIGITS} significant "
        "digits, such as 0.000001 (a credit worth a millionth of the currency)"
    )
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{allowed}; got {value!r}")
    text = value.strip() if isinstance(value, str) else str(value)
    if len(text) > 64 or (isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(text)):
        raise ValueError(f"{allowed}; got {text[:64]!r}")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{allowed}; got {text!r}") from None
    if not amount.is_finite() or not MIN_CREDIT_VALUE <= amount <= MAX_CREDIT_VALUE:
        raise ValueError(f"{allowed}; got {text}")
    amount = amount.normalize()
    if len(amount.as_tuple().digits) > MAX_CREDIT_DIGITS:
        raise ValueError(f"{allowed}; got {text}")
    return amount


def parse_currency(value: object) -> str:
    """An ISO 4217 currency code such as USD, EUR or JPY (any case; returned in upper case)."""
    code = value.strip().upper() if isinstance(value, str) else None
    if code not in ISO_4217:
        raise ValueError(f"the currency must be an ISO 4217 code such as USD, EUR or JPY; got {value!r}")
    return code


def format_price(price: Decimal) -> str:
    """A price in plain positional notation without trailing zeros: 0.0000620 → '0.000062', 1E+1 → '10'."""
    text = format(price, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def price_number(price: Decimal) -> float:
    """The JSON number of a price: the float whose shortest form (`repr`, what `json.dumps` writes) is the
    decimal itself, for any price of at most 15 significant digits."""
    return float(price)


@dataclass(frozen=True)
class CreditValue:
    """What one credit is worth: `value` units of `currency`, both validated (ValueError saying what is wrong)."""

    value: Decimal = DEFAULT_CREDIT_VALUE
    currency: str = DEFAULT_CURRENCY

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", parse_credit_value(self.value))
        object.__setattr__(self, "currency", parse_currency(self.currency))

    def price(self, credits: int) -> Decimal:
        """The exact price of `credits`: an integer times a decimal, so nothing is rounded."""
        return credits * self.value

    def cost_fields(self, credits: int) -> dict[str, float | int]:
        """`cost` (the price, a JSON number) and `cost_credits` (the exact integer), as a usage carries them."""
        return {"cost": price_number(self.price(credits)), "cost_credits": credits}

    def discount_fields(self, credits: int) -> dict[str, float | int]:
        """A usage's `cost_details`: `cache_discount` (what cached prompt tokens took off the price, in the
        currency, as OpenRouter names it) and `cache_discount_credits` (the exact integer)."""
        return {"cache_discount": price_number(self.price(credits)), "cache_discount_credits": credits}

    def fee_prices(
        self,
        base_fee: int,
        prompt_token_fee: int,
        completion_token_fee: int,
        cached_prompt_token_fee: int | None = None,
    ) -> dict[str, object]:
        """A fee schedule in the currency: per request, and per million prompt and completion tokens; per million
        cached prompt tokens too when the schedule has a fee of its own for them."""
        million = 1_000_000
        prices: dict[str, object] = {
            "currency": self.currency,
            "per_request": price_number(self.price(base_fee)),
            "per_million_prompt_tokens": price_number(self.price(prompt_token_fee * million)),
            "per_million_completion_tokens": price_number(self.price(completion_token_fee * million)),
        }
        if cached_prompt_token_fee is not None:
            prices["per_million_cached_prompt_tokens"] = price_number(self.price(cached_prompt_token_fee * million))
        return prices

    def describe(self) -> dict[str, object]:
        """What clients need to convert credits: the currency, and a credit's value as a number and as exact text."""
        return {
            "currency": self.currency,
            "credit_value": price_number(self.value),
            "credit_value_exact": format_price(self.value),
        }
