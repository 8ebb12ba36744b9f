"""Fee arithmetic in integer credits: fee schedules, bid multipliers, quotes, holds and settlements.

Pure functions with no I/O. Money is always an `int`; bids are exact `Decimal`s and every product is
computed as an exact fraction and rounded up once, so no float ever touches an amount.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, cast

__all__ = [
    "BID_TEXT",
    "CHAT_TEMPLATE_ALLOWANCE",
    "MAX_BID",
    "MAX_BID_DECIMALS",
    "MIN_BID",
    "PER_MESSAGE_ALLOWANCE",
    "Bid",
    "FeeSchedule",
    "cache_discount",
    "format_bid",
    "hold_amount",
    "parse_bid",
    "parse_discount",
    "prompt_token_bound",
    "quote",
    "raw_prompt_token_bound",
    "settle_amount",
]

Bid = Decimal
"""A validated bid multiplier: an exact decimal in [MIN_BID, MAX_BID]. Make one with `parse_bid`."""

MIN_BID = Decimal(1)
MAX_BID = Decimal(1000)
# A float such as 1.005 ** 3 prints with up to 17 significant digits, so 20 places accepts any bid a
# client computed in floating point while refusing a header of a million digits.
MAX_BID_DECIMALS = 20

CHAT_TEMPLATE_ALLOWANCE = 64
PER_MESSAGE_ALLOWANCE = 8
# A raw completion's prompt is its own tokens and a BOS, and SentencePiece's dummy-prefix space may take a token
# of its own; two more spare.
RAW_PROMPT_ALLOWANCE = 4

# ASCII digits only: Decimal() would also take "1_5" (15) and non-ASCII digits, which no client means.
BID_TEXT = re.compile(r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?", re.ASCII)

_FEE_FIELDS = ("base_fee", "prompt_token_fee", "completion_token_fee")
_OPTIONAL_FEE_FIELDS = ("cached_prompt_token_fee",)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number of credits or tokens (an int), got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class FeeSchedule:
    """What one model costs, in credits: a fixed fee per request plus a fee per prompt and per completion token.

    `cached_prompt_token_fee` is the fee of a prompt token that a node read from its prompt cache instead of
    decoding it (OpenAI's and OpenRouter's cached input price); None, the default, charges it as any prompt token.
    It may not be above `prompt_token_fee`: the hold assumes every prompt token fresh, so a cached token dearer
    than a fresh one could cost more than was held.
    """

    base_fee: int
    prompt_token_fee: int
    completion_token_fee: int
    cached_prompt_token_fee: int | None = None

    def __post_init__(self) -> None:
        for name in _FEE_FIELDS:
            _check_count(name, getattr(self, name))
        if self.cached_prompt_token_fee is not None:
            _check_count("cached_prompt_token_fee", self.cached_prompt_token_fee)
            if self.cached_prompt_token_fee > self.prompt_token_fee:
                raise ValueError(
                    f"cached_prompt_token_fee ({self.cached_prompt_token_fee}) may not be above prompt_token_fee "
                    f"({self.prompt_token_fee}): a prompt token read from a cache costs at most a fresh one"
                )

    @property
    def cached_fee(self) -> int:
        """The fee of a cached prompt token: `cached_prompt_token_fee`, or `prompt_token_fee` when it is unset."""
        return self.prompt_token_fee if self.cached_prompt_token_fee is None else self.cached_prompt_token_fee

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """The price of a request at bid 1: base + prompt fee × fresh prompt tokens + cached fee × cached prompt
        tokens + completion fee × completion tokens. `cached_tokens` are among `prompt_tokens` (as OpenAI counts
        them); more than `prompt_tokens` is a ValueError."""
        _check_count("prompt_tokens", prompt_tokens)
        _check_count("completion_tokens", completion_tokens)
        _check_count("cached_tokens", cached_tokens)
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens ({cached_tokens}) are part of prompt_tokens ({prompt_tokens})")
        fresh = prompt_tokens - cached_tokens
        return (
            self.base_fee
            + self.prompt_token_fee * fresh
            + self.cached_fee * cached_tokens
            + self.completion_token_fee * completion_tokens
        )

    def to_dict(self) -> dict[str, int]:
        """The three fees, and `cached_prompt_token_fee` when it is set (unset, it is the prompt token fee)."""
        fees = {name: getattr(self, name) for name in _FEE_FIELDS}
        if self.cached_prompt_token_fee is not None:
            fees["cached_prompt_token_fee"] = self.cached_prompt_token_fee
        return fees

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeeSchedule:
        """Build a schedule from a mapping with the three fee fields and optionally `cached_prompt_token_fee`, each
        a non-negative int (ValueError naming what is missing, unknown or wrong)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a fee schedule must be a mapping of {', '.join(_FEE_FIELDS)}, got {data!r}")
        missing = [name for name in _FEE_FIELDS if name not in data]
        unknown = sorted(str(key) for key in data if key not in _FEE_FIELDS and key not in _OPTIONAL_FEE_FIELDS)
        if missing or unknown:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(missing)}")
            if unknown:
                problems.append(f"unknown {', '.join(unknown)}")
            raise ValueError(
                f"a fee schedule needs exactly {', '.join(_FEE_FIELDS)}, and may have cached_prompt_token_fee "
                f"({'; '.join(problems)})"
            )
        return cls(
            base_fee=data["base_fee"],
            prompt_token_fee=data["prompt_token_fee"],
            completion_token_fee=data["completion_token_fee"],
            cached_prompt_token_fee=data.get("cached_prompt_token_fee"),
        )


