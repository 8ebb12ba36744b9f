"""The running counts on a node's token chunk (`wire.node`): written by `with_counts` as the last field, found by
`split_counts` at the end of the bytes without parsing them, with the prompt tokens the node's cache held
(`cached_tokens`), and as 0 cached from a node older than that field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llamakit import jsontext
from llamakit.wire.node import TokenCounts, split_counts, with_counts


def chunk() -> dict[str, Any]:
    return {"id": "req-1", "object": "text_completion", "choices": [{"index": 0, "text": " a"}], "usage": None}


def test_a_chunk_carries_its_cached_prompt_tokens_and_is_found_without_them() -> None:
    payload = jsontext.dumps(with_counts(chunk(), TokenCounts(40, 3, 32)))  # as a node's SseWriter writes it
    assert payload.endswith(b',"usage":null,"llamakit":{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":32}}')
    found = split_counts(payload)
    assert found is not None
    passed_on, counts = found
    assert counts == TokenCounts(prompt_tokens=40, completion_tokens=3, cached_tokens=32)
    assert json.loads(passed_on) == chunk()  # what the client gets: the chunk without the counts


def test_a_chunk_from_a_node_older_than_cached_tokens_has_none_cached() -> None:
    older = b'{"id":"req-1","choices":[],"usage":null,"llamakit":{"prompt_tokens":40,"completion_tokens":3}}'
    assert split_counts(older) == (b'{"id":"req-1","choices":[],"usage":null}', TokenCounts(40, 3, 0))
    assert TokenCounts(40, 3) == TokenCounts(40, 3, 0)


@pytest.mark.parametrize(
    "counts",
    [
        b'{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":}',
        b'{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":-1}',
        b'{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":"32"}',
        b'{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":3.5}',
        b'{"prompt_tokens":40,"cached_tokens":32,"completion_tokens":3}',  # not in with_counts' order
        b'{"prompt_tokens":40,"completion_tokens":3,"cached_tokens":32,"more":1}',
    ],
)
def test_counts_written_otherwise_are_not_a_token_chunk(counts: bytes) -> None:
    """The router then parses the event (relay._forward), as any event that is not a plain token chunk."""
    assert split_counts(b'{"id":"req-1","choices":[],"usage":null,"llamakit":' + counts + b"}") is None
