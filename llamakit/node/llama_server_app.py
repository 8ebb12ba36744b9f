"""`create_app(settings)` for a node whose engine is llama.cpp's own llama-server: one running at a URL
(`--llama-server`), or one the node starts and keeps running (`--llama-server-bin`).

The node is a node as any other to its router: it joins the herd, takes work only with the herd token, answers
`/health` with the slots and context llama-server has (`/props`, `/slots`), and serves chat, text completions,
their streams and embeddings in the node's own shapes (`answers.Answer`, the running token counts of
`wire.node`), with the usage llama-server counted. A generation stops when its router cancels it or its client
leaves: the node closes its connection to llama-server, which frees the slot.

Each request goes to a slot the node picks (`id_slot`): one last used by the same tenant (the router's cache
salt), whose cached prompt it may reuse, or else one whose cache it may not (`cache_prompt: false`), so that no
tenant's request reuses, and learns from, another tenant's prompt. Nothing of llama-cpp-python is imported here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from llamakit import jsontext
from llamakit.catalog import resolve_model
from llamakit.node.answers import Answer
from llamakit.node.http_errors import http_error
from llamakit.node.llama_server import (
    LlamaServerClient,
    ServerInfo,
    Supervisor,
    Unreachable,
    UpstreamError,
    free_loopback_port,
)
from llamakit.node.llama_server_request import Chunk, generation_body, read_chunk, upstream_refusal
from llamakit.node.membership import keep_membership
from llamakit.node.metrics import NodeMetrics, count_connections
from llamakit.node.results import GenerationResult, TokenLogprob
from llamakit.node.settings import NodeSettings
from llamakit.node.tracing import GenerationTrace, setup_tracing, traced_generation
from llamakit.server import deadline_middleware
from llamakit.telemetry import Tracing
from llamakit.web import Handler, SseWriter, error_middleware_for, json_response, require_bearer
from llamakit.wire.completions import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Usage,
    parse_json,
    parse_request,
)
from llamakit.wire.embeddings import embedding_body, parse_embedding_request
from llamakit.wire.errors import ApiError, error_body
from llamakit.wire.headers import CACHE_SALT_HEADER, KEEPALIVE_HEADER, REQUEST_ID_HEADER
from llamakit.wire.node import LlamaServerHealth, NodeHealth, TokenCounts, with_counts

__all__ = ["FRONTED", "Fronted", "create_app", "supervised_command"]

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})
POLL_SECONDS = 1.0  # how often the node asks llama-server whether it is up, and what it serves
CLIENT_POLL_SECONDS = 0.1  # how often a request looks for its client and its cancel while llama-server is quiet
DEFAULT_KEEPALIVE = 1.0
# Flags of llama-server's that a supervised one gets from the node, and may not be given after `--`.
# llama-server's environment variable for --api-key (common/arg.cpp: `.set_env("LLAMA_API_KEY")`).
LLAMA_API_KEY_ENV = "LLAMA_API_KEY"
OWNED_FLAGS = frozenset({"--host", "--port", "--api-key", "--api-key-file", "-m", "--model"})

Status = Literal["loading", "ready", "error"]


@dataclass
class _Slot:
    id: int
    busy: bool = False
    salt: str | None = None  # whose prompt its cache holds (None: nobody's yet)
    used: float = 0.0


@dataclass(frozen=True)
class Lease:
    """One llama-server slot taken for a request; `warm` when its cache is the same tenant's, and may be reused."""

    slot: int
    warm: bool


