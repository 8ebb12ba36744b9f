"""Streams relayed read for write: however the node's bytes are cut into reads, the client gets every event."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.router.conftest import Herd
from tests.router.fake_node import FakeNode, Script


@dataclass
class CutNode(FakeNode):
    """A node whose whole stream is one byte string, written in pieces of `piece` bytes (0: all at once)."""

    piece: int = 0

    async def _stream(
        self, request: web.Request, rid: str, prompt_tokens: int, n: int, body: dict[str, Any]
    ) -> web.StreamResponse:
        events = [
            {
                "id": rid,
                "object": "text_completion",
                "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}],
                "llamakit": {"prompt_tokens": prompt_tokens, "completion_tokens": i},
            }
            for i in range(1, n + 1)
        ]
        events.append({"id": rid, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        events.append({"id": rid, "choices": [], "usage": usage})
        raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
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


async def test_a_stream_cut_anywhere_or_not_at_all_arrives_whole(herd: Herd) -> None:
    await herd.add_node(CutNode("whole", piece=0, script=Script(tokens=12)))
    await herd.add_node(CutNode("cut", piece=7, model="cut-model", script=Script(tokens=12)))
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
