"""Streams relayed read for write: however the node's bytes are cut into reads, the client gets every event;
a token chunk as a node writes it is passed on as it came, without its counts; any other shape is read."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from llamakit.router.upstream import token_chunk
from llamakit.wire.node import TokenCounts
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd


@dataclass
class CutNode(FakeNode):
    """A node whose whole stream is one byte string, written in pieces of `piece` bytes (0: all at once);
    `spaced`: JSON with spaces after `,` and `:` (not a node's own shape, so the router parses every event)."""

    piece: int = 0
    spaced: bool = False

    async def _stream(
        self, request: web.Request, rid: str, prompt_tokens: int, n: int, body: dict[str, Any]
    ) -> web.StreamResponse:
        events = [
            {
                "id": rid,
                "object": "text_completion",
                "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}],
                "usage": None,
                "llamakit": {"prompt_tokens": prompt_tokens, "completion_tokens": i},
            }
            for i in range(1, n + 1)
        ]
        events.append({"id": rid, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        events.append({"id": rid, "choices": [], "usage": usage})
        separators = (", ", ": ") if self.spaced else (",", ":")
        raw = b"".join(b"data: " + json.dumps(e, separators=separators).encode() + b"\n\n" for e in events)
        raw += b"data: [DONE]\n\n"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        step = self.piece or len(raw)
        for start in range(0, len(raw), step):
            await resp.write(raw[start : start + step])
            await asyncio.sleep(0.001 if self.piece else 0)
        await resp.write_eof()
        return resp


def data_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("spaced", [False, True])
async def test_a_stream_cut_anywhere_or_not_at_all_arrives_whole(herd: Herd, spaced: bool) -> None:
    await herd.add_node(CutNode("whole", piece=0, spaced=spaced, script=Script(tokens=12)))
    await herd.add_node(CutNode("cut", piece=7, spaced=spaced, model="cut-model", script=Script(tokens=12)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    for model in ("fake-model", "cut-model"):
        body = {"model": model, "prompt": "one two", "max_tokens": 12, "stream": True}
        resp = await alice.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
        assert resp.status_code == 200
        events = data_events(resp.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        assert text == "".join(f" t{i}" for i in range(1, 13)), model
        assert all("llamakit" not in c for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 12
        assert chunks[-1]["usage"]["cost_credits"] > 0
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["completion_tokens"]) for u in usage] == [("ok", 12), ("ok", 12)]
    assert (await alice.get("/v1/account")).json()["spent"] == sum(u["cost_credits"] for u in usage)


async def test_token_chunks_reach_the_client_as_the_node_wrote_them_without_their_counts(herd: Herd) -> None:
    await herd.add_node(CutNode("node", script=Script(tokens=3)))
    await herd.start()
    alice = await herd.account("alice", 100_000)
    body = {"model": "fake-model", "prompt": "one two", "max_tokens": 3, "stream": True}
    resp = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "k"})
    rid = resp.headers["X-Llamakit-Request-Id"]
    events = data_events(resp.text)
    assert events[0] == (
        f'{{"id":"{rid}","object":"text_completion","choices":[{{"index":0,"text":" t1","finish_reason":null}}],'
        '"usage":null}'
    )
    assert [json.loads(e)["id"] for e in events[:-1]] == [rid] * 4 and "usage" not in json.loads(events[-2])
    # What was passed on unread is still what a repeat gets back.
    replayed = await alice.post("/v1/completions", json=body, headers={"Idempotency-Key": "k"})
    assert replayed.headers["Idempotent-Replayed"] == "true"
    chunks = [json.loads(e) for e in data_events(replayed.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " t1 t2 t3"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


ID = b'{"id":"req-1",'
TAIL = b',"usage":null,"llamakit":{"prompt_tokens":4,"completion_tokens":2}}'
TEXT_OF_TAIL = b'"choices":[{"text":' + json.dumps(TAIL.decode()).encode() + b"}]"  # the same bytes, escaped
CACHED_TAIL = b',"usage":null,"llamakit":{"prompt_tokens":4,"completion_tokens":2,"cached_tokens":3}}'


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        (ID + b'"choices":[{"text":"a"}]' + TAIL, (ID + b'"choices":[{"text":"a"}],"usage":null}', TokenCounts(4, 2))),
        (ID + TEXT_OF_TAIL + TAIL, (ID + TEXT_OF_TAIL + b',"usage":null}', TokenCounts(4, 2))),  # text is not counts
        (ID + b'"choices":[]' + CACHED_TAIL, (ID + b'"choices":[],"usage":null}', TokenCounts(4, 2, 3))),
        (ID + TEXT_OF_TAIL + b"}", None),
        (b'{"id":"req-2","choices":[]' + TAIL, None),  # another request's chunk: read, and its id set
        (ID + b'"choices":[]' + TAIL[:-1] + b',"more":1}', None),  # counts not last
        (ID + b'"choices":[],"usage":{"prompt_tokens":4},"llamakit":{"prompt_tokens":4,"completion_tokens":2}}', None),
        (ID + b'"choices":[],"usage":null,"llamakit":{"prompt_tokens":4,"completion_tokens":-2}}', None),
        (ID + b'"error":{"message":"x"}}', None),
    ],
)
def test_a_token_chunk_is_told_from_other_events_without_parsing(
    payload: bytes, found: tuple[bytes, TokenCounts] | None
) -> None:
    assert token_chunk(payload, ID) == found
    if found is not None:
        assert json.loads(found[0]) == {k: v for k, v in json.loads(payload).items() if k != "llamakit"}
