"""One paid request's time at the router: its OpenTelemetry spans, when tracing is on (llamakit.telemetry), and
the time it spent waiting on others (the bid queue, its node), from which the router's own overhead comes
(`X-Llamakit-Overhead-Ms`, the usage record's `overhead_ms`).

The spans of a request, under the caller's trace when it sent a W3C `traceparent`:

    chat smollm2                        SERVER  the request, from its arrival to its answer (GenAI attributes)
    ├── llamakit.authenticate                   the API key
    ├── llamakit.limits                         the key's model list, rates and concurrency
    ├── llamakit.hold                           the hold in the ledger
    ├── llamakit.dispatch                       a node slot (one per attempt)
    │   └── llamakit.queue                      its wait in the bid queue, when it had to wait
    ├── chat smollm2                    CLIENT  the node call: events first_token, last_token; the node's own
    │                                           spans (queue, prefill, decode) under it, by `traceparent`
    └── llamakit.settle                         the charge (or the refund) in the ledger

Attributes follow OpenTelemetry's GenAI conventions (`gen_ai.request.model`, `gen_ai.usage.input_tokens` …)
plus llamakit's own (`llamakit.bid`, `llamakit.credits.held`, `llamakit.credits.charged`, `llamakit.node`,
`llamakit.account.id`); never an API key or a prompt's text. After model fallbacks the request's span keeps the
model asked (its name, `gen_ai.request.model`) and says the one that answered (`gen_ai.response.model`, record.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

from llamakit.telemetry import Tracing, extract_context, inject_context

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["OPERATIONS", "PROVIDER", "AttributeValue", "Attributes", "RequestTrace", "operation_of"]

PROVIDER: Final = "llamakit"  # gen_ai.provider.name
# gen_ai.operation.name of each node route
OPERATIONS: Final = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
_NO_SPAN: Final[AbstractContextManager[None]] = nullcontext()

AttributeValue = str | int | float | bool | Sequence[str]
Attributes = Mapping[str, AttributeValue]


def operation_of(path: str) -> str:
    """The GenAI operation of a node route: chat, text_completion or embeddings."""
    return OPERATIONS.get(path, "chat")


class RequestTrace:
    """A paid request's clock (`started`, `waited`) and, with tracing on, its spans (`root`, the node `call`).

    Every method is a no-op costing one attribute test when tracing is off (`on` False)."""

    __slots__ = ("_call_ended", "_context", "_token", "call", "root", "started", "tracer", "waited")

    def __init__(
        self, tracing: Tracing | None = None, *, headers: Mapping[str, str] | None = None, name: str = ""
    ) -> None:
        self.started = time.monotonic()  # when the router began on the request
        self.waited = 0.0  # seconds it waited in the queue or on its node: not the router's own time
        self.tracer = tracing.tracer if tracing is not None else None
        self.root: Span | None = None
        self.call: Span | None = None  # the node call under way
        self._call_ended = False
        self._context: Any = None
        self._token: object = None
        if self.tracer is not None:
            from opentelemetry import context, trace

            self.root = self.tracer.start_span(name, context=extract_context(headers or {}), kind=trace.SpanKind.SERVER)
            self._context = trace.set_span_in_context(self.root)
            # Current while the request is served: what it logs carries its trace id (llamakit.logs).
            self._token = context.attach(self._context)

    @property
    def on(self) -> bool:
        return self.root is not None

    def overhead_ms(self) -> float:
        """Milliseconds the router spent on the request so far, its waits on the queue and on its node excluded."""
        return round(max(time.monotonic() - self.started - self.waited, 0.0) * 1000, 3)

    def set(self, attributes: Attributes) -> None:
        """Attributes of the request's span."""
        if self.root is not None:
            self.root.set_attributes(attributes)

    def rename(self, name: str) -> None:
        if self.root is not None:
            self.root.update_name(name)

    def span(self, name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span | None]:
        """A child of the request's span around a `with` block; an exception in it marks the span an error."""
        if self.root is None:
            return _NO_SPAN
        return self._child(name, attributes)

    @contextmanager
    def _child(self, name: str, attributes: Attributes | None) -> Iterator[Span | None]:
        assert self.tracer is not None
        # Under the span current in this task: the request's, or the one this block runs in (dispatch → queue).
        with self.tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def begin_call(self, name: str, attributes: Attributes) -> dict[str, str] | None:
        """Start the span of a call to a node (GenAI's CLIENT inference span); returns the headers that carry it
        to the node (`traceparent`), so the node's spans sit under it. None when tracing is off."""
        if self.tracer is None:
            return None
        from opentelemetry import trace

        self.end_call()  # a failed attempt's, if still open
        self.call = self.tracer.start_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes)
        self._call_ended = False
        headers: dict[str, str] = {}
        inject_context(headers, trace.set_span_in_context(self.call))
        return headers

    def call_event(self, name: str, attributes: Attributes | None = None, *, at_ns: int | None = None) -> None:
        """An event on the node call (first token, last token); `at_ns` is epoch nanoseconds (default: now)."""
        if self.call is not None and not self._call_ended:
            self.call.add_event(name, attributes, timestamp=at_ns)

    def end_call(self, attributes: Attributes | None = None, *, error: BaseException | None = None) -> None:
        """End the node call's span (once), with `attributes`, as an error when `error` is given."""
        call = self.call
        if call is None or self._call_ended:
            return
        self._call_ended = True
        if attributes:
            call.set_attributes(attributes)
        if error is not None:
            _fail(call, type(error).__name__, str(error))
        call.end()

    def finish(self, status: int, code: str | None = None) -> None:
        """End the request's span with the HTTP status the client got (and the error code of an error)."""
        root = self.root
        if root is None:
            return
        from opentelemetry import context

        self.end_call()
        root.set_attribute("http.response.status_code", status)
        if status >= 400:
            root.set_attribute("error.type", code or str(status))
            if status >= 500:  # a 4xx is the client's, not the server's error (OpenTelemetry's HTTP conventions)
                _fail(root, code or str(status), None)
        root.end()
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]
            self._token = None


def _fail(span: Span, kind: str, message: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, message))
