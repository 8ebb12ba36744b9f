"""llamakit.telemetry: traces are on only when OpenTelemetry's own variables ask for them."""

from __future__ import annotations

import pytest

from llamakit.telemetry import Tracing, TracingUnavailable, tracing_wanted


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ],
)
def test_which_exporters_the_variables_ask_for(env: dict[str, str], wanted: list[str]) -> None:
    assert tracing_wanted(env) == wanted


def test_an_endpoint_is_all_an_operator_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    tracing = Tracing.from_env("llamakit-router")
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "llamakit-router"
        processors = tracing.provider._active_span_processor._span_processors
        assert [type(p._batch_processor._exporter) for p in processors] == [OTLPSpanExporter]  # type: ignore[attr-defined]
    finally:
        tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu-1")
    tracing = Tracing.from_env("llamakit-router")
    assert tracing is not None and tracing.provider.resource.attributes["service.name"] == "router-eu-1"
    tracing.shutdown()


def test_what_cannot_be_sent_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(TracingUnavailable, match="http/protobuf"):
        Tracing.from_env("llamakit-router")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(TracingUnavailable, match="'zipkin'"):
        Tracing.from_env("llamakit-router")
