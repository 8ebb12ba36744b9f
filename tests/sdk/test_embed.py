"""`embed` / `aembed` against a real router in front of scripted nodes: typed vectors, usage, cost, records."""

from __future__ import annotations

from decimal import Decimal

import pytest

import llamakit.sdk as sdk
from tests.sdk.conftest import MODEL, ThreadedHerd
from tests.support.fake_node import FakeNode, Script


def embed_fees(tokens: int, bid: float = 1.0) -> int:
    return round(bid * (10 + tokens))


def test_embed_returns_vectors_with_their_metering(herd: ThreadedHerd) -> None:
    node = herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client()
    result = client.embed(["one two", "three"])
    assert len(result) == 2 and result.dimensions == 4
    assert result[0] == [0.0, 0.5, -0.25, 1.0] and result.vectors[1] == [1.0, 0.5, -0.25, 1.0]
    assert result.usage is not None and (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 0)
    assert result.cost_credits == result.usage.cost_credits == embed_fees(5) == herd.spent(client)
    assert (result.cost, result.currency) == (Decimal(embed_fees(5)) / 10**6, "USD")
    assert result.model == MODEL and result.node == "n1" and result.request_id is not None
    # Vectors travel as base64 and are decoded to floats; the router names the model it chose.
    assert node.received[0] == {"input": ["one two", "three"], "encoding_format": "base64", "model": MODEL}
    [record] = client.usage_records
    assert (record.kind, record.status, record.prompt_tokens, record.cost_credits) == ("embed", "ok", 5, embed_fees(5))
    frame = client.usage_frame()
    assert list(frame["kind"]) == ["embed"]


def test_embed_takes_token_ids_a_model_a_bid_and_dimensions(herd: ThreadedHerd) -> None:
    node = herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client()
    result = client.embed([[1, 2, 3]], model=MODEL, bid=2, dimensions=4)
    assert result.cost_credits == embed_fees(3, 2) and result.bid == 2
    assert node.received[0] == {
        "input": [[1, 2, 3]],
        "encoding_format": "base64",
        "model": MODEL,
        "dimensions": 4,
    }  # the bid is the router's business, not the node's
    client.embed("single text", user="analyst-7")
    assert node.received[1]["input"] == "single text" and node.received[1]["user"] == "analyst-7"
    assert client.usage_records[-1].user == "analyst-7"


def test_a_refused_embedding_raises_and_is_recorded(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1"))
    herd.start()
    client = herd.client()
    with pytest.raises(sdk.BadRequestError, match="vocabulary"):
        client.embed([[5, 99999]])
    with pytest.raises(sdk.BadRequestError, match="not supported"):
        client.embed("x", extra_body={"frobnicate": True})
    assert [(r.kind, r.status, r.status_code) for r in client.usage_records] == [
        ("embed", "error", 400),
        ("embed", "error", 400),
    ]
    assert herd.spent(client) == 0


def test_a_failing_node_is_retried_then_raises(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(fail_status=500)))
    herd.start(max_attempts=1)
    client = herd.client(max_retries=1)
    with pytest.raises(sdk.InternalServerError):
        client.embed("one", timeout=10)
    assert client.usage_records[0].attempts == 2


async def test_async_and_module_level_embed(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", slots=2))
    herd.start()
    sdk.configure(url=herd.url, api_key=herd.account("module-embed", 10_000), usage_log=None)
    async with sdk.meter() as m:
        first = await sdk.aembed("one two")
        second = sdk.embed(["three"])
    assert first.usage is not None and first.usage.prompt_tokens == 3
    assert second.vectors == [[0.0, 0.5, -0.25, 1.0]]
    assert m.calls == 2 and m.cost_credits == sdk.account().spent == embed_fees(3) + embed_fees(2)
    assert [r.kind for r in sdk.usage_records()] == ["embed", "embed"]