class Fronted:
    """The llama-server behind this node: whether it is up, what it serves, and which of its slots are taken.
    A `membership.HerdMember`."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.supervisor: Supervisor | None = None
        if settings.llama_server_bin is not None:
            key = secrets.token_urlsafe(24)
            url = f"http://127.0.0.1:{free_loopback_port()}"
            self.supervisor = Supervisor(supervised_command(settings, url=url), env={LLAMA_API_KEY_ENV: key})
            self.supervisor.on_exit = lambda reason: self.down(Unreachable(reason))
            self.client = LlamaServerClient(url, key)
        else:
            assert settings.llama_server is not None
            self.client = LlamaServerClient(settings.llama_server, settings.llama_server_api_key)
        # In front of a running llama-server, --model names its model (when given); else llama-server does.
        self.served = settings.model if settings.llama_server and "model" in settings.model_fields_set else None
        self.info: ServerInfo | None = None
        self.status: Status = "loading"
        self.error: str | None = None
        self._slots: list[_Slot] = []
        self._pid: int | None = None  # the supervised process the node learned `info` from
        self._loaded = asyncio.Event()

    # --- what the herd is told (membership.HerdMember) ---

    @property
    def model(self) -> ServerInfo | None:
        return self.info

    @property
    def name(self) -> str | None:
        return self.info.name if self.info is not None else None

    @property
    def slot_count(self) -> int:
        return self.info.slots if self.info is not None else self.settings.slots

    @property
    def busy(self) -> int:
        return sum(slot.busy for slot in self._slots)

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    def health(self) -> NodeHealth:
        supervisor = self.supervisor
        return NodeHealth(
            status=self.status,
            name=self.settings.name,
            model=self.name,
            models=[self.name] if self.name is not None else [],
            slots=self.slot_count,
            busy=self.busy,
            n_ctx=self.info.n_ctx if self.info is not None else None,
            error=self.error,
            llama_server=LlamaServerHealth(
                url=self.client.url,
                build=self.info.build if self.info is not None else None,
                supervised=supervisor is not None,
                pid=supervisor.pid if supervisor is not None else None,
                restarts=supervisor.restarts if supervisor is not None else 0,
            ),
        )

    # --- watching llama-server ---

    async def watch(self) -> None:
        """Run until cancelled: ask llama-server every POLL_SECONDS whether it is up, and learn what it serves
        whenever it comes (back) up."""
        while True:
            await self.check()
            await asyncio.sleep(POLL_SECONDS)

    async def check(self) -> None:
        try:
            ready = await self.client.ready()
            pid = self.supervisor.pid if self.supervisor is not None else None
            if not ready:
                self._set("loading", None)
            elif self.status != "ready" or pid != self._pid:
                info = await self.client.info()
                self._up(info, pid)
        except UpstreamError as exc:
            self.down(exc)

    def _up(self, info: ServerInfo, pid: int | None) -> None:
        if self.served is not None:
            info = dataclasses.replace(info, name=self.served)
        came_back = self.info is not None
        self.info, self._pid = info, pid
        # Its caches are empty after a restart: nobody's prompt is in them. Slots taken now stay taken until
        # their requests end (they fail: their connections to the old process are gone).
        busy = {slot.id for slot in self._slots if slot.busy}
        self._slots = [_Slot(i, busy=i in busy) for i in range(info.slots)]
        self._set("ready", None)
        log.info(
            "llama-server at %s %s: %s (%s), %d slot(s) of %d tokens, build %s",
            self.client.url,
            "is back" if came_back else "is ready",
            info.name,
            info.model_path,
            info.slots,
            info.n_ctx,
            info.build,
        )

    def down(self, exc: UpstreamError) -> None:
        """llama-server failed to answer (a check, or a request): no work until it is back."""
        supervisor = self.supervisor
        reason = exc.message
        if exc.status in (401, 403):  # llama-server's words ("Invalid API Key") do not say whose key, or where
            reason = (
                f"llama-server at {self.client.url} refused this node's API key ({exc.message}): give its "
                "--api-key with --llama-server-api-key (or LLAMAKIT_LLAMA_SERVER_API_KEY)"
            )
        if supervisor is not None:
            if supervisor.pid is not None and (self.info is None or supervisor.pid != self._pid):
                self._set("loading", None)  # a process started since the node last learned: not listening yet
                return
            if supervisor.last_exit is not None:
                reason = f"{supervisor.last_exit}; restarting it"
        if self.status != "error" or self.error != reason:
            log.warning("%s: no requests until it answers again", reason)
        self._set("error", reason)

    def _set(self, status: Status, error: str | None) -> None:
        self.status, self.error = status, error
        if status != "loading" or self.info is not None:
            self._loaded.set()

    # --- serving ---

    def serving(self, requested: str | None) -> ServerInfo:
        """What llama-server serves, if it is up: 503 when it is not, 404 when `requested` names another model."""
        info = self.info
        if self.status == "loading" or (info is None and self.status != "error"):
            raise ApiError(
                503,
                "llama-server is loading its model",
                type="server_error",
                code="loading",
                headers={"Retry-After": "5"},
            )
        if self.status == "error" or info is None:
            raise ApiError(503, self.error or "llama-server is down", type="server_error", code="model_error")
        if requested is not None and requested != info.name:
            raise ApiError(
                404,
                f"model {requested!r} is not served here; this node serves {info.name!r}",
                type="not_found_error",
                code="model_not_found",
                param="model",
            )
        return info

    def lease(self, salt: str) -> Lease:
        """A free slot: the last used by `salt`'s requests (its cache may be reused), else the one unused longest
        (its cache may not); 503 `slots_busy` when every slot is taken."""
        free = [slot for slot in self._slots if not slot.busy]
        if not free:
            raise ApiError(
                503,
                f"all {len(self._slots)} slots are busy; retry shortly or send the request to another node",
                type="server_error",
                code="slots_busy",
                headers={"Retry-After": "1"},
            )
        same = [slot for slot in free if slot.salt == salt]
        slot = max(same, key=lambda s: s.used) if same else min(free, key=lambda s: s.used)
        warm = slot.salt == salt
        slot.busy, slot.salt, slot.used = True, salt, time.monotonic()
        return Lease(slot.id, warm)

    def release(self, lease: Lease) -> None:
        for slot in self._slots:
            if slot.id == lease.slot:
                slot.busy = False

    async def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()
            await self.supervisor.started()

    async def close(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.client.close()


def supervised_command(settings: NodeSettings, *, url: str) -> list[str]:
    """The llama-server command line of a supervised node: its --model, --slots, --ctx-size (per slot),
    --threads, flash attention, KV cache types and GPU flags as llama-server's own, on `url` (loopback),
    without a web UI or a RAM prompt cache (shared by every tenant: see the module's docstring), then the flags
    given after `--`. Its API key is not on it: it goes in the environment (LLAMA_API_KEY_ENV), out of `ps`'s
    sight. ValueError when those flags give one the node owns."""
    assert settings.llama_server_bin is not None
    owned = sorted(OWNED_FLAGS.intersection(a.split("=", 1)[0] for a in settings.llama_server_args))
    if owned:
        raise ValueError(
            f"{owned[0]} is the node's to give to the llama-server it starts: leave it out after -- "
            "(use the node's --model; the node picks a loopback port and an API key)"
        )
    resolved = resolve_model(settings.model)
    port = url.rsplit(":", 1)[1]
    command = [
        settings.llama_server_bin,
        "--model", str(resolved.path),
        "--alias", resolved.name,
        "--host", "127.0.0.1",
        "--port", port,
        "--parallel", str(settings.slots),
        "--ctx-size", str(settings.n_ctx * settings.slots),  # llama-server splits it among its slots
        "--threads", str(settings.threads),
        "--threads-batch", str(settings.threads),
        "--flash-attn", settings.flash_attn,
        "--cache-type-k", settings.cache_type_k,
        "--cache-type-v", settings.cache_type_v,
        "--gpu-layers", str(settings.gpu_layers),
        # llama-server's own defaults, given only when they are not (else a CPU build warns that they do nothing)
        *(["--main-gpu", str(settings.main_gpu)] if settings.main_gpu != 0 else []),
        *(["--split-mode", settings.split_mode] if settings.split_mode != "layer" else []),
        *(["--tensor-split", ",".join(f"{v:g}" for v in settings.tensor_split)] if settings.tensor_split else []),
        "--cache-ram", "0",
        "--no-prefill-assistant",  # a last assistant message is answered, not continued, as on the other node
        "--no-webui",
        *settings.llama_server_args,
    ]  # fmt: skip
    return command


FRONTED = web.AppKey("fronted", Fronted)
METRICS = web.AppKey("llama_server_metrics", NodeMetrics)
RUNS = web.AppKey("llama_server_runs", dict[str, asyncio.Event])

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response(request.app[FRONTED].health().model_dump())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    info = request.app[FRONTED].info
    data = []
    if info is not None:
        data.append({"id": info.name, "object": "model", "created": 0, "owned_by": "llamakit", "n_ctx": info.n_ctx})
    return json_response({"object": "list", "data": data})


@routes.post("/admin/init")
async def admin_init(request: web.Request) -> web.Response:
    raise ApiError(
        400,
        "this node fronts llama-server, which serves the model it was started with: start llama-server (or, with "
        "--llama-server-bin, this node) with the other model",
        code="unsupported",
        param="model",
    )


@routes.post("/admin/cancel/{request_id}")
async def admin_cancel(request: web.Request) -> web.Response:
    """Stop a running generation; the request's own response then carries what was made and its usage."""
    request_id = request.match_info["request_id"]
    stop = request.app[RUNS].get(request_id)
    if stop is None:
        raise ApiError(404, f"no generation {request_id!r} is running here", type="not_found_error")
    stop.set()
    return json_response({"id": request_id, "cancelled": True})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_request(ChatCompletionRequest, await request.read()), "chat")


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_request(CompletionRequest, await request.read()), "completion")


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    fronted, metrics = request.app[FRONTED], request.app[METRICS]
    req = parse_embedding_request(parse_json(await request.read()))
    info = fronted.serving(req.model)
    if req.dimensions is not None and req.dimensions != info.n_embd:
        raise ApiError(
            400,
            f"dimensions is {req.dimensions}, but {info.name!r} makes vectors of {info.n_embd} and llamakit does not "
            "shorten them: leave dimensions out or give that number",
            param="dimensions",
        )
    lease = fronted.lease(request.headers.get(CACHE_SALT_HEADER, ""))
    try:
        answer = await fronted.client.post_json("/v1/embeddings", {"input": req.input, "encoding_format": "float"})
    except UpstreamError as exc:
        metrics.requests.labels("embeddings", "error").inc()
        if isinstance(exc, Unreachable):
            fronted.down(exc)
        if exc.status == 501 or exc.type == "not_supported_error" or "pooling" in exc.message.lower():
            # Another node of the same model may embed: a 5xx sends the router there.
            raise ApiError(
                503,
                f"this node's llama-server computes no embeddings ({exc.message}); start it with --embeddings "
                "--pooling mean for an embedding model, or send embeddings to a node of llama-cpp-python",
                type="server_error",
                code="embeddings_unavailable",
            ) from exc
        raise upstream_refusal(exc.status, "embeddings", exc.type, exc.message, url=fronted.client.url) from exc
    finally:
        fronted.release(lease)
    data = sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))
    usage = answer.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    metrics.requests.labels("embeddings", "ok").inc()
    metrics.prompt_tokens.inc(prompt_tokens)
    return json_response(
        embedding_body(
            model=info.name,
            vectors=[d["embedding"] for d in data],
            encoding_format=req.encoding_format,
            prompt_tokens=prompt_tokens,
        ),
        headers={REQUEST_ID_HEADER: request.headers.get(REQUEST_ID_HEADER) or f"emb-{uuid.uuid4().hex}"},
    )


