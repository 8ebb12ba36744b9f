"""A node's spans of one generation, under the router's node call when its request carried a `traceparent`:

    chat smollm2                   SERVER  the request at the node, from its arrival to its last byte
    ├── llamakit.node.queue                tokenizing, waiting for a slot and for the engine to take it in
    ├── llamakit.node.prefill              the prompt's decoding (less what the slot's cache held)
    └── llamakit.node.decode               the first token to the last

The engine notes when it took the request in and when it sampled the first token (GenerationResult); the
phases become spans once the generation ends, from those times, so nothing is traced on the decode thread. A node
in front of llama-server has the same spans, its phases from llama-server's own `timings` (`prompt_ms`,
`predicted_ms`): its queue is the node's hop to llama-server and llama-server's wait for a slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from llamakit.node.errors import NodeError
from llamakit.node.http_errors import status_of
from llamakit.telemetry import Tracing, extract_context
from llamakit.wire.errors import ApiError

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from llamakit.node.engine import GenerationResult

__all__ = ["TRACING", "GenerationTrace", "setup_tracing", "traced_generation"]

TRACING = web.AppKey("tracing", Tracing)  # set when the OTEL_* variables ask for traces
PROVIDER = "llamakit"  # gen_ai.provider.name, as the router's spans say it


class GenerationTrace:
    """The span of one generation request at the node and, once it ends, its phases'."""

    def __init__(self, tracing: Tracing, headers: Mapping[str, str], *, operation: str, model: str, node: str) -> None:
        from opentelemetry import trace

        self.tracer = tracing.tracer
        self.arrived_ns = time.time_ns()
        self.span: Span = self.tracer.start_span(
            f"{operation} {model}",
            context=extract_context(headers),
            kind=trace.SpanKind.SERVER,
            start_time=self.arrived_ns,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.request.model": model,
                "llamakit.node": node,
            },
        )
        self._context = trace.set_span_in_context(self.span)

    def started(self, request_id: str, slot: int) -> None:
        self.span.set_attributes({"gen_ai.response.id": request_id, "llamakit.slot": slot})

    def generated(self, result: GenerationResult) -> None:
        """The generation ended: its phases as spans, its tokens on the request's span."""
        ended = time.time_ns()
        admitted = result.admitted_ns or self.arrived_ns
        first = result.first_token_ns or ended
        self._phase("llamakit.node.queue", self.arrived_ns, admitted, {})
        prompt = {"gen_ai.usage.input_tokens": result.prompt_tokens, "llamakit.cached_tokens": result.cached_tokens}
        self._phase("llamakit.node.prefill", admitted, first, prompt)
        if result.first_token_ns:
            self._phase("llamakit.node.decode", first, ended, {"gen_ai.usage.output_tokens": result.completion_tokens})
        self.span.set_attributes(
            {
                "gen_ai.usage.input_tokens": result.prompt_tokens,
                "gen_ai.usage.output_tokens": result.completion_tokens,
                "gen_ai.usage.cache_read.input_tokens": result.cached_tokens,
                "gen_ai.response.finish_reasons": (result.finish_reason,),
            }
        )

    def _phase(self, name: str, start: int, end: int, attributes: dict[str, int]) -> None:
        span = self.tracer.start_span(name, context=self._context, start_time=start, attributes=attributes)
        span.end(end_time=max(end, start))

    def end(self, status: int, error: BaseException | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("http.response.status_code", status)
        if error is not None or status >= 500:
            kind = type(error).__name__ if error is not None else str(status)
            self.span.set_attribute("error.type", kind)
            self.span.set_status(Status(StatusCode.ERROR, str(error) if error is not None else None))
        self.span.end()


def setup_tracing(app: web.Application, tracing: Tracing | None) -> None:
    """Trace `app`'s generations with `tracing` (default: what the OTEL_* variables ask for, see
    llamakit.telemetry), and send the spans still batched when it stops."""
    tracing = tracing or Tracing.from_env("llamakit-node")
    if tracing is None:
        return
    app[TRACING] = tracing

    async def flush_traces(app: web.Application) -> None:
        await asyncio.to_thread(tracing.shutdown)

    app.on_cleanup.append(flush_traces)


async def traced_generation(
    request: web.Request,
    generate: Callable[[GenerationTrace | None], Awaitable[web.StreamResponse]],
    *,
    kind: str,
    model: str,
    node: str,
) -> web.StreamResponse:
    """`generate(trace)` for a `kind` ("chat" or "text") request, under its span when the app traces (else with
    None): the span ends with the answer's status, or the one its error is answered with."""
    tracing = request.app.get(TRACING)
    if tracing is None:
        return await generate(None)
    operation = "chat" if kind == "chat" else "text_completion"
    trace = GenerationTrace(tracing, request.headers, operation=operation, model=model, node=node)
    status, error = 500, None
    try:
        response = await generate(trace)
        status = response.status
        return response
    except (ApiError, NodeError) as exc:
        status = status_of(exc)
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        trace.end(status, error)
