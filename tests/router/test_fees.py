"""Fee arithmetic: exact bids, exact ceilings, safe prompt bounds, settlements that never exceed the hold."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal
from fractions import Fraction

import pytest

from llamakit.money.fees import (
    CHAT_TEMPLATE_ALLOWANCE,
    MAX_BID,
    PER_MESSAGE_ALLOWANCE,
    FeeSchedule,
    format_bid,
    hold_amount,
    parse_bid,
    prompt_token_bound,
    quote,
    raw_prompt_token_bound,
    settle_amount,
)

TEN = FeeSchedule(base_fee=10, prompt_token_fee=0, completion_token_fee=0)
THREE = FeeSchedule(base_fee=3, prompt_token_fee=0, completion_token_fee=0)
FEES = FeeSchedule(base_fee=5, prompt_token_fee=1, completion_token_fee=3)

MULTILINGUAL = [
    "Hello, world!",
    "Grüße aus Köln, ça va?",
    "Привет, как дела?",
    "日本語のテキストです。",
    "中文测试\uff0c一二三。",  # with a fullwidth comma
    "مرحبا بالعالم",
    "हिन्दी में नमस्ते",
    "emoji 🦙🦙 and ZWJ 👩‍👩‍👧",
    "<|im_start|>system\nnot really a system prompt<|im_end|>",
    "   lots   of    spaces\t\tand\ttabs\n\n\n",
    "a",
    "",
]


# -- FeeSchedule ------------------------------------------------------------------------------------


def test_cost_is_base_plus_per_token_fees() -> None:
    assert FEES.cost(0, 0) == 5
    assert FEES.cost(7, 2) == 5 + 7 * 1 + 2 * 3


@pytest.mark.parametrize(
    "fields",
    [
        {"base_fee": -1, "prompt_token_fee": 0, "completion_token_fee": 0},
        {"base_fee": 0, "prompt_token_fee": -1, "completion_token_fee": 0},
        {"base_fee": 0, "prompt_token_fee": 0, "completion_token_fee": -5},
        {"base_fee": 1.0, "prompt_token_fee": 0, "completion_token_fee": 0},
        {"base_fee": True, "prompt_token_fee": 0, "completion_token_fee": 0},
        {"base_fee": "1", "prompt_token_fee": 0, "completion_token_fee": 0},
    ],
)
def test_fee_schedule_rejects_negative_and_non_int_fees(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="fee"):
        FeeSchedule(**fields)  # type: ignore[arg-type]


def test_fee_schedule_round_trips_through_dict() -> None:
    assert FEES.to_dict() == {"base_fee": 5, "prompt_token_fee": 1, "completion_token_fee": 3}
    assert FeeSchedule.from_dict(FEES.to_dict()) == FEES


def test_fee_schedule_from_dict_names_missing_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="missing completion_token_fee"):
        FeeSchedule.from_dict({"base_fee": 1, "prompt_token_fee": 1})
    with pytest.raises(ValueError, match="unknown fee_per_token"):
        FeeSchedule.from_dict({**FEES.to_dict(), "fee_per_token": 1})


def test_cost_rejects_negative_tokens() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        FEES.cost(-1, 0)


# -- bids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, Decimal(1)),
        (1.1, Decimal("1.1")),
        ("1.1", Decimal("1.1")),
        (" 2.5 ", Decimal("2.5")),
        (Decimal("1.005"), Decimal("1.005")),
        (1000, Decimal(1000)),
        ("1e2", Decimal(100)),
        (1.005**3, Decimal(str(1.005**3))),
    ],
)
def test_parse_bid_keeps_the_decimal_the_client_wrote(value: object, expected: Decimal) -> None:
    bid = parse_bid(value)
    assert bid == expected
    assert isinstance(bid, Decimal)


@pytest.mark.parametrize(
    "value",
    [
        0.99,
        0,
        -1,
        "0.999999",
        float("nan"),
        float("inf"),
        float("-inf"),
        "nan",
        "Infinity",
        True,
        False,
        "abc",
        "",
        "1_5",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: Decimal() would accept it
        "0x10",
        None,
        [1],
        Fraction(3, 2),
        1000.0001,
        "1e4",
        "1." + "0" * 80 + "1",
        "1.000000000000000000001",
    ],
)
def test_parse_bid_rejects_what_is_not_an_allowed_multiplier(value: object) -> None:
    with pytest.raises(ValueError, match="bid must be a number from 1 to 1000"):
        parse_bid(value)


def test_max_bid_is_allowed_and_just_above_is_not() -> None:
    assert parse_bid(MAX_BID) == MAX_BID
    with pytest.raises(ValueError):
        parse_bid(MAX_BID + Decimal("0.01"))


def test_format_bid_is_plain_and_trimmed() -> None:
    assert format_bid(parse_bid("1.10")) == "1.1"
    assert format_bid(parse_bid("1e2")) == "100"
    assert format_bid(parse_bid(2)) == "2"


# -- quotes -----------------------------------------------------------------------------------------


def test_quote_is_exact_where_floats_round_up_wrongly() -> None:
    assert quote(TEN, 1.1, 0, 0) == 11
    assert quote(TEN, "1.1", 0, 0) == 11
    # In floating point 1.1 * 100 == 110.00000000000001, whose ceiling is 111.
    hundred = FeeSchedule(base_fee=100, prompt_token_fee=0, completion_token_fee=0)
    assert math.ceil(1.1 * 100) == 111
    assert quote(hundred, 1.1, 0, 0) == 110
    assert quote(FEES, 1.1, 0, 0) == 6  # 5.5 -> 6


def test_quote_rounds_a_fractional_price_up() -> None:
    assert quote(THREE, 1.5, 0, 0) == 5  # 4.5 -> 5
    assert quote(THREE, "1.000001", 0, 0) == 4  # 3.000003 -> 4
    assert quote(TEN, 1, 0, 0) == 10  # whole prices stay whole


def test_quote_uses_every_fee() -> None:
    assert quote(FEES, 1, 10, 20) == 5 + 10 + 60
    assert quote(FEES, 2, 10, 20) == 150
    assert quote(FEES, "1.25", 10, 20) == math.ceil(Fraction(5, 4) * 75)


def test_quote_is_exact_for_large_amounts() -> None:
    # Beyond 2**53 a float cannot even represent the base price.
    fees = FeeSchedule(base_fee=10**20 + 1, prompt_token_fee=0, completion_token_fee=0)
    assert quote(fees, 1, 0, 0) == 10**20 + 1
    assert quote(fees, "1.5", 0, 0) == 15 * 10**19 + 2  # 1.5 * (10**20 + 1) = ...0001.5 -> ...0002


def test_quote_matches_exact_fractions_over_a_grid() -> None:
    bids = ["1", "1.005", "1.1", "1.333", "2.5", "7.77", "999.999"]
    for bid, prompt, completion in itertools.product(bids, [0, 1, 17, 1000], [0, 3, 256]):
        exact = Fraction(bid) * FEES.cost(prompt, completion)
        price = quote(FEES, bid, prompt, completion)
        assert price == math.ceil(exact)
        assert price - 1 < exact <= price


def test_quote_rejects_an_invalid_bid() -> None:
    with pytest.raises(ValueError, match="bid"):
        quote(FEES, 0.5, 1, 1)


def test_hold_covers_every_settlement_within_the_bounds() -> None:
    held = hold_amount(FEES, "1.1", 40, 16)
    assert held == quote(FEES, "1.1", 40, 16)
    for prompt, completion in itertools.product(range(41), range(17)):
        charge = settle_amount(FEES, "1.1", prompt, completion, held)
        assert charge == quote(FEES, "1.1", prompt, completion)
        assert 0 <= charge <= held


def test_settle_never_exceeds_the_hold() -> None:
    held = hold_amount(FEES, 2, 10, 10)
    # More tokens than were held for: the charge stops at the hold.
    assert quote(FEES, 2, 50, 50) > held
    assert settle_amount(FEES, 2, 50, 50, held) == held
    assert settle_amount(FEES, 2, 50, 50, 0) == 0


def test_settle_rejects_a_negative_hold() -> None:
    with pytest.raises(ValueError, match="held"):
        settle_amount(FEES, 1, 1, 1, -1)


# -- prompt bound -----------------------------------------------------------------------------------


def test_prompt_bound_is_bytes_plus_allowances() -> None:
    texts = ["héllo", "🦙"]
    assert prompt_token_bound(texts, messages=2) == 6 + 4 + CHAT_TEMPLATE_ALLOWANCE + 2 * PER_MESSAGE_ALLOWANCE
    assert prompt_token_bound([], messages=0) == CHAT_TEMPLATE_ALLOWANCE


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_prompt_bound_counts_bytes_not_characters(text: str) -> None:
    bound = prompt_token_bound([text], messages=1)
    # A token is at least one byte, and a non-ASCII character is several bytes, never fewer than one.
    assert bound >= len(text.encode("utf-8")) + CHAT_TEMPLATE_ALLOWANCE + PER_MESSAGE_ALLOWANCE
    assert bound >= len(text) + CHAT_TEMPLATE_ALLOWANCE + PER_MESSAGE_ALLOWANCE


def test_prompt_bound_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="messages"):
        prompt_token_bound(["a"], messages=-1)
    with pytest.raises(ValueError, match="strings"):
        prompt_token_bound([b"bytes"], messages=1)  # type: ignore[list-item]


@pytest.mark.model
@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_prompt_bound_holds_for_real_tokenizers(model: str) -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llamakit.catalog import ModelNotAvailable, resolve_model

    try:
        path = resolve_model(model).path
    except ModelNotAvailable as exc:
        pytest.skip(str(exc))
    llm = Llama(str(path), vocab_only=True, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")
    conversations = [[text] for text in MULTILINGUAL] + [MULTILINGUAL, ["a"] * 20, [""] * 5]
    for texts in conversations:
        if template:
            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm.detokenize([llm.token_eos()]).decode(),
                bos_token=llm.detokenize([llm.token_bos()]).decode(),
            )
            messages = [{"role": "user", "content": text} for text in texts]
            prompt = formatter(messages=messages).prompt  # type: ignore[arg-type]
            bound = prompt_token_bound(texts, messages=len(texts))
        else:
            prompt = "".join(texts)
            bound = prompt_token_bound([prompt], messages=0)
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        assert len(tokens) <= bound, (texts, len(tokens), bound)
        for text in texts:  # each as a raw completion's prompt, as the node tokenizes it
            raw = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert len(raw) <= raw_prompt_token_bound(text), (text, len(raw))


def test_remembered_bids_are_told_apart_by_type() -> None:
    assert str(parse_bid(1)) == "1" and str(parse_bid(1.0)) == "1.0" and str(parse_bid("1.50")) == "1.50"
    with pytest.raises(ValueError):
        parse_bid(True)  # equal to 1, and remembered 1 must not make it a bid
    with pytest.raises(ValueError):
        parse_bid([1])  # unhashable: refused with the reason, not a TypeError
    fees = FeeSchedule(base_fee=10, prompt_token_fee=1, completion_token_fee=3)
    assert quote(fees, Decimal("1.005"), 7, 5) == 33  # 1.005 × 32 = 32.16, rounded up
    assert quote(fees, "1.005", 7, 5) == quote(fees, 1.005, 7, 5) == 33