async def _serve(request: web.Request, req: GenerationRequest, kind: str) -> web.StreamResponse:
    fronted = request.app[FRONTED]
    return await traced_generation(
        request,
        lambda trace: _generate(request, req, kind, trace),
        kind=kind,
        model=req.model or fronted.name or "",
        node=fronted.settings.name,
    )


async def _generate(
    request: web.Request, req: GenerationRequest, kind: str, trace: GenerationTrace | None
) -> web.StreamResponse:
    fronted, settings, metrics = request.app[FRONTED], request.app[FRONTED].settings, request.app[METRICS]
    route = "chat" if kind == "chat" else "completions"
    try:
        info = fronted.serving(req.model)
        body = generation_body(
            req, n_vocab=info.n_vocab, n_ctx=info.n_ctx, default_max_tokens=settings.default_max_tokens
        )
        if kind == "chat":
            await _no_control_tokens(fronted, body["messages"])
        lease = fronted.lease(request.headers.get(CACHE_SALT_HEADER, ""))
    except ApiError as exc:
        metrics.requests.labels(route, "busy" if exc.status == 503 else "rejected").inc()
        raise
    body["id_slot"], body["cache_prompt"] = lease.slot, lease.warm
    request_id = (
        request.headers.get(REQUEST_ID_HEADER) or f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    )
    top = req.logprob_count()
    answer = Answer(
        kind=kind,
        id=request_id,
        model=info.name,
        tools=isinstance(req, ChatCompletionRequest) and req.tool_setup() is not None,
        logprobs=[] if top is not None else None,
    )
    if trace is not None:
        trace.started(request_id, lease.slot)
    stop = asyncio.Event()
    runs = request.app[RUNS]
    runs[request_id] = stop
    generation = _Generation(request, fronted, kind, body, answer, stop, top=top or 0)
    outcome = "error"
    try:
        response = await (generation.stream(req.include_usage) if req.stream else generation.whole())
        outcome = "cancelled" if generation.finish_reason == "cancelled" else "ok"
        return response
    except ApiError as exc:
        outcome = "rejected" if exc.status < 500 else "error"
        raise
    except (ConnectionError, asyncio.CancelledError):
        outcome = "cancelled"
        raise
    finally:
        if runs.get(request_id) is stop:
            del runs[request_id]
        fronted.release(lease)  # the connection to llama-server is closed by now: its slot is free
        metrics.requests.labels(route, outcome).inc()
        if generation.opened:
            result = generation.result()
            metrics.observe_generation(
                result.prompt_tokens, result.completion_tokens, result.seconds, result.cached_tokens
            )
            if trace is not None:
                trace.generated(result)


