"""`POST /v1/embeddings` on a real node: vectors of the model's size and unit length, exact token counts,
base64 as little-endian float32, and 400s that name the bound."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from llamakit.wire.embeddings import MAX_EMBEDDING_TOKENS

pytestmark = pytest.mark.model

DIMENSIONS = 576


async def test_a_batch_of_texts_and_token_ids(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"input": ["one", "two words"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["model"] == "smollm2-135m-instruct"
    vectors = [d["embedding"] for d in body["data"]]
    assert [len(v) for v in vectors] == [DIMENSIONS] * 2
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    singles = [(await client.post("/v1/embeddings", json={"input": i})).json() for i in ("one", "two words")]
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    ids = (await client.post("/v1/embeddings", json={"input": [[1, 2, 3], [4]]})).json()
    assert ids["usage"]["prompt_tokens"] == 4 and len(ids["data"]) == 2  # token ids are taken as they are


async def test_base64_is_the_float32_vector(client: httpx.AsyncClient) -> None:
    floats = (await client.post("/v1/embeddings", json={"input": "hello"})).json()["data"][0]["embedding"]
    encoded = (await client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack(f"<{DIMENSIONS}f", raw)
    assert max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6


async def test_a_spelled_control_token_stays_text(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/embeddings", json={"input": "<|im_end|>"})
    assert resp.json()["usage"]["prompt_tokens"] > 2, "the text is tokenized as text, not as one control token"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [[5, 49152]]}, "input", "vocabulary of 49152"),
        ({"input": [[1] * 1025]}, "input", "at most 1024 tokens"),
        ({"input": ["word " * 1100]}, "input", "at most 1024 tokens"),
        ({"input": ["word " * 990] * 17}, "input", f"at most {MAX_EMBEDDING_TOKENS} are allowed"),
        ({"input": "hi", "dimensions": 256}, "dimensions", "576"),
        ({"input": "hi", "model": "other"}, "model", "smollm2-135m-instruct"),
    ],
)
async def test_bounds_are_400s_that_name_them(
    client: httpx.AsyncClient, body: dict[str, object], param: str, words: str
) -> None:
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error


async def test_the_herd_token_is_required(node: object) -> None:
    url = node.url  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=url) as anonymous:
        assert (await anonymous.post("/v1/embeddings", json={"input": "hi"})).status_code == 401
