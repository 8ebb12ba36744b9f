"""The SDK against a real router (real ledger, real sockets) in front of scripted fake nodes."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal

import pytest

import llamakit.sdk as sdk
from llamakit.sdk import _retry
from tests.sdk.conftest import MODEL, ThreadedHerd, fees
from tests.support.fake_node import FakeNode, Script

PROMPT = "one two three four"  # the fake node counts 4 words + 3 = 7 prompt tokens


def test_generate_returns_the_text_with_its_metering(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=5)))
    herd.start()
    client = herd.client()
    result = client.generate(PROMPT, max_tokens=50)
    assert str(result) == result.text == " tok" * 5
    assert result.model == MODEL and result.node == "n1" and result.finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (7, 5, 12)
    assert result.cost_credits == result.usage.cost_credits == fees(7, 5)
    # The price in the router's currency: a credit is a millionth of a US dollar by default.
    assert result.cost == result.usage.cost == Decimal("0.000027") and result.currency == "USD"
    assert "27 credits (0.000027 USD)" in result.summary()
    assert result.bid == 1.0 and result.attempts == 1
    assert result.latency is not None and result.latency > 0 and result.ttft is None
    assert result.request_id is not None and result.request_id.startswith("req-")
    assert herd.nodes["n1"].received[0]["max_tokens"] == 50
    assert "7 prompt + 5 completion = 12 tokens" in result.summary()
    assert herd.spent(client) == fees(7, 5)


def test_chat_takes_a_string_or_messages_and_a_system_prompt(herd: ThreadedHerd) -> None:
    node = herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    herd.start()
    client = herd.client()
    assert client.chat("hello there", max_tokens=4).text == " tok tok"
    client.chat([{"role": "user", "content": "hi"}], system="be brief", temperature=0.0, seed=7, stop=["\n"])
    assert node.received[0]["messages"] == [{"role": "user", "content": "hello there"}]
    second = node.received[1]
    assert second["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (second["temperature"], second["seed"], second["stop"]) == (0.0, 7, ["\n"])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        client.chat([{"text": "no role"}])


def test_stream_yields_pieces_then_a_result_with_cost(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=4)))
    herd.start()
    client = herd.client()
    stream = client.stream(PROMPT, max_tokens=10)
    with pytest.raises(RuntimeError, match="no result"):
        _ = stream.result
    pieces = list(stream)
    assert pieces == [" tok"] * 4
    result = stream.result
    assert result.text == "".join(pieces) and result.node == "n1"
    assert result.usage is not None and result.usage.completion_tokens == 4
    assert result.cost_credits == fees(7, 4) == herd.spent(client)
    assert (result.cost, result.currency) == (Decimal(fees(7, 4)) / 10**6, "USD")  # from the usage chunk
    assert result.ttft is not None and result.latency is not None and 0 < result.ttft <= result.latency
    with client.stream_chat("hi there", max_tokens=2) as chat_stream:
        assert "".join(chat_stream) == " tok tok"
    record = client.usage_records[-1]
    assert (record.kind, record.stream, record.status, record.cost_credits) == (
        "chat",
        True,
        "ok",
        chat_stream.result.cost_credits,
    )


def test_a_stream_closed_early_is_recorded_as_cut_and_charged_only_what_was_delivered(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=50, token_delay=0.02)))
    herd.start()
    client = herd.client()
    with client.stream(PROMPT, max_tokens=50) as stream:
        for _ in zip(range(2), stream, strict=False):
            pass
    assert stream.result.text.startswith(" tok tok") and stream.result.usage is None
    [record] = client.usage_records
    assert record.status == "cut" and record.cost_credits is None and record.cost is None
    assert record.request_id == stream.result.request_id
    herd.wait_settled()
    [ledger] = herd.router_usage(client)
    assert ledger["status"] == "cut" and 2 <= ledger["completion_tokens"] < 50


def test_usage_totals_equal_the_routers_ledger(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    herd.start()
    client = herd.client(deposit=5_000)
    client.generate(PROMPT, max_tokens=5)
    client.chat("a b c", max_tokens=5, bid=1.5)
    list(client.stream(PROMPT, max_tokens=5))
    with pytest.raises(sdk.InsufficientFunds):
        client.generate(PROMPT, max_tokens=4000)
    frame = client.usage_frame()
    ledger = herd.router_usage(client)
    assert len(frame) == 4 and list(frame["status"]) == ["ok", "ok", "ok", "error"]
    assert int(frame["cost_credits"].sum()) == herd.spent(client) == sum(r["cost_credits"] for r in ledger)
    # The prices add up exactly to the credits' price (floats would make 0.000079 7.900000000000001e-05).
    prices = [r.cost for r in client.usage_records if r.cost is not None]
    assert len(prices) == 3 and sum(prices) == Decimal(herd.spent(client)) / 10**6
    assert list(frame["currency"].dropna()) == ["USD", "USD", "USD"]
    # The 402 is in the router's records too, as a refusal; its request id is in the SDK's record of the error.
    assert list(frame["request_id"].dropna()) == [r["request_id"] for r in ledger]
    assert ledger[-1]["status"] == "insufficient_funds" and ledger[-1]["http_status"] == 402
    served = ledger[:-1]
    assert list(frame["prompt_tokens"].dropna()) == [r["prompt_tokens"] for r in served]
    assert list(frame["completion_tokens"].dropna()) == [r["completion_tokens"] for r in served]


def test_402_carries_the_amounts_and_is_not_retried(herd: ThreadedHerd) -> None:
    node = herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client(deposit=100, max_retries=5)
    with pytest.raises(sdk.InsufficientFunds) as caught:
        client.generate(PROMPT, max_tokens=500)
    error = caught.value
    held = 10 + (len(PROMPT) + 4) + 2 * 500  # a raw prompt: its bytes, a BOS and spare
    assert (error.status_code, error.needed, error.balance, error.code) == (402, held, 100, "insufficient_funds")
    assert str(held) in str(error)
    assert node.received == []
    [record] = client.usage_records
    assert (record.status, record.status_code, record.error_type, record.attempts) == (
        "error",
        402,
        "InsufficientFunds",
        1,
    )
    assert client.account().balance == 100


def test_unknown_model_and_bad_key_raise_their_classes(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client()
    with pytest.raises(sdk.NotFoundError, match=MODEL):
        client.generate(PROMPT, model="gpt-9")
    with (
        sdk.Client(url=herd.url, api_key="lk-wrong", usage_log=None) as stranger,
        pytest.raises(sdk.AuthenticationError),
    ):
        stranger.generate(PROMPT)
    with pytest.raises(sdk.BadRequestError) as caught:
        client.generate(PROMPT, bid=0.5)
    assert caught.value.param == "bid"


def test_models_info_and_account(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", slots=2))
    herd.start()
    client = herd.client(deposit=1234)
    [model] = client.models()
    assert model.id == MODEL and model.nodes == 1 and model.slots == 2
    assert model.fees is not None and model.fees.completion_token_fee == 2
    info = client.info()
    assert info.models[MODEL].queue_length == 0 and info.models[MODEL].fees.base_fee == 10
    assert info.last_multiplier == 1.0 and info.nodes.ready == 1
    # What a credit is worth, and the fees as prices: $10 per million completion tokens at 2 credits a token.
    assert (info.currency, info.credit_value) == ("USD", Decimal("0.000001"))
    prices = sdk.Prices(
        currency="USD", per_request=Decimal("0.00001"), per_million_prompt_tokens=Decimal(1),
        per_million_completion_tokens=Decimal(2),
    )  # fmt: skip
    assert info.models[MODEL].prices == model.prices == prices
    account = client.account()
    assert (account.balance, account.held, account.spent, account.deposited) == (1234, 0, 0, 1234)
    assert "balance 1234" in account._repr_html_()


def test_bid_auto_outbids_a_waiting_queue_up_to_max_bid(herd: ThreadedHerd) -> None:
    gate = asyncio.Event()
    node = herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    herd.start()
    client = herd.client()
    results: dict[str, sdk.Generation] = {}

    def send(tag: str, **kwargs: object) -> threading.Thread:
        def run() -> None:
            results[tag] = client.generate(tag, max_tokens=1, **kwargs)  # type: ignore[arg-type]

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def wait_queue(length: int) -> None:
        for _ in range(300):
            if client.info().queue_length == length:
                return
            time.sleep(0.01)
        raise AssertionError(f"queue never reached {length}")

    threads = [send("busy", bid=2)]
    while not node.received:
        time.sleep(0.01)
    threads.append(send("waiting", bid=1))
    wait_queue(1)
    assert client.info().last_multiplier == 2.0
    threads.append(send("auto", bid="auto", max_bid=3))
    wait_queue(2)
    threads.append(send("capped", bid="auto", max_bid=1.5))
    wait_queue(3)
    herd.loop.call(gate.set)
    for thread in threads:
        thread.join(10)
    assert results["auto"].bid == pytest.approx(2.01)  # the last multiplier, 2, bumped 0.5 %
    assert results["capped"].bid == 1.5
    assert [r["prompt"] for r in node.received] == ["busy", "auto", "capped", "waiting"]
    # With nobody waiting, "auto" pays what the last request paid (the low bid dispatched last).
    assert client.generate("alone", max_tokens=1, bid="auto").bid == 1.0


def test_queue_full_is_retried_after_the_routers_retry_after(
    herd: ThreadedHerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    herd.add_node(FakeNode("n1", slots=1, script=Script(tokens=1, gate=gate)))
    herd.start(max_queue=0)
    client = herd.client()
    waits: list[float] = []

    def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        herd.loop.call(gate.set)  # the busy request finishes while we "wait"
        busy.join(10)

    monkeypatch.setattr(_retry, "sleep", fake_sleep)
    busy = threading.Thread(target=client.generate, args=("busy",), kwargs={"max_tokens": 1})
    busy.start()
    while not herd.nodes["n1"].received:
        time.sleep(0.01)
    result = client.generate(PROMPT, max_tokens=1)
    busy.join(10)
    assert waits == [2.0]  # the router's Retry-After for queue_full
    assert result.attempts == 2
    records = [r for r in client.usage_records if r.attempts == 2]
    assert len(records) == 1 and records[0].status == "ok"
    statuses = sorted(r["status"] for r in herd.router_usage(client))
    assert statuses == ["ok", "ok", "queue_full"]


def test_the_sync_api_works_inside_a_running_event_loop(herd: ThreadedHerd, monkeypatch: pytest.MonkeyPatch) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    herd.start()
    client = herd.client()
    monkeypatch.setenv("LLAMAKIT_URL", herd.url)
    monkeypatch.setenv("LLAMAKIT_API_KEY", herd.account("module", 10_000))
    sdk.configure(usage_log=None)

    async def in_a_notebook_cell() -> tuple[str, str, str]:
        assert asyncio.get_running_loop().is_running()
        direct = client.generate(PROMPT, max_tokens=2).text
        module_level = sdk.generate(PROMPT, max_tokens=2).text
        streamed = "".join(sdk.stream_chat("hi", max_tokens=2))
        return direct, module_level, streamed

    assert asyncio.run(in_a_notebook_cell()) == (" tok tok",) * 3
    frame = sdk.usage_frame()
    assert len(frame) == 2 and list(frame["kind"]) == ["generate", "chat"]


async def test_sync_generate_called_from_an_async_test(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=1)))
    herd.start()
    assert herd.client().generate(PROMPT, max_tokens=1).text == " tok"


async def test_async_client_generate_chat_and_stream(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", slots=4, script=Script(tokens=3)))
    herd.start()
    key = herd.account("async", 100_000)
    async with sdk.AsyncClient(url=herd.url, api_key=key, usage_log=None) as client:
        results = await asyncio.gather(
            client.generate(PROMPT, max_tokens=3), client.chat("x y", max_tokens=3), client.generate("z", bid=1.2)
        )
        assert [r.text for r in results] == [" tok tok tok"] * 3
        assert results[2].bid == 1.2
        stream = client.stream_chat("hello", max_tokens=3)
        assert [p async for p in stream] == [" tok"] * 3
        assert stream.result.cost_credits == fees(4, 3)
        assert (await client.account()).spent == sum(r.cost_credits or 0 for r in [*results, stream.result])
        assert len(client.usage_records) == 4
        assert [m.id for m in await client.models()] == [MODEL]


async def test_module_level_async_functions(herd: ThreadedHerd, monkeypatch: pytest.MonkeyPatch) -> None:
    herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=2)))
    herd.start()
    sdk.configure(url=herd.url, api_key=herd.account("module-async", 10_000), usage_log=None)
    before = len(sdk.usage_records())
    async with sdk.meter() as m:
        first, second = await asyncio.gather(sdk.agenerate(PROMPT, max_tokens=2), sdk.achat("hi", max_tokens=2))
        pieces = [p async for p in sdk.astream(PROMPT, max_tokens=2)]
        pieces += [p async for p in sdk.astream_chat("hi", max_tokens=2)]
    assert first.text == second.text == " tok tok" and pieces == [" tok"] * 4
    assert m.calls == 4 and m.cost_credits == sdk.account().spent
    assert len(sdk.usage_records()) == before + 4
    # The module's key() and router_usage(), as the README lists them beside account().
    assert sdk.key().spend.total == m.cost_credits
    assert [r.cost_credits for r in sdk.router_usage(10)] == [r.cost_credits for r in sdk.usage_records()[-4:][::-1]]


def test_idempotency_key_is_sent_and_can_be_given(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client()
    client.generate(PROMPT, max_tokens=1)
    client.generate(PROMPT, max_tokens=1, idempotency_key="order-42")
    keys = [r.idempotency_key for r in client.usage_records]
    assert keys[1] == "order-42" and keys[0] is not None and uuid.UUID(keys[0]).version == 4


def test_the_user_a_call_names_is_in_the_frame_and_on_the_routers_record(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    herd.start()
    client = herd.client(deposit=5_000)
    client.generate(PROMPT, max_tokens=2, user="customer-42")
    client.chat("a b c", max_tokens=2)
    frame = client.usage_frame()
    assert list(frame["user"].fillna("")) == ["customer-42", ""]
    ledger = herd.router_usage(client)
    assert [r["user"] for r in ledger] == ["customer-42", None]


def test_a_keys_limits_reach_the_sdk_as_typed_errors_and_its_use_as_a_model(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    herd.start()
    herd.account("capped", 100_000)
    made = herd.admin("POST", "/admin/accounts/capped/keys", json={"limits": {"spend_cap": 300, "rpm_limit": 2}})
    client = sdk.Client(url=herd.url, api_key=made["api_key"], usage_log=None, max_retries=0)
    client.generate(PROMPT, max_tokens=2)
    key = client.key()
    assert key.prefix == made["api_key"][:8] and key.limits.spend_cap == 300 and key.limits.rpm_limit == 2
    assert key.spend.total == fees(7, 2) and key.remaining["total"] == 300 - fees(7, 2)
    assert key.rates is not None and key.rates.requests_last_minute == 1
    assert client.account().key == key.model_copy(update={"rates": client.account().key.rates})  # type: ignore[union-attr]
    with pytest.raises(sdk.SpendCapExceeded) as capped:
        client.generate(PROMPT, max_tokens=400)
    assert (capped.value.cap, capped.value.period) == (300, "total") and capped.value.needed is not None
    client.generate(PROMPT, max_tokens=1)  # the refusal for money did not count: this is the minute's second
    with pytest.raises(sdk.RateLimitError) as limited:
        client.generate(PROMPT, max_tokens=1)
    assert limited.value.limit == "rpm_limit" and limited.value.retry_after is not None
    assert 1 <= limited.value.retry_after <= 60


def test_a_key_knows_its_name_and_learns_a_new_one(herd: ThreadedHerd) -> None:
    herd.start()
    herd.account("named", 1_000)
    made = herd.admin("POST", "/admin/accounts/named/keys", json={"name": "ci runner"})
    client = sdk.Client(url=herd.url, api_key=made["api_key"], usage_log=None, max_retries=0)
    assert client.key().name == "ci runner"
    account = client.account()
    assert account.key is not None and account.key.name == "ci runner" and account.name == "named"
    herd.admin("PATCH", f"/admin/keys/{made['api_key'][:8]}", json={"name": "nightly"})
    assert client.key().name == "nightly"
    herd.admin("PATCH", f"/admin/keys/{made['api_key'][:8]}", json={"name": None})
    assert client.key().name is None
    # A router from before key names sends none: the model still reads it.
    assert sdk.ApiKeyInfo.model_validate({"prefix": "lk-AbCdE"}).name is None


async def test_async_client_key_has_its_name(herd: ThreadedHerd) -> None:
    herd.start()
    herd.account("named-async", 1_000)
    made = herd.admin("POST", "/admin/accounts/named-async/keys", json={"name": "laptop"})
    async with sdk.AsyncClient(url=herd.url, api_key=made["api_key"], usage_log=None, max_retries=0) as client:
        assert (await client.key()).name == "laptop"


def test_router_usage_is_the_ledgers_record_of_each_call_refusals_included(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2)))
    herd.start()
    client = herd.client(deposit=500)
    done = client.generate(PROMPT, max_tokens=2, user="u1")
    with pytest.raises(sdk.InsufficientFunds):
        client.generate(PROMPT, max_tokens=5_000)
    records = client.router_usage()
    assert [r.status for r in records] == ["insufficient_funds", "ok"]  # newest first
    refused, served = records
    assert refused.http_status == 402 and refused.cost_credits == 0 and refused.dispatched is None
    assert served.request_id == done.request_id and served.cost_credits == done.cost_credits and served.user == "u1"
    assert served.cost == done.cost and served.currency == done.currency
    assert served.credit_value == Decimal("0.000001") and served.priced_at_current_value is False
    assert served.arrived is not None and served.dispatched is not None and served.arrived <= served.dispatched
    assert [r.request_id for r in client.router_usage(limit=1)] == [refused.request_id]
    assert [r.request_id for r in client.router_usage(user="u1")] == [done.request_id]


def test_a_router_usage_record_carries_the_exact_credit_value_it_was_priced_at() -> None:
    record = {"id": 1, "request_id": "r", "model": "m", "status": "ok", "created": 1.0, "cost_credits": 27}
    priced = sdk.RouterUsage.model_validate(
        record | {"cost": 0.0675, "currency": "EUR", "credit_value": 0.0025, "credit_value_exact": "0.0025",
                  "priced_at_current_value": False}
    )  # fmt: skip
    assert (priced.cost, priced.credit_value, priced.priced_at_current_value) == (
        Decimal("0.0675"), Decimal("0.0025"), False
    )  # fmt: skip
    older = sdk.RouterUsage.model_validate(record | {"cost": 2.7e-05, "currency": "USD"})  # a router that keeps none
    assert (older.credit_value, older.priced_at_current_value) == (None, None)
