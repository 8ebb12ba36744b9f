"""Prices in the operator's currency: `usage.cost` is credits × the credit value, exact, on every route that
reports usage; `usage.cost_credits` is what the ledger moved; info, models, records and logs say both."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from llamakit.cli import build_parser
from llamakit.money.currency import CreditValue, format_price, parse_credit_value, parse_currency, price_number
from llamakit.router import RouterSettings
from llamakit.router.ledger import Remembered
from llamakit.router.paid.idempotency import recall_answer
from llamakit.router.settings import settings_from_args
from tests.router.ledger.conftest import BACKENDS, backend_url, execute
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"  # the fake node counts 4 + 3 = 7 prompt tokens


def sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# --- the arithmetic


def test_a_price_is_the_exact_decimal_product_and_its_json_number_has_no_float_drift() -> None:
    money = CreditValue()
    assert money.price(33) == Decimal("0.000033")
    assert 33 * 0.000001 == 3.2999999999999996e-05  # what float arithmetic would have reported
    assert json.dumps(money.cost_fields(33)) == '{"cost": 3.3e-05, "cost_credits": 33}'
    assert format_price(money.price(33)) == "0.000033" and format_price(money.price(0)) == "0"
    tenth = CreditValue(Decimal("0.07"), "EUR")
    assert [price_number(tenth.price(n)) for n in (3, 41)] == [0.21, 2.87]  # 3 × 0.07 is 0.21000000000000002
    assert format_price(Decimal("0.0000620")) == "0.000062" and format_price(Decimal("1E+1")) == "10"


@pytest.mark.parametrize(
    ("given", "value"),
    [("0.000001", "0.000001"), ("1e-6", "0.000001"), ("0.0000010", "0.000001"), ("0.0025", "0.0025"), ("1", "1"),
     (0.01, "0.01"), (5, "5"), (" 2.5 ", "2.5")],
)  # fmt: skip
def test_credit_values_that_are_accepted(given: object, value: str) -> None:
    assert format_price(parse_credit_value(given)) == value


@pytest.mark.parametrize(
    "given", ["0", "-0.000001", "nan", "inf", "Infinity", "1e-19", "2000000", "0.0000012345678", "1_0", "٣", "", "$1",
              True, None, [1]],
)  # fmt: skip
def test_credit_values_that_are_refused_say_what_a_credit_value_is(given: object) -> None:
    with pytest.raises(ValueError, match="the credit value must be a number from 1e-18 to 1000000"):
        parse_credit_value(given)


def test_currencies_are_iso_4217_codes() -> None:
    assert [parse_currency(c) for c in ("USD", "eur", " JPY ", "CHF", "XAU")] == ["USD", "EUR", "JPY", "CHF", "XAU"]
    for bad in ("US", "DOLLARS", "$", "ABC", "", None, 840):
        with pytest.raises(ValueError, match="ISO 4217 code such as USD"):
            parse_currency(bad)


def test_the_router_settings_validate_the_credit_value_and_the_currency(capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_from_args([], env={})
    assert settings.money == CreditValue(Decimal("0.000001"), "USD")
    settings = settings_from_args(["--credit-value", "0.0025"], env={"LLAMAKIT_CURRENCY": "eur"})
    assert settings.money == CreditValue(Decimal("0.0025"), "EUR")
    for argv in (["--credit-value", "0"], ["--credit-value", "nan"], ["--currency", "bitcoin"]):
        with pytest.raises(SystemExit):
            settings_from_args(argv, env={})
    err = capsys.readouterr().err
    assert "--credit-value: the credit value must be a number" in err
    assert "--currency: the currency must be an ISO 4217 code" in err
    with pytest.raises(ValidationError):
        RouterSettings(credit_value="-1")


def test_llamakit_up_takes_a_credit_value_and_a_currency_and_refuses_bad_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(["up", "--credit-value", "1e-6", "--currency", "eur"])
    assert (args.credit_value, args.currency) == ("1e-6", "EUR")
    defaults = build_parser().parse_args(["up"])
    assert (defaults.credit_value, defaults.currency) == (None, None)  # the router's defaults, or its LLAMAKIT_*
    for bad in (["--credit-value", "-1"], ["--currency", "euro"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", *bad])
    err = capsys.readouterr().err
    assert "argument --credit-value: the credit value must be a number" in err
    assert "argument --currency: the currency must be an ISO 4217 code" in err


# --- through the router


async def test_usage_cost_is_the_exact_price_at_the_default_credit_value(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=8)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50})
    # 10 + 7 + 2 × 8 = 33 credits; a credit is a millionth of a US dollar by default.
    assert '"cost":0.000033,"cost_credits":33' in resp.text  # the shortest text of the double nearest 33e-6
    assert resp.headers["X-Llamakit-Cost"] == "0.000033"
    assert resp.headers["X-Llamakit-Cost-Credits"] == "33"
    assert resp.headers["X-Llamakit-Currency"] == "USD"
    assert (await alice.get("/v1/account")).json()["spent"] == 33  # the ledger moved integer credits


async def test_a_credit_value_and_currency_of_the_operators_choosing_everywhere_usage_is_reported(
    herd: Herd, tmp_path: Path
) -> None:
    await herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=5)))
    log = tmp_path / "usage.jsonl"
    await herd.start(credit_value="0.0025", currency="eur", usage_log=log)
    alice = await herd.account("alice", 10_000)

    whole = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50})
    assert whole.json()["usage"]["cost"] == 0.0675 and whole.json()["usage"]["cost_credits"] == 27  # 27 × 0.0025
    assert (whole.headers["X-Llamakit-Cost"], whole.headers["X-Llamakit-Currency"]) == ("0.0675", "EUR")

    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stream = await alice.post("/v1/chat/completions", json=body)
    usage = sse_data(stream.text)[-1]["usage"]
    assert stream.headers["X-Llamakit-Currency"] == "EUR" and "X-Llamakit-Cost" not in stream.headers
    assert (usage["cost"], usage["cost_credits"]) == (price_number(usage["cost_credits"] * Decimal("0.0025")), 27)

    embedded = (await alice.post("/v1/embeddings", json={"input": ["one two", "three"]})).json()["usage"]
    assert (embedded["cost"], embedded["cost_credits"]) == (0.0375, 15)  # 10 + 5 tokens

    response = (await alice.post("/v1/responses", json={"input": "one two", "max_output_tokens": 9})).json()
    assert (response["usage"]["cost"], response["usage"]["cost_credits"]) == (0.0625, 25)  # 10 + 5 + 2 × 5

    records = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(r["cost_credits"], r["cost"], r["currency"]) for r in records] == [
        (25, 0.0625, "EUR"), (15, 0.0375, "EUR"), (27, 0.0675, "EUR"), (27, 0.0675, "EUR")
    ]  # fmt: skip
    assert herd.admin is not None
    admin_records = (await herd.admin.get("/admin/usage")).json()["data"]
    assert [(r["cost_credits"], r["cost"], r["currency"]) for r in admin_records] == [
        (r["cost_credits"], r["cost"], r["currency"]) for r in records
    ]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted((line["cost_credits"], line["cost"], line["currency"]) for line in lines) == sorted(
        (r["cost_credits"], r["cost"], r["currency"]) for r in records
    )
    assert sum(line["cost_credits"] for line in lines) == (await herd.books())["charges"] == 94

    stats = (await herd.admin.get("/admin/stats")).json()
    assert (stats["currency"], stats["credit_value_exact"], stats["fees"]["earned"]) == ("EUR", "0.0025", 94)
    assert {r["cost"] for r in stats["requests"]["recent"]} == {0.0675, 0.0375, 0.0625}


async def test_info_and_models_tell_the_credit_value_and_the_fees_as_prices(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start(credit_value="0.0025", currency="EUR")
    alice = await herd.account("alice", 10)
    info = (await alice.get("/v1/info")).json()
    assert (info["currency"], info["credit_value"], info["credit_value_exact"]) == ("EUR", 0.0025, "0.0025")
    prices = {
        "currency": "EUR",
        "per_request": 0.025,  # 10 credits
        "per_million_prompt_tokens": 2500.0,  # 1 credit a token
        "per_million_completion_tokens": 5000.0,  # 2 credits a token
    }
    fees = {"base_fee": 10, "prompt_token_fee": 1, "completion_token_fee": 2}
    assert info["models"]["fake-model"]["fees"] == fees and info["models"]["fake-model"]["prices"] == prices
    [model] = (await alice.get("/v1/models")).json()["data"]
    assert model["fees"] == fees and model["prices"] == prices
    assert (await alice.get("/v1/models/fake-model")).json()["prices"] == prices


async def test_the_default_prices_read_as_dollars_per_million_tokens(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    info = (await (await herd.account("alice", 10)).get("/v1/info")).json()
    assert (info["currency"], info["credit_value"], info["credit_value_exact"]) == ("USD", 1e-06, "0.000001")
    assert info["models"]["fake-model"]["prices"] == {
        "currency": "USD", "per_request": 1e-05, "per_million_prompt_tokens": 1.0, "per_million_completion_tokens": 2.0
    }  # fmt: skip


async def test_a_replay_carries_the_usage_and_cost_of_the_first_answer(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    await herd.start(credit_value="0.0025", currency="EUR")
    alice = await herd.account("alice", 10_000)
    key = {"Idempotency-Key": "k1"}
    first = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50}, headers=key)
    again = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50}, headers=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["usage"] == first.json()["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "cost": 0.0675, "cost_credits": 27,
        "prompt_tokens_details": {"cached_tokens": 0},
        "cost_details": {"cache_discount": 0.0, "cache_discount_credits": 0},
    }  # fmt: skip
    for name in ("X-Llamakit-Cost", "X-Llamakit-Cost-Credits", "X-Llamakit-Currency"):
        assert again.headers[name] == first.headers[name]
    body = {"prompt": PROMPT, "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    key = {"Idempotency-Key": "k2"}
    streamed = await alice.post("/v1/completions", json=body, headers=key)
    replayed = await alice.post("/v1/completions", json=body, headers=key)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert sse_data(replayed.text)[-1]["usage"] == sse_data(streamed.text)[-1]["usage"]
    assert sse_data(replayed.text)[-1]["usage"]["cost"] == 0.0675
    assert (await alice.get("/v1/account")).json()["spent"] == 2 * 27


def test_an_answer_remembered_in_credits_by_an_older_router_is_replayed_with_its_price() -> None:
    saved = {
        "body": {"id": "req-1", "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "cost": 27}},
        "headers": {"X-Llamakit-Request-Id": "req-1", "X-Llamakit-Cost": "27"},
    }
    body, headers = recall_answer(Remembered("k", "f", json.dumps(saved)), CreditValue(), overhead_ms=0.25)
    assert body["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, "cost": 2.7e-05, "cost_credits": 27
    }  # fmt: skip
    assert (headers["X-Llamakit-Cost"], headers["X-Llamakit-Cost-Credits"]) == ("0.000027", "27")
    assert headers["X-Llamakit-Overhead-Ms"] == "0.250"  # the replay's own, which an older answer never had
    # An answer remembered with both is given back as it was, whatever the credit value is now.
    saved["body"]["usage"] |= {"cost": 0.0675, "cost_credits": 27}  # type: ignore[operator]
    saved["headers"] |= {"X-Llamakit-Cost": "0.0675", "X-Llamakit-Cost-Credits": "27"}
    body, headers = recall_answer(Remembered("k", "f", json.dumps(saved)), CreditValue(), overhead_ms=0.25)
    assert body["usage"]["cost"] == 0.0675 and headers["X-Llamakit-Cost"] == "0.0675"


async def test_openrouters_usage_accounting_option_is_taken_and_not_passed_to_the_node(herd: Herd) -> None:
    node = await herd.add_node(FakeNode("n1", script=Script(tokens=8)))
    await herd.start()
    alice = await herd.account("alice", 10_000)
    body = {"prompt": PROMPT, "max_tokens": 50, "usage": {"include": True}}  # as litellm's openrouter/ sends it
    resp = await alice.post("/v1/completions", json=body)
    assert resp.status_code == 200 and resp.json()["usage"]["cost"] == 3.3e-05
    assert "usage" not in node.received[0]
    resp = await alice.post("/v1/completions", json={**body, "usage": {"include": False}})
    assert resp.status_code == 400 and "usage is always reported here" in resp.json()["error"]["message"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_usage_record_keeps_its_price_when_the_router_restarts_with_another_credit_value(
    herd: Herd, tmp_path: Path, backend: str
) -> None:
    await herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    async with backend_url(backend, tmp_path) as db:
        router = await herd.start(db=db, credit_value="0.0025", currency="EUR")
        alice = await herd.account("alice", 10_000)
        assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50})).status_code == 200
        refused = await alice.post("/v1/completions", json={"prompt": PROMPT, "model": "nope"})
        assert refused.status_code == 404
        await herd.admin.aclose()  # type: ignore[union-attr]
        await router.stop()

        router = await herd.start(db=db, credit_value="0.01", currency="usd")
        alice = httpx.AsyncClient(base_url=router.url, headers=alice.headers)
        assert (await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 50})).status_code == 200
        assert herd.admin is not None
        # A record from before records kept their price: at the value the router runs with, and it says so.
        await execute(db, "UPDATE usage SET credit_value = NULL, currency = NULL WHERE id = 1")

        def prices(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
            return [
                (r["status"], r["cost_credits"], r["cost"], r["currency"], r["credit_value"], r["credit_value_exact"],
                 r["priced_at_current_value"])
                for r in records
            ]  # fmt: skip

        expected = [
            ("ok", 27, 0.27, "USD", 0.01, "0.01", False),
            ("model_not_found", 0, 0.0, "EUR", 0.0025, "0.0025", False),
            ("ok", 27, 0.27, "USD", 0.01, "0.01", True),
        ]
        assert prices((await alice.get("/v1/account/usage")).json()["data"]) == expected
        assert prices((await herd.admin.get("/admin/usage")).json()["data"]) == expected
        await execute(db, "UPDATE usage SET credit_value = '0.0025', currency = 'EUR' WHERE id = 1")
        records = (await alice.get("/v1/account/usage")).json()["data"]
        assert [(r["cost"], r["currency"], r["priced_at_current_value"]) for r in records][-1] == (0.0675, "EUR", False)
        # Sold at 0.0675 EUR, whatever a credit is worth today; the books stay in credits.
        books = await herd.books()
        assert books["charges"] == 54 and books["balanced"] and books["holds"] == 0
        await alice.aclose()
        await herd.admin.aclose()
        await router.stop()
        herd.admin = None  # the herd fixture's checks need the database this block drops
