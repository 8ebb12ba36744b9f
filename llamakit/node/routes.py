"""The node's HTTP handlers (health, models, chat and text completions, plain and streamed, model swap, metrics) and
the one table that turns the node's own exceptions (`node.errors`) into statuses and OpenAI error bodies."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from llamakit.node.answers import Answer
from llamakit.node.engine import GenerationJob, GenerationResult, LoadedModel, TokenLogprob
from llamakit.node.errors import NodeError
from llamakit.node.host import ModelHost, Slot
from llamakit.node.http_errors import http_error, status_of
from llamakit.node.loop_inbox import LoopInbox
from llamakit.node.metrics import NodeMetrics
from llamakit.node.settings import NodeSettings
from llamakit.node.tracing import GenerationTrace, traced_generation
from llamakit.web import SseWriter, json_response
from llamakit.wire.completions import ChatCompletionRequest, CompletionRequest, GenerationRequest, Usage, parse_request
from llamakit.wire.errors import ApiError, error_body
from llamakit.wire.headers import CACHE_SALT_HEADER, KEEPALIVE_HEADER, REQUEST_ID_HEADER
from llamakit.wire.node import NodeHealth, TokenCounts, with_counts

__all__ = ["HOST", "INBOX", "METRICS", "RUNS", "SETTINGS", "http_error", "routes"]

log = logging.getLogger(__name__)

HOST = web.AppKey("host", ModelHost)
SETTINGS = web.AppKey("settings", NodeSettings)
METRICS = web.AppKey("metrics", NodeMetrics)
# The stop signals of the generations running now, by request id: what `POST /admin/cancel/{id}` sets.
RUNS = web.AppKey("runs", dict[str, threading.Event])
INBOX = web.AppKey("inbox", LoopInbox)  # text from the generating threads to the streams

DEFAULT_KEEPALIVE = 1.0
CLIENT_POLL_SECONDS = 0.1
# The longest one decode step may take and still count as work (a 512-token prompt chunk takes ~2 s on two
# cores; a grammar over a large vocabulary can take seconds per token): past it, keepalives stop.
MAX_STEP_SECONDS = 120.0

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    host = request.app[HOST]
    settings = request.app[SETTINGS]
    placement = host.model.placement if host.model is not None else None
    health = NodeHealth(
        status=host.status,
        name=settings.name,
        model=host.model_name,
        models=[host.model.name] if host.model is not None else [],
        slots=host.slot_count,
        busy=host.busy,
        n_ctx=settings.n_ctx,
        error=host.error,
        model_file=host.file_error,
    )
    if placement is not None:
        health = health.model_copy(
            update={
                "backend": placement.backend,
                "gpu_layers": placement.offloaded,
                "layers": placement.layers,
                "flash_attn": placement.flash_attn,
                "cache_type_k": placement.cache_type_k,
                "cache_type_v": placement.cache_type_v,
            }
        )
    return json_response(health.model_dump())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    host = request.app[HOST]
    data = []
    if host.model is not None:
        data.append(
            {
                "id": host.model.name,
                "object": "model",
                "created": 0,
                "owned_by": "llamakit",
                "n_ctx": host.model.n_ctx,
            }
        )
    return json_response({"object": "list", "data": data})


@routes.post("/admin/init")
async def admin_init(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, 'send {"model": "<catalog name or path to a .gguf file>"}', param="model")
    host = request.app[HOST]
    host.start_loading(body["model"])
    return json_response({"status": host.status, "model": host.loading_name}, status=202)


@routes.post("/admin/cancel/{request_id}")
async def admin_cancel(request: web.Request) -> web.Response:
    """Stop a running generation (its router's client went away); the request's own response then carries the
    partial answer and its exact usage. 404 when no generation of that id runs here."""
    request_id = request.match_info["request_id"]
    stop = request.app[RUNS].get(request_id)
    if stop is None:
        raise ApiError(404, f"no generation {request_id!r} is running here", type="not_found_error")
    stop.set()
    return json_response({"id": request_id, "cancelled": True})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_request(ChatCompletionRequest, await request.read())
    messages = req.template_messages()
    return await _serve(request, req, "chat", lambda model: model.tokenize_chat(messages))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_request(CompletionRequest, await request.read())
    prompt = req.prompt_text
    return await _serve(request, req, "completion", lambda model: model.tokenize_text(prompt))


@dataclass
class _Prepared:
    model: LoadedModel
    job: GenerationJob


async def _prepare(
    host: ModelHost,
    settings: NodeSettings,
    req: GenerationRequest,
    tokenize: Callable[[LoadedModel], list[int]],
    cache_salt: str,
) -> _Prepared:
    """Validate the request against the loaded model and tokenize it (off the loop): no slot is taken yet."""
    model = await host.serving(req.model)

    setup = req.tool_setup() if isinstance(req, ChatCompletionRequest) else None

    def build() -> GenerationJob:
        tokens = tokenize(model)
        return GenerationJob(
            prompt_tokens=tokens,
            max_tokens=model.plan_tokens(len(tokens), req.token_limit, settings.default_max_tokens),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop_list,
            grammar=model.grammar_for(
                req.grammar, req.response_format, tools_schema=setup.schema_ if setup is not None else None
            ),
            logit_bias=model.logit_bias(req.logit_bias),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repeat_penalty=req.repeat_penalty,
            logprobs=req.logprob_count(),
            cache_salt=cache_salt,
        )

    return _Prepared(model, await asyncio.to_thread(build))


async def _take_slot(
    host: ModelHost,
    settings: NodeSettings,
    req: GenerationRequest,
    tokenize: Callable[[LoadedModel], list[int]],
    cache_salt: str,
) -> tuple[Slot, GenerationJob]:
    prepared = await _prepare(host, settings, req, tokenize, cache_salt)
    slot = await host.take_slot(prepared.job.prompt_tokens, cache_salt)
    if slot.model is not prepared.model:  # the model was swapped while we tokenized: do it again
        host.free_slot(slot)
        return await _take_slot(host, settings, req, tokenize, cache_salt)
    return slot, prepared.job


async def _serve(
    request: web.Request, req: GenerationRequest, kind: str, tokenize: Callable[[LoadedModel], list[int]]
) -> web.StreamResponse:
    model = req.model or request.app[HOST].model_name or ""
    return await traced_generation(
        request,
        lambda trace: _generate(request, req, kind, tokenize, trace),
        kind=kind,
        model=model,
        node=request.app[SETTINGS].name,
    )


async def _generate(
    request: web.Request,
    req: GenerationRequest,
    kind: str,
    tokenize: Callable[[LoadedModel], list[int]],
    trace: GenerationTrace | None,
) -> web.StreamResponse:
    host, settings, metrics = request.app[HOST], request.app[SETTINGS], request.app[METRICS]
    route = "chat" if kind == "chat" else "completions"
    try:
        slot, job = await _take_slot(host, settings, req, tokenize, request.headers.get(CACHE_SALT_HEADER, ""))
    except (ApiError, NodeError) as exc:
        metrics.requests.labels(route, "busy" if status_of(exc) == 503 else "rejected").inc()
        raise
    request_id = (
        request.headers.get(REQUEST_ID_HEADER) or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    )
    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    logprobs: list[TokenLogprob] | None = [] if job.logprobs is not None else None
    answer = Answer(
        kind=kind,
        id=request_id,
        model=slot.model.name,
        tools=isinstance(req, ChatCompletionRequest) and req.tool_setup() is not None,
        logprobs=logprobs,
    )
    run = _Run(request, slot, job, answer, cancel, keepalive=_keepalive(request))
    runs = request.app[RUNS]
    runs[request_id] = cancel
    if trace is not None:
        trace.started(request_id, slot.index)

    def start(on_text: Callable[[str, int], None]) -> asyncio.Future[GenerationResult]:
        generate = functools.partial(
            slot.model.generate, on_progress=run.advanced, logprobs=logprobs, on_admitted=run.admitted
        )
        future = loop.run_in_executor(host.executor, generate, slot.index, job, on_text, cancel)
        # The slot is free only once its thread has stopped, however the request ended.
        future.add_done_callback(lambda f: _finished(host, metrics, route, slot, f, trace))
        return future

    try:
        if req.stream:
            return await run.stream(start, req.include_usage)
        return await run.whole(start)
    finally:
        if runs.get(request_id) is cancel:
            del runs[request_id]


def _keepalive(request: web.Request) -> float:
    try:
        value = float(request.headers.get(KEEPALIVE_HEADER, DEFAULT_KEEPALIVE))
    except ValueError:
        value = DEFAULT_KEEPALIVE
    return min(max(value, 0.05), 30.0) if value == value else DEFAULT_KEEPALIVE


def _finished(
    host: ModelHost,
    metrics: NodeMetrics,
    route: str,
    slot: Slot,
    future: asyncio.Future[GenerationResult],
    trace: GenerationTrace | None,
) -> None:
    host.free_slot(slot)
    if future.cancelled() or future.exception() is not None:
        metrics.requests.labels(route, "error").inc()
        if not future.cancelled():
            log.error("generation failed", exc_info=future.exception())
        return
    result = future.result()
    if trace is not None:
        trace.generated(result)
    metrics.observe_generation(result.prompt_tokens, result.completion_tokens, result.seconds, result.cached_tokens)
    outcome = "cancelled" if result.finish_reason == "cancelled" else "ok"
    metrics.requests.labels(route, outcome).inc()
    if outcome == "cancelled":
        log.info("generation stopped by its client after %d completion tokens", result.completion_tokens)


class _Run:
    """One generation tied to its HTTP request: stops the thread when the client goes away, and tells the
    client it is alive while the answer takes long (whitespace before a JSON body, comments in a stream)."""

    def __init__(
        self,
        request: web.Request,
        slot: Slot,
        job: GenerationJob,
        answer: Answer,
        cancel: threading.Event,
        *,
        keepalive: float,
    ) -> None:
        self.request = request
        self.model = slot.model
        self.job = job
        self.answer = answer
        self.request_id = answer.id
        self.cancel = cancel
        self.keepalive = keepalive
        self.progress = 0  # decodes that advanced this request; bumped on the decode thread
        self._told = 0  # the progress the client last heard of
        # The prompt tokens the slot's cache held: written on the decode thread before it hands on any text, so
        # every piece of text the loop takes from the inbox comes after it (one write per request, none per token).
        self.cached_tokens = 0

    def advanced(self) -> None:
        self.progress += 1

    def admitted(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens

    def _client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def _news(self) -> bool:
        """Whether the generation advanced since the client last heard from us, or a decode step is under way
        (a long prompt chunk, a heavy grammar) that began less than MAX_STEP_SECONDS ago. Only work is told: a
        decode loop that is stuck sends nothing after that, so its router still takes the node for hung."""
        if self.progress != self._told:
            self._told = self.progress
            return True
        started = self.model.step_started
        return started is not None and time.monotonic() - started < MAX_STEP_SECONDS

    async def whole(
        self, start: Callable[[Callable[[str, int], None]], asyncio.Future[GenerationResult]]
    ) -> web.StreamResponse:
        future = start(lambda _text, _n: None)
        loop = asyncio.get_running_loop()
        response: web.StreamResponse | None = None
        beat = loop.time() + self.keepalive
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=min(CLIENT_POLL_SECONDS, self.keepalive))
                if done:
                    break
                if self._client_gone():
                    self.cancel.set()
                elif loop.time() >= beat:
                    beat = loop.time() + self.keepalive
                    if self._news():
                        # JSON allows whitespace before the value: the body is a valid answer whatever it starts with.
                        if response is None:
                            response = web.StreamResponse(headers={REQUEST_ID_HEADER: self.request_id})
                            response.content_type = "application/json"
                            await response.prepare(self.request)
                        await response.write(b" ")
            try:
                result = future.result()
            except Exception as exc:
                if response is None:
                    raise
                # The status went out with the first keepalive: the error goes in the body, where the router looks.
                log.error("generation failed", exc_info=exc)
                await response.write(_json(error_body(f"generation failed: {exc}", type="server_error")))
                await response.write_eof()
                return response
        finally:
            self.cancel.set()  # no-op when finished; stops the thread if this handler was cancelled
        usage = Usage.of(result.prompt_tokens, result.completion_tokens, cached_tokens=result.cached_tokens)
        body = self.answer.body(result, usage)
        if response is None:
            return json_response(body, headers={REQUEST_ID_HEADER: self.request_id})
        await response.write(_json(body))
        await response.write_eof()
        return response

    async def stream(
        self,
        start: Callable[[Callable[[str, int], None]], asyncio.Future[GenerationResult]],
        include_usage: bool,
    ) -> web.StreamResponse:
        pieces: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        inbox = self.request.app[INBOX]

        def on_text(text: str, completion_tokens: int) -> None:  # called on the slot's (or decode loop's) thread
            inbox.post(pieces.put_nowait, (text, completion_tokens))

        def on_end(_future: asyncio.Future[GenerationResult]) -> None:  # the text posted before the end goes first
            inbox.run_posted()
            pieces.put_nowait(None)

        future = start(on_text)
        future.add_done_callback(on_end)
        answer, rid = self.answer, self.request_id
        n_prompt = len(self.job.prompt_tokens)
        try:
            sse = await SseWriter.open(self.request, {REQUEST_ID_HEADER: rid})
            for chunk in answer.opening():
                await sse.send(chunk)
            while (item := await self._next(pieces, sse)) is not None:
                text, n_completion = item
                for chunk in answer.piece(text, n_completion):
                    # What a router charges for when the stream is cut before its usage (see wire.node).
                    await sse.send(with_counts(chunk, TokenCounts(n_prompt, n_completion, self.cached_tokens)))
            try:
                result = future.result()
            except Exception as exc:
                log.exception("generation failed")
                await sse.send(error_body(f"generation failed: {exc}", type="server_error"))
                await sse.done()
                return sse.response
            usage = Usage.of(result.prompt_tokens, result.completion_tokens, cached_tokens=result.cached_tokens)
            counts = TokenCounts(n_prompt, result.completion_tokens, result.cached_tokens)
            for chunk in answer.closing(result):
                if chunk["choices"] and chunk["choices"][0]["delta" if "delta" in chunk["choices"][0] else "text"]:
                    with_counts(chunk, counts)  # a tool call held back until now is a delivery too
                await sse.send(chunk)
            if include_usage:
                await sse.send(answer.usage(usage))
            await sse.done()
            return sse.response
        except (ConnectionError, asyncio.CancelledError):
            # The client closed the stream: stop generating; the tokens made so far are what it cost.
            self.cancel.set()
            raise
        finally:
            self.cancel.set()

    async def _next(self, pieces: asyncio.Queue[tuple[str, int] | None], sse: SseWriter) -> tuple[str, int] | None:
        """The next piece of text; meanwhile, a comment every `keepalive` seconds while the generation advances
        without text (a long prompt), and a stop as soon as the client is gone (before a token, nothing else
        would notice)."""
        loop = asyncio.get_running_loop()
        beat = loop.time() + self.keepalive
        while True:
            if not pieces.empty():  # the common case while tokens flow: no timer, no task per token
                return pieces.get_nowait()
            try:
                return await asyncio.wait_for(pieces.get(), timeout=min(CLIENT_POLL_SECONDS, self.keepalive))
            except TimeoutError:
                pass
            if self._client_gone():
                self.cancel.set()
                raise ConnectionResetError("the client closed the stream")
            if loop.time() >= beat:
                beat = loop.time() + self.keepalive
                if self._news():
                    await sse.comment("keep-alive")


def _json(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
