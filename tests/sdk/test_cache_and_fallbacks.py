"""The SDK against a real router and scripted nodes: cached prompt tokens at their own fee reach the result, the
meter, the frame and the router's records; `models=` falls back, and says which model served and which were
passed over."""

from __future__ import annotations

from decimal import Decimal

import pandas as pd  # type: ignore[import-untyped]

import llamakit.sdk as sdk
from tests.sdk.conftest import MODEL, ThreadedHerd
from tests.support.fake_node import FakeNode, Script

FEES = {"base_fee": 10, "prompt_token_fee": 4, "completion_token_fee": 2, "cached_prompt_token_fee": 1}
PROMPT = "one two three four five six seven eight"  # 11 prompt tokens at the fake node
FIRST, AGAIN = 10 + 4 * 11 + 2 * 5, 10 + 4 * 3 + 1 * 8 + 2 * 5  # nothing cached; 8 cached


def test_cached_tokens_and_what_they_saved_reach_the_result_meter_frame_and_records(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=5, cache=True)))
    herd.start()
    herd.admin("PUT", f"/admin/fees/{MODEL}", json=FEES)
    client = herd.client()
    [model] = client.models()
    assert model.fees is not None and model.fees.cached_prompt_token_fee == 1 and model.fees.cached_fee == 1
    assert model.prices is not None and model.prices.per_million_cached_prompt_tokens == Decimal(1)
    assert model.fees.cost(11, 5, cached_tokens=8) == AGAIN
    with sdk.meter() as m:
        first = client.generate(PROMPT, max_tokens=5)
        again = client.generate(PROMPT, max_tokens=5)
        streamed = client.stream(PROMPT, max_tokens=5)
        list(streamed)
    assert first.cost_credits == FIRST and again.cost_credits == AGAIN == streamed.result.cost_credits
    assert again.usage is not None and again.usage.cached_tokens == 8
    assert (again.usage.cache_discount_credits, again.usage.cache_discount) == (FIRST - AGAIN, Decimal("0.000024"))
    assert f"{FIRST - AGAIN} saved by the cache" in again.summary()
    assert (m.cached_tokens, m.cache_discount_credits, m.cache_discount) == (16, 48, Decimal("0.000048"))
    assert "48 credits saved by the cache" in m.summary()
    frame = m.frame()
    assert frame["cache_discount_credits"].tolist() == [0, 24, 24]
    assert str(frame["cache_discount"].dtype) == "float64" and frame["cache_discount"].iloc[1] == 0.000024
    assert pd.isna(frame["passed_over"]).all()  # no call named `models`
    records = client.router_usage()
    assert [(r.cached_tokens, r.cache_discount_credits, r.cost_credits) for r in records] == [
        (8, 24, AGAIN), (8, 24, AGAIN), (0, 0, FIRST),
    ]  # fmt: skip
    assert records[0].cache_discount == Decimal("0.000024")


def test_models_falls_back_and_says_which_model_served(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=3)))
    herd.start()
    herd.admin("PUT", "/admin/fees/ghost", params={"unserved": "true"}, json=FEES)  # fees, and no node
    client = herd.client(model="ghost")
    with sdk.meter() as m:
        result = client.generate("hello there", max_tokens=3, models=[MODEL])
        chat = client.chat("hello there", max_tokens=3, models=[MODEL])
        stream = client.stream("hello there", max_tokens=3, models=[MODEL])
        assert "".join(stream) == " tok" * 3
        plain = client.generate("hello there", max_tokens=3, model=MODEL)
    for served in (result, chat, stream.result):
        assert served.model == MODEL
        assert served.passed_over is not None and [(p.model, p.reason) for p in served.passed_over] == [
            ("ghost", "no_node")
        ]
    assert plain.passed_over is None
    assert f"{MODEL} on n1 (after ghost: no_node)" in result.summary()
    assert m.frame()["passed_over"].tolist()[:3] == ["ghost=no_node"] * 3
    assert m.frame()["model"].tolist() == [MODEL] * 4
    [record] = [r for r in client.router_usage() if r.request_id == result.request_id]
    assert record.model == MODEL and [p.reason for p in record.passed_over] == ["no_node"]