def parse_bid(value: object) -> Bid:
    """Validate a bid multiplier and return it as an exact `Decimal`.

    Accepts an int, a float, a `Decimal` or a numeric string (the `X-Llamakit-Bid` header) between
    MIN_BID (1) and MAX_BID (1000) with at most MAX_BID_DECIMALS digits after the point. Floats go through
    `str()` first, so the bid 1.1 is exactly 1.1 and not 1.100000000000000088817841970012523.
    """
    return _bid_ratio(value)[0]


def _bid_ratio(value: object) -> tuple[Bid, int, int]:
    """`parse_bid(value)` with the bid as a ratio of ints, remembered for the few bids clients use: a request
    reads its bid three times (parse, hold, settle), which took 18 µs with Fractions and takes 2.3 µs so.
    Keyed by type as well as value, because True == 1 == 1.0 and only the last two are bids."""
    try:
        return _cached_bid_ratio(cast(Hashable, type(value)), value)
    except TypeError:  # unhashable: not a bid, and _parse_bid says why
        bid = _parse_bid(value)
        return (bid, *bid.as_integer_ratio())


@functools.lru_cache(maxsize=256)
def _cached_bid_ratio(_kind: Hashable, value: object) -> tuple[Bid, int, int]:
    bid = _parse_bid(value)
    return (bid, *bid.as_integer_ratio())


def _parse_bid(value: object) -> Bid:
    allowed = f"a bid must be a number from {MIN_BID} to {MAX_BID}"
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{allowed}, got {value!r}")
    text = value.strip() if isinstance(value, str) else str(value)
    if len(text) > 64:
        raise ValueError(f"{allowed} with at most {MAX_BID_DECIMALS} decimal places, got {text[:20]}…")
    if isinstance(value, str) and not BID_TEXT.fullmatch(text):
        raise ValueError(f"{allowed}, got {value!r}")
    try:
        bid = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{allowed}, got {value!r}") from None
    if not bid.is_finite():
        raise ValueError(f"{allowed}, got {value!r}")
    if bid < MIN_BID or bid > MAX_BID:
        raise ValueError(f"{allowed}, got {text}")
    numerator, denominator = bid.as_integer_ratio()
    if numerator * 10**MAX_BID_DECIMALS % denominator:
        raise ValueError(f"{allowed} with at most {MAX_BID_DECIMALS} decimal places, got {text}")
    return bid


def parse_discount(value: object) -> Decimal:
    """Validate a price multiplier below a bid's: a batch line pays `discount` × its price (`--batch-discount`).

    An exact decimal above 0 and at most 1 with at most MAX_BID_DECIMALS places, read as a bid is (a float through
    `str()`); ValueError otherwise."""
    allowed = "a discount must be a number above 0 and at most 1"
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"{allowed}, got {value!r}")
    text = value.strip() if isinstance(value, str) else str(value)
    if len(text) > 64 or (isinstance(value, str) and not BID_TEXT.fullmatch(text)):
        raise ValueError(f"{allowed}, got {value!r}")
    try:
        discount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{allowed}, got {value!r}") from None
    if not discount.is_finite() or not 0 < discount <= 1:
        raise ValueError(f"{allowed}, got {text}")
    numerator, denominator = discount.as_integer_ratio()
    if numerator * 10**MAX_BID_DECIMALS % denominator:
        raise ValueError(f"{allowed} with at most {MAX_BID_DECIMALS} decimal places, got {text}")
    return discount


