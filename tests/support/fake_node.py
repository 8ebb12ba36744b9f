"""A scripted stand-in for a node, for testing the router's own behaviour (queue order, failover, timeouts).

It speaks the node's protocol (health, herd token, OpenAI-shaped answers, SSE with running token counts) and
does what its `Script` says: how many tokens, how fast, and how to fail. Tests serve `FakeNode(...).app()` in
their own event loop; where a node must be a process of its own (a soak, nodes on other hosts, a herd of a
thousand for `bench/herd_scale.py`), `python -m tests.support.fake_node --port P` serves one (see `main`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llamakit.wire.node import TokenCounts, with_counts

HERD_TOKEN = "fake-herd-token"
EMBEDDING_SIZE = 4
FAKE_VOCAB = 1000
# Set when the app shuts down, so hung requests end and the server stops at once instead of waiting for them.
STOPPING = web.AppKey("stopping", asyncio.Event)


@dataclass
class Script:
    tokens: int = 5
    token_delay: float = 0.0
    first_delay: float = 0.0
    fail_status: int | None = None  # answer every request with this status
    fail_code: str | None = None  # and this error code
    fail_message: str | None = None  # and this message (default: "scripted <status>")
    die_after: int | None = None  # stream: drop the connection after this many tokens
    stall_after: int | None = None  # stream: go silent after this many tokens (0: after the headers)
    hang: bool = False  # never answer (until the server stops)
    gate: asyncio.Event | None = None  # hold every request until set
    keepalive: bool = False  # whole answers: a space before the JSON for every token, as a real node proves life
    # As a real node: 503 slots_busy while all its slots generate; and a slot freed only this long after its
    # request ended (a real node sees a cut stream at its next token).
    busy_when_full: bool = False
    frees_late: float = 0.0
    # stream: these tool calls, (name, arguments), instead of text, as llama.cpp streams them: a chunk with the
    # call's index, id and name, then its arguments in two pieces (a token each); finish_reason "tool_calls"
    calls: list[tuple[str, str]] | None = None
    # A prompt cache as a node's: a prompt's words that an earlier prompt of the same X-Llamakit-Cache-Salt began
    # with are reported as usage.prompt_tokens_details.cached_tokens, and in a stream's running counts
    cache: bool = False


@dataclass
class FakeNode:
    name: str
    model: str = "fake-model"
    slots: int = 1
    script: Script = field(default_factory=Script)
    received: list[dict[str, Any]] = field(default_factory=list)
    cache_salts: list[str | None] = field(default_factory=list)  # X-Llamakit-Cache-Salt of each generation
    traceparents: list[str | None] = field(default_factory=list)  # the W3C traceparent of each generation
    active: int = 0
    max_active: int = 0
    cancelled: int = 0
    busy_refusals: int = 0  # 503 slots_busy answers (Script.busy_when_full)
    status: str = "ready"
    n_ctx: int | None = None  # said in /health when set, as a real node says its context
    stops: dict[str, asyncio.Event] = field(default_factory=dict)  # by request id: POST /admin/cancel/{id}
    # Answers in OpenAI's exact shapes, as a real node writes them (chat.completion with a message, chunks with a
    # delta, `created` everywhere): for checking the router's answers against its OpenAPI document. Off, chat
    # answers are text completions, which the router's own behaviour does not care about.
    openai_shapes: bool = False
    prompts: dict[str | None, list[list[str]]] = field(default_factory=dict)  # Script.cache: earlier prompts by salt

    def app(self) -> web.Application:
        app = web.Application()
        app[STOPPING] = asyncio.Event()

        async def stopping(app: web.Application) -> None:
            app[STOPPING].set()

        app.on_shutdown.append(stopping)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/embeddings", self.embed)
        app.router.add_post("/admin/cancel/{rid}", self.cancel)
        return app

    async def cancel(self, request: web.Request) -> web.Response:
        stop = self.stops.get(request.match_info["rid"])
        if stop is None:
            return web.json_response({"error": {"message": "not running", "type": "not_found_error"}}, status=404)
        stop.set()
        return web.json_response({"cancelled": True})

    async def embed(self, request: web.Request) -> web.StreamResponse:
        """Embeddings of EMBEDDING_SIZE: a text costs its words + 1 tokens, a token-id list its length; ids from
        FAKE_VOCAB on are refused as a real node refuses them. Honours the script's failures and delays."""
        if request.headers.get("Authorization") != f"Bearer {HERD_TOKEN}":
            return web.json_response({"error": {"message": "herd token", "type": "authentication_error"}}, status=401)
        body = await request.json()
        self.received.append(body)
        if self.script.fail_status is not None:
            script = self.script
            message = script.fail_message or f"scripted {script.fail_status}"
            error = {"message": message, "type": "server_error", "code": script.fail_code}
            return web.json_response({"error": error}, status=script.fail_status)
        raw = body["input"]
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        if any(isinstance(i, list) and any(t >= FAKE_VOCAB for t in i) for i in inputs):
            error = {"message": "token id not in the vocabulary", "type": "invalid_request_error", "param": "input"}
            return web.json_response({"error": error}, status=400)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.script.gate is not None:
                await self.script.gate.wait()
            await asyncio.sleep(self.script.first_delay)
        finally:
            self.active -= 1
        tokens = sum(len(i) if isinstance(i, list) else len(i.split()) + 1 for i in inputs)
        vectors = [[float(n), 0.5, -0.25, 1.0][:EMBEDDING_SIZE] for n in range(len(inputs))]
        data = [
            {
                "object": "embedding",
                "index": n,
                "embedding": base64.b64encode(struct.pack("<4f", *v)).decode()
                if body.get("encoding_format") == "base64"
                else v,
            }
            for n, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": self.model, "usage": usage})

    async def health(self, request: web.Request) -> web.Response:
        health = {"status": self.status, "name": self.name, "models": [self.model], "slots": self.slots,
                  "busy": self.active}  # fmt: skip
        if self.n_ctx is not None:
            health["n_ctx"] = self.n_ctx
        return web.json_response(health)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {HERD_TOKEN}":
            return web.json_response({"error": {"message": "herd token", "type": "authentication_error"}}, status=401)
        body = await request.json()
        self.received.append(body)
        self.cache_salts.append(request.headers.get("X-Llamakit-Cache-Salt"))
        self.traceparents.append(request.headers.get("traceparent"))
        script = self.script
        if script.hang:
            await request.app[STOPPING].wait()
            return web.json_response({"error": {"message": "stopped", "type": "server_error"}}, status=503)
        if script.fail_status is not None:
            return web.json_response(
                {
                    "error": {
                        "message": script.fail_message or f"scripted {script.fail_status}",
                        "type": "server_error",
                        "code": script.fail_code,
                    }
                },
                status=script.fail_status,
            )
        if script.busy_when_full and self.active >= self.slots:
            self.busy_refusals += 1
            error = {"message": "all slots are busy", "type": "server_error", "code": "slots_busy"}
            return web.json_response({"error": error}, status=503, headers={"Retry-After": "1"})
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if script.gate is not None:
                await script.gate.wait()
            if not await self._still_wanted(request, script.first_delay):
                self.cancelled += 1
                return web.Response(status=499)
            text = body.get("prompt") or " ".join(m.get("content") or "" for m in body.get("messages", []))
            prompt_tokens = len(str(text).split()) + 3
            cached = self._cached(request.headers.get("X-Llamakit-Cache-Salt"), str(text).split())
            n = min(script.tokens, body.get("max_tokens") or script.tokens)
            rid = request.headers.get("X-Llamakit-Request-Id", "x")
            if body.get("stream"):
                if cached is None:  # as subclasses that write streams of their own take it
                    return await self._stream(request, rid, prompt_tokens, n, body)
                return await self._stream(request, rid, prompt_tokens, n, body, cached)
            stop = self.stops[rid] = asyncio.Event()
            resp: web.StreamResponse | None = None
            made = 0
            while made < n and not stop.is_set():
                await asyncio.sleep(script.token_delay)
                made += 1
                if script.keepalive:
                    if resp is None:
                        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
                        await resp.prepare(request)
                    await resp.write(b" ")
            del self.stops[rid]
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": made, "total_tokens": prompt_tokens + made}
            if cached is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            answer = {
                "id": rid,
                "object": "text_completion",
                "model": self.model,
                "choices": [{"index": 0, "text": " tok" * made, "finish_reason": "length"}],
                "usage": usage,
            }
            if self.openai_shapes:
                answer = self._shaped(answer, chat=request.path.endswith("/chat/completions"))
            if resp is None:
                return web.json_response(answer)
            await resp.write(json.dumps(answer).encode())
            await resp.write_eof()
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            if script.frees_late:
                asyncio.get_running_loop().call_later(script.frees_late, self._free_slot)
            else:
                self.active -= 1

    def _cached(self, salt: str | None, words: list[str]) -> int | None:
        """Script.cache: the words of `words` that an earlier prompt of `salt` began with (None without a cache)."""
        if not self.script.cache:
            return None
        earlier = self.prompts.setdefault(salt, [])
        best = 0
        for seen in earlier:
            shared = next(
                (i for i, (a, b) in enumerate(zip(seen, words, strict=False)) if a != b), min(len(seen), len(words))
            )
            best = max(best, shared)
        earlier.append(words)
        return best

    def _free_slot(self) -> None:
        self.active -= 1

    def _shaped(self, answer: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        """A whole answer as a real node writes it: `created`, and for chat a `chat.completion` with a message."""
        answer["created"] = 1
        if chat:
            answer["object"] = "chat.completion"
            answer["choices"] = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": choice["text"]},
                    "logprobs": None,
                    "finish_reason": choice["finish_reason"],
                }
                for choice in answer["choices"]
            ]
        return answer

    @staticmethod
    async def _still_wanted(request: web.Request, seconds: float) -> bool:
        """Wait `seconds`, as a node decoding a prompt does; False as soon as the caller closed the connection."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            if request.transport is None or request.transport.is_closing():
                return False
            await asyncio.sleep(min(0.02, seconds))
        return True

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        prompt_tokens: int,
        n: int,
        body: dict[str, Any],
        cached: int | None = None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(data: dict[str, Any]) -> None:
            # Compact, as a real node writes its chunks (the router passes token chunks on without parsing them).
            await resp.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")

        chat = self.openai_shapes and request.path.endswith("/chat/completions")
        calls = self.script.calls
        pieces = _call_pieces(calls) if calls else [{"delta": {"content": " tok"}} if chat else {"text": " tok"}] * n
        n = len(pieces)
        shape = {"created": 1, "model": self.model} if self.openai_shapes else {}
        try:
            for i, piece in enumerate(pieces, 1):
                await asyncio.sleep(self.script.token_delay)
                if self.script.die_after is not None and i > self.script.die_after:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if self.script.stall_after is not None and i > self.script.stall_after:
                    await request.app[STOPPING].wait()
                    return resp
                chunk = {
                    "id": rid,
                    "model": self.model,
                    "object": "chat.completion.chunk" if calls or chat else "text_completion",
                    **shape,
                    "choices": [{"index": 0, **piece, "finish_reason": None}],
                    "usage": None,
                }
                await send(with_counts(chunk, TokenCounts(prompt_tokens, i, cached or 0)))
            finish = (
                {"delta": {}, "finish_reason": "tool_calls" if calls else "length"}
                if calls or chat
                else {"text": "", "finish_reason": "length"}
            )
            kind = {"object": "chat.completion.chunk" if calls or chat else "text_completion"} if shape else {}
            await send({"id": rid, "model": self.model, **kind, **shape, "choices": [{"index": 0, **finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                usage: dict[str, Any] = {
                    "prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n
                }  # fmt: skip
                if cached is not None:
                    usage["prompt_tokens_details"] = {"cached_tokens": cached}
                await send({"id": rid, "model": self.model, **kind, **shape, "choices": [], "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionError, asyncio.CancelledError):
            self.cancelled += 1
            raise
        return resp


def _call_pieces(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The chat deltas of a stream of tool calls (see Script.calls)."""
    pieces: list[dict[str, Any]] = []
    for index, (name, arguments) in enumerate(calls):
        head = {"index": index, "id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": ""}}
        half = len(arguments) // 2
        pieces.append({"delta": {"tool_calls": [head]}})
        for part in (arguments[:half], arguments[half:]):
            pieces.append({"delta": {"tool_calls": [{"index": index, "function": {"arguments": part}}]}})
    return pieces