async def _no_control_tokens(fronted: Fronted, messages: list[dict[str, str]]) -> None:
    """A 400 when a message spells one of the model's control tokens (`<|im_end|>` …): llama-server reads the
    rendered chat with them parsed, so such a message could close its own turn and write another's. Found by
    tokenizing the messages' text with and without them parsed (llama-server's `/tokenize`): only control tokens
    tell the two apart."""
    text = "\n".join(m["content"] for m in messages)  # no control token spells a line break
    if not text:
        return
    tokens = []
    for parse_special in (False, True):
        try:
            answer = await fronted.client.post_json("/tokenize", {"content": text, "parse_special": parse_special})
        except UpstreamError as exc:
            if isinstance(exc, Unreachable):
                fronted.down(exc)
            raise upstream_refusal(exc.status, "chat", exc.type, exc.message, url=fronted.client.url) from exc
        tokens.append(answer.get("tokens"))
    if tokens[0] != tokens[1]:
        raise ApiError(
            400,
            "a message spells one of the model's control tokens (such as the end of a turn): this node's "
            "llama-server would read it as that token, not as text; remove it from the message",
            param="messages",
            code="invalid_value",
        )


_QUIET = object()  # no chunk came within a poll: time to look for the client, the cancel and the keepalive


class _Generation:
    """One request's generation on llama-server, tied to its HTTP request: llama-server's chunks gathered into
    the answer, stopped when the router cancels it (`stop`) or the client goes, kept alive while it works."""

    def __init__(
        self,
        request: web.Request,
        fronted: Fronted,
        kind: str,
        body: dict[str, Any],
        answer: Answer,
        stop: asyncio.Event,
        *,
        top: int,
    ) -> None:
        self.request = request
        self.fronted = fronted
        self.path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        self.body = body
        self.answer = answer
        self.stop = stop
        self.top = top
        self.keepalive = _keepalive(request)
        self.opened = False
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = answer.logprobs if answer.logprobs is not None else []
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.phases_ms: tuple[float, float] | None = None  # llama-server's prompt and generation times so far
        self.phases_seen_ns = 0  # when they were told (epoch ns)
        self.ended_on_eog = False  # llama-server said it stopped on an end-of-generation token
        self.progress = 0  # chunks llama-server sent: it works
        self._told = 0
        self._began = time.monotonic()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._exits = AsyncExitStack()
        self._reader: asyncio.Task[None] | None = None

    # --- llama-server's side ---

    async def _open(self) -> None:
        """Send the request; ApiError if llama-server refuses it (nothing has gone to the client yet)."""
        client = self.fronted.client
        try:
            events = await self._exits.enter_async_context(client.stream(self.path, self.body))
        except UpstreamError as exc:
            if isinstance(exc, Unreachable):
                self.fronted.down(exc)
            raise upstream_refusal(exc.status, self._kind, exc.type, exc.message, url=client.url) from exc
        self.opened = True

        async def read() -> None:
            try:
                async for event in events:
                    self._queue.put_nowait(event)
                self._queue.put_nowait(None)
            except UpstreamError as exc:
                self._queue.put_nowait(exc)

        self._reader = asyncio.create_task(read(), name="llama-server stream")

    @property
    def _kind(self) -> str:
        return "chat" if self.path.endswith("/chat/completions") else "completion"

    async def _close(self) -> None:
        """Stop reading and close the connection (llama-server then stops generating and frees the slot)."""
        if self._reader is not None:
            self._reader.cancel()
            with suppress(asyncio.CancelledError):
                await self._reader
        await self._exits.aclose()

    async def _next(self) -> Chunk | object | None:
        """The next chunk, _QUIET after a poll without one, None at the end (llama-server's, or a stop's). Raises
        UpstreamError when llama-server fails or goes away mid-answer."""
        if self.stop.is_set() or self._client_gone():
            self.stop.set()
            await self._close()
            while not self._queue.empty():  # what came before the stop is part of the answer
                item = self._queue.get_nowait()
                if isinstance(item, dict):
                    self._absorb(item)
            self.finish_reason = "cancelled"
            return None
        if self._queue.empty():
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=min(CLIENT_POLL_SECONDS, self.keepalive))
            except TimeoutError:
                return _QUIET
        else:
            item = self._queue.get_nowait()  # the common case while tokens flow: no timer per token
        if isinstance(item, UpstreamError):
            raise item
        if item is None:
            return None
        return self._absorb(item)

    def _absorb(self, event: dict[str, Any]) -> Chunk:
        self.progress += 1
        chunk = read_chunk(event, top=self.top)
        if chunk.counts is not None:
            self.prompt_tokens, self.cached_tokens, self.completion_tokens = chunk.counts
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.phases_ms is not None:
            self.phases_ms, self.phases_seen_ns = chunk.phases_ms, time.time_ns()
        self.ended_on_eog = self.ended_on_eog or chunk.ended_on_eog
        self.pieces.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        return chunk

    def result(self) -> GenerationResult:
        """What was generated and its tokens: llama-server's `usage` when it finished, else the counts of its last
        chunk (a generation stopped halfway); less the end-of-generation token when it ended on one, which
        llama-server counts and the other kind of node does not (docs/node.md#exact-usage)."""
        prompt, cached, completion = self.prompt_tokens, self.cached_tokens, self.completion_tokens
        usage = self.usage
        if usage is not None and self.finish_reason != "cancelled":
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else cached
            if self.ended_on_eog:
                completion = max(completion - 1, 0)
        admitted_ns = first_token_ns = 0
        if self.phases_ms is not None:  # llama-server's phases, counted back from when it last told them
            prompt_ms, predicted_ms = self.phases_ms
            first_token_ns = self.phases_seen_ns - int(predicted_ms * 1e6)
            admitted_ns = first_token_ns - int(prompt_ms * 1e6)
        return GenerationResult(
            text="".join(self.pieces),
            finish_reason=self.finish_reason or "stop",
            prompt_tokens=prompt,
            completion_tokens=completion,
            seconds=time.monotonic() - self._began,
            cached_tokens=cached,
            admitted_ns=admitted_ns,
            first_token_ns=first_token_ns,
        )

    def _usage(self, result: GenerationResult) -> Usage:
        return Usage.of(result.prompt_tokens, result.completion_tokens, cached_tokens=result.cached_tokens)

    def _failed(self, exc: UpstreamError) -> str:
        """What to tell of llama-server failing mid-answer (and take the node out of work if it is gone)."""
        log.error("llama-server failed a generation: %s", exc.message)
        if exc.status == 0:  # the stream broke: llama-server died, or is going
            self.fronted.down(Unreachable(exc.message))
        return f"llama-server failed: {exc.message}"

    # --- the client's side ---

    def _client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def _news(self) -> bool:
        """Whether llama-server sent anything since the client last heard from us (only work is told)."""
        if self.progress != self._told:
            self._told = self.progress
            return True
        return False

    async def whole(self) -> web.StreamResponse:
        await self._open()
        loop = asyncio.get_running_loop()
        response: web.StreamResponse | None = None
        beat = loop.time() + self.keepalive
        try:
            while (chunk := await self._next()) is not None:
                if chunk is not _QUIET or loop.time() < beat:
                    continue
                beat = loop.time() + self.keepalive
                if self._news():
                    # JSON allows whitespace before the value: the body is a valid answer whatever it starts with.
                    if response is None:
                        response = web.StreamResponse(headers={REQUEST_ID_HEADER: self.answer.id})
                        response.content_type = "application/json"
                        await response.prepare(self.request)
                    await response.write(b" ")
        except UpstreamError as exc:
            message = self._failed(exc)
            if response is None:
                raise ApiError(502, message, type="server_error", code="upstream_error") from exc
            await response.write(jsontext.dumps(error_body(message, type="server_error")))
            await response.write_eof()
            return response
        finally:
            await self._close()
        result = self.result()
        body = self.answer.body(result, self._usage(result))
        if response is None:
            return json_response(body, headers={REQUEST_ID_HEADER: self.answer.id})
        await response.write(jsontext.dumps(body))
        await response.write_eof()
        return response

    async def stream(self, include_usage: bool) -> web.StreamResponse:
        await self._open()  # before the status line: llama-server's refusal is the client's 4xx, not an event
        answer = self.answer
        try:
            sse = await SseWriter.open(self.request, {REQUEST_ID_HEADER: answer.id})
            for opening in answer.opening():
                await sse.send(opening)
            try:
                while (chunk := await self._next()) is not None:
                    if chunk is _QUIET:
                        if self._news():
                            await sse.comment("keep-alive")
                        continue
                    assert isinstance(chunk, Chunk)
                    if not chunk.text:
                        continue  # the role, the prompt's progress, the finish: their tokens, if any, go later
                    # llama-server's `timings.cache_n` (timings_per_token): the prompt tokens its slot's cache held.
                    counts = TokenCounts(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
                    for piece in answer.piece(chunk.text, len(self.logprobs)):
                        # What a router charges for when the stream is cut before its usage (see wire.node).
                        await sse.send(with_counts(piece, counts))
            except UpstreamError as exc:
                await sse.send(error_body(self._failed(exc), type="server_error"))
                await sse.done()
                return sse.response
            if self.stop.is_set() and self._client_gone():
                raise ConnectionResetError("the client closed the stream")
            result = self.result()
            counts = TokenCounts(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
            for closing in answer.closing(result):
                if (
                    closing["choices"]
                    and closing["choices"][0]["delta" if "delta" in closing["choices"][0] else "text"]
                ):
                    with_counts(closing, counts)  # a tool call held back until now is a delivery too
                await sse.send(closing)
            if include_usage:
                await sse.send(answer.usage(self._usage(result)))
            await sse.done()
            return sse.response
        finally:
            await self._close()


def _keepalive(request: web.Request) -> float:
    try:
        value = float(request.headers.get(KEEPALIVE_HEADER, DEFAULT_KEEPALIVE))
    except ValueError:
        value = DEFAULT_KEEPALIVE
    return min(max(value, 0.05), 30.0) if value == value else DEFAULT_KEEPALIVE


def create_app(settings: NodeSettings, *, tracing: Tracing | None = None) -> web.Application:
    """A node in front of llama-server (`settings.llama_server` or `settings.llama_server_bin`), its generations
    traced as the other node's (`tracing`, default: what the OTEL_* variables ask for). ValueError when the flags
    for a supervised llama-server take one the node gives it."""

    @web.middleware
    async def herd_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            require_bearer(request, settings.herd_token, what="herd token")
        return await handler(request)

    app = web.Application(
        middlewares=[error_middleware_for(http_error), deadline_middleware(settings.request_limits), herd_auth],
        client_max_size=settings.max_body_bytes,
    )
    fronted = Fronted(settings)
    app[FRONTED] = fronted
    app[RUNS] = {}
    app[METRICS] = NodeMetrics(lambda: fronted.busy)
    app.add_routes(routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await fronted.start()
        await fronted.check()  # a llama-server that is up already serves at once
        tasks = [asyncio.create_task(fronted.watch(), name="llama-server watch")]
        if settings.router:
            tasks.append(asyncio.create_task(keep_membership(settings, fronted), name="membership"))
        yield
        for task in tasks:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        await fronted.close()

    app.on_startup.append(count_connections(METRICS))
    app.cleanup_ctx.append(lifecycle)
    setup_tracing(app, tracing)
    return app
