"""OpenTelemetry traces of the router and the node, set up from OpenTelemetry's own `OTEL_*` variables alone.

Tracing is on when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318`, or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`), and
`OTEL_SDK_DISABLED` is not `true`. Off, nothing of OpenTelemetry is imported and a request costs a few no-op
calls. On, spans go out over OTLP/HTTP (protobuf) in batches; the exporter, the batch processor, the sampler
and the resource read their own variables (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`,
`OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` …), and `OTEL_PROPAGATORS` says how a
trace's context travels between processes (W3C `traceparent` by default).

Each app has a tracer provider of its own (`Tracing`), not the process-global one: two apps in one process (the
tests) keep their spans apart, and nothing else in the process is traced by accident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

__all__ = ["Tracing", "TracingUnavailable", "extract_context", "inject_context", "tracing_wanted"]

OTEL_EXTRA = "pip install 'llamakit[otel]'"


class TracingUnavailable(ValueError):
    """The `OTEL_*` variables ask for traces this installation cannot send (the SDK missing, gRPC asked for)."""


def tracing_wanted(env: Mapping[str, str] | None = None) -> list[str]:
    """The span exporters the `OTEL_*` variables in `env` (default: the process's) ask for; [] for none."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not named:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    return [] if named == ["none"] else named


def _llamakit_version() -> str:
    try:
        return version("llamakit")
    except PackageNotFoundError:
        return "0"


class Tracing:
    """A tracer provider for one app and its tracer (`tracer`); `shutdown()` sends what is still batched."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("llamakit", _llamakit_version())

    @classmethod
    def from_env(cls, service: str) -> Tracing | None:
        """The tracing the process's `OTEL_*` variables ask for, named `service` unless OTEL_SERVICE_NAME (or
        OTEL_RESOURCE_ATTRIBUTES' service.name) names it; None when they ask for none. TracingUnavailable when
        the OpenTelemetry SDK is not installed, or they ask for an exporter llamakit does not ship."""
        wanted = tracing_wanted()
        if not wanted:
            return None
        try:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError as exc:
            raise TracingUnavailable(
                f"OTEL_* variables ask for traces ({', '.join(wanted)}), but the OpenTelemetry SDK is not "
                f"installed: {OTEL_EXTRA}, or unset OTEL_EXPORTER_OTLP_ENDPOINT"
            ) from exc
        exporters: list[SpanExporter] = []
        for name in wanted:
            if name == "otlp":
                exporters.append(_otlp_exporter())
            elif name == "console":
                exporters.append(ConsoleSpanExporter())
            else:
                raise TracingUnavailable(
                    f"OTEL_TRACES_EXPORTER names {name!r}; llamakit sends traces with 'otlp' (OTLP/HTTP) or "
                    "'console' (or 'none': no traces)"
                )
        tracing = cls(_provider(service))
        for exporter in exporters:
            tracing.provider.add_span_processor(BatchSpanProcessor(exporter))
        return tracing

    @classmethod
    def to_exporter(cls, exporter: SpanExporter, service: str) -> Tracing:
        """Tracing that hands every span to `exporter` as it ends (the tests' in-memory exporter)."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        tracing = cls(_provider(service))
        tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
        return tracing

    def shutdown(self) -> None:
        """Send the spans still batched and stop (at the app's cleanup)."""
        self.provider.shutdown()


def _provider(service: str) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; its own attributes would win over them.
    return TracerProvider(resource=Resource.create({} if named else {"service.name": service}))


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    )
    if protocol.strip() not in ("", "http/protobuf"):
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; llamakit sends OTLP over HTTP: set it to "
            "'http/protobuf' (or unset it) and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's port 4318"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingUnavailable(f"the OTLP/HTTP exporter is not installed: {OTEL_EXTRA}") from exc
    exporter: SpanExporter = OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*
    return exporter


def extract_context(headers: Mapping[str, str]) -> Context:
    """The trace context a caller sent in `headers` (W3C `traceparent`, or what OTEL_PROPAGATORS says)."""
    from opentelemetry import propagate

    return propagate.extract(headers)


def inject_context(headers: MutableMapping[str, Any], context: Context) -> None:
    """Write `context` into outgoing `headers` (`traceparent`, `tracestate`), so the callee's spans join it."""
    from opentelemetry import propagate

    propagate.inject(headers, context=context)