class _Forgetful(list[dict[str, Any]]):
    """`FakeNode.received` in a process of its own: nobody reads it there, and a list of every request body
    a long benchmark sent grew the heap that each of the garbage collector's full passes walks."""

    def append(self, item: dict[str, Any]) -> None:
        pass


async def serve(*, host: str, port: int, name: str, ports: int, slots: int, tokens: int, token_delay: float) -> None:
    """Serve `ports` fake nodes on ports `port`.. from one event loop, and say "ready" once all listen."""
    runners = []
    for i in range(ports):
        node = FakeNode(
            name if ports == 1 else f"{name}-{i}",
            slots=slots,
            script=Script(tokens, token_delay),
            received=_Forgetful(),
        )
        runner = web.AppRunner(node.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port + i).start()
        runners.append(runner)
    # A thousand apps are a heap of long-lived objects: out of the collector's way, so that a herd of 1,000
    # answers as cheaply per request as a herd of one.
    gc.freeze()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def main() -> None:
    """`python -m tests.support.fake_node --port P`: a fake node in a process of its own.

    With `--ports K` it serves K nodes on ports P..P+K-1 from one process and one event loop (for big herds:
    `bench/herd_scale.py`); each is named N-<i>.
    """
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_node")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--ports", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(serve(**vars(args)))


if __name__ == "__main__":
    main()