def format_bid(bid: Bid) -> str:
    """A bid in plain positional notation without trailing zeros: 1.10 → '1.1', 1E+2 → '100'."""
    text = format(bid, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def quote(
    fees: FeeSchedule,
    bid: object,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    *,
    discount: Decimal | None = None,
) -> int:
    """The price of a request: ceil(bid × (base + prompt fee × fresh prompt tokens + cached fee × cached tokens
    + completion fee × completion tokens)), `cached_tokens` being among `prompt_tokens` (see FeeSchedule.cost).
    A batch line's `discount` (see `parse_discount`) multiplies the bid: ceil(bid × discount × (…)).

    `bid` is validated with `parse_bid`; the product is an exact fraction rounded up once.
    """
    _, numerator, denominator = _bid_ratio(bid)
    if discount is not None:
        off_numerator, off_denominator = parse_discount(discount).as_integer_ratio()
        numerator, denominator = numerator * off_numerator, denominator * off_denominator
    # Integer ceiling division of the exact product: exact for any size, unlike math.ceil on a float.
    return -(-(numerator * fees.cost(prompt_tokens, completion_tokens, cached_tokens)) // denominator)


def prompt_token_bound(texts: Iterable[str], *, messages: int) -> int:
    """A safe upper bound on the prompt tokens of a request, computed without the model's tokenizer.

    Every token of a byte-level BPE vocabulary (GPT-2/Llama 3/SmolLM2 style) or of a SentencePiece
    vocabulary with byte fallback (Llama 2/Gemma style) covers at least one byte of UTF-8, so a text never
    tokenizes into more tokens than it has bytes. What the bytes do not cover is what the chat template
    adds around them: a BOS token and a default system prompt that some templates inject
    (CHAT_TEMPLATE_ALLOWANCE, once), and the role markers, separators and SentencePiece's dummy-prefix
    space around each message (PER_MESSAGE_ALLOWANCE per message). Callers must pass every string the
    template renders (contents, and names if any); for a raw completion pass the prompt and messages=0.
    """
    _check_count("messages", messages)
    total = 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"prompt texts must be strings, got {type(text).__name__}")
        total += len(text.encode("utf-8", errors="surrogatepass"))
    return total + CHAT_TEMPLATE_ALLOWANCE + PER_MESSAGE_ALLOWANCE * messages


def raw_prompt_token_bound(prompt: str) -> int:
    """A safe upper bound on the tokens of a raw completion's prompt (no chat template): its UTF-8 bytes (see
    `prompt_token_bound`) and RAW_PROMPT_ALLOWANCE."""
    return prompt_token_bound([prompt], messages=0) - CHAT_TEMPLATE_ALLOWANCE + RAW_PROMPT_ALLOWANCE


def hold_amount(
    fees: FeeSchedule, bid: object, prompt_bound: int, max_tokens: int, *, discount: Decimal | None = None
) -> int:
    """What to hold before queueing: the quote for the prompt bound and the full `max_tokens`."""
    return quote(fees, bid, prompt_bound, max_tokens, discount=discount)


def settle_amount(
    fees: FeeSchedule,
    bid: object,
    prompt_tokens: int,
    completion_tokens: int,
    held: int,
    cached_tokens: int = 0,
    *,
    discount: Decimal | None = None,
) -> int:
    """What to charge for the tokens actually used: the quote (cached prompt tokens at their own fee), but never
    more than `held`."""
    _check_count("held", held)
    # The hold is the price the client agreed to before the request ran. If the prompt bound was ever
    # too low (a template we did not foresee), the operator absorbs the difference: charging more than
    # the hold could overdraw a balance that other requests are already counting on.
    return min(quote(fees, bid, prompt_tokens, completion_tokens, cached_tokens, discount=discount), held)


def cache_discount(
    fees: FeeSchedule,
    bid: object,
    prompt_tokens: int,
    completion_tokens: int,
    held: int,
    cached_tokens: int,
    *,
    discount: Decimal | None = None,
) -> int:
    """What reading `cached_tokens` from a cache saved the client, in credits: the charge had every prompt token
    been fresh, less the charge with the cached ones at their fee (both capped by `held`, as charges are);
    0 when the model has no cached fee of its own or nothing was cached (OpenRouter's `cache_discount`)."""
    full = settle_amount(fees, bid, prompt_tokens, completion_tokens, held, discount=discount)
    return full - settle_amount(fees, bid, prompt_tokens, completion_tokens, held, cached_tokens, discount=discount)
