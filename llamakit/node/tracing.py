"""A node's spans of one generation, under the router's node call when its request carried a `traceparent`:

    chat smollm2                   SERVER  the request at the node, from its arrival to its last byte
    ├── llamakit.node.queue                tokenizing, waiting for a slot and for the engine to take it in
    ├── llamakit.node.prefill              the prompt's decoding (less what the slot's cache held)
    └── llamakit.node.decode               the first token to the last

The engine notes when it took the request in and when it sampled the first token (GenerationResult); the
phases become spans once the generation ends, from those times, so nothing is traced on the decode thread.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from llamakit.telemetry import Tracing, extract_context

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from llamakit.node.engine import GenerationResult

__all__ = ["TRACING", "GenerationTrace"]

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
