"""`submit_batch` (sync and async) against a real router in front of a scripted node: the requests go as one batch,
`wait()` follows it to its end, `results()` gives one row per request in order, with its tokens and cost."""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal

import pandas as pd
import pytest

import llamakit.sdk as sdk
from tests.sdk.conftest import ThreadedHerd
from tests.support.fake_node import FakeNode, Script


def line_price(prompt: int, completion: int) -> int:
    """A batch line's price on the test router: half its fees, rounded up once."""
    return math.ceil(Decimal("0.5") * (10 + prompt + 2 * completion))


def test_submit_batch_waits_and_gives_its_results_as_a_frame(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", slots=2, script=Script(tokens=3), openai_shapes=True))
    herd.start()
    client = herd.client(model="fake-model")
    prompts = ["one", [{"role": "user", "content": "one two"}], {"messages": [{"role": "user", "content": "x y z"}],
                                                                   "max_tokens": 1}]  # fmt: skip
    batch = client.submit_batch(prompts, max_tokens=2, metadata={"run": "sdk"})
    assert batch.info.request_counts.total == 3 and batch.info.discount == "0.5"
    info = batch.wait(poll=0.02, progress=False)
    assert (info.status, info.request_counts.completed, info.done) == ("completed", 3, 3)
    frame = batch.results()
    assert list(frame["custom_id"]) == ["0", "1", "2"] and list(frame["status"]) == ["ok"] * 3
    assert list(frame["text"]) == [" tok tok", " tok tok", " tok"]
    assert list(frame["prompt_tokens"]) == [4, 5, 6] and list(frame["completion_tokens"]) == [2, 2, 1]
    costs = [line_price(4, 2), line_price(5, 2), line_price(6, 1)]
    assert list(frame["cost_credits"]) == costs and info.usage.cost_credits == sum(costs) == herd.spent(client)
    assert frame["cost"].sum() == Decimal(sum(costs)) / 10**6
    assert client.batch(batch.id).info.status == "completed"


def test_a_failed_request_has_its_error_in_its_row(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2), openai_shapes=True))
    herd.start(max_tokens_limit=8)
    client = herd.client(model="fake-model")
    batch = client.submit_batch(["fine", {"messages": [{"role": "user", "content": "big"}], "max_tokens": 99}],
                                max_tokens=2)  # fmt: skip
    batch.wait(poll=0.02, progress=False)
    frame = batch.results()
    assert list(frame["status"]) == ["ok", "invalid_value"] and pd.isna(frame["text"][1])
    assert frame["status_code"][1] == 400 and "max_tokens" in frame["error"][1]
    with pytest.raises(ValueError, match="at least one"):
        client.submit_batch([])


def test_embeddings_and_completions_batches(herd: ThreadedHerd) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=2), openai_shapes=True))
    herd.start()
    client = herd.client(model="fake-model")
    vectors = client.submit_batch(["a cat", "a dog"], endpoint="/v1/embeddings")
    vectors.wait(poll=0.02, progress=False)
    frame = vectors.results()
    assert [len(v) for v in frame["embedding"]] == [4, 4] and list(frame["cost_credits"]) == [math.ceil(0.5 * 13)] * 2
    texts = client.submit_batch(["once upon"], endpoint="/v1/completions", max_tokens=2)
    texts.wait(poll=0.02, progress=False)
    assert list(texts.results()["text"]) == [" tok tok"]


def test_the_async_client_and_the_module_functions(herd: ThreadedHerd, monkeypatch: pytest.MonkeyPatch) -> None:
    herd.add_node(FakeNode("n1", script=Script(tokens=1), openai_shapes=True))
    herd.start()
    key = herd.account("bob", 10_000)
    monkeypatch.setenv("LLAMAKIT_URL", herd.url)
    monkeypatch.setenv("LLAMAKIT_API_KEY", key)

    async def run() -> pd.DataFrame:
        batch = await sdk.asubmit_batch(["hi", "there"], model="fake-model")
        await batch.wait(poll=0.02, progress=False)
        return await batch.results()

    frame = asyncio.run(run())
    assert list(frame["status"]) == ["ok", "ok"]
    batch = sdk.submit_batch(["again"], model="fake-model")
    assert batch.wait(poll=0.02, progress=False).status == "completed"
    assert repr(batch).endswith("completed 1/1>")
