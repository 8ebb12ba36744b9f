"""One trace across the SDK, the router and a real node, through a real OTLP/HTTP endpoint.

The router and the node run as processes, as deployed, with only `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a
small receiver in this test, which decodes what they send with `opentelemetry-proto`. The SDK's call runs under
a span of the test's own, exported to the same receiver; the paid streamed request must come back as one trace:
the client's span, the router's request span and its children, the node's span and its queue, prefill and
decode, each under the span that called it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from llamakit.sdk import Client
from tests.support.ports import free_port
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]
HERD_TOKEN = "otlp-herd-token"
ADMIN_KEY = "otlp-admin-key"


@dataclass
class Received:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    start: int
    end: int
    attributes: dict[str, object]
    events: list[str]

    @property
    def ms(self) -> float:
        return (self.end - self.start) / 1e6


@dataclass
class Receiver:
    """An OTLP/HTTP trace endpoint (POST /v1/traces, protobuf) that keeps every span it is sent."""

    spans: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        return app

    async def export(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    self.spans.append(
                        Received(
                            resource.get("service.name", "?"), span.name, span.kind, span.trace_id.hex(),
                            span.span_id.hex(), span.parent_span_id.hex(), span.start_time_unix_nano,
                            span.end_time_unix_nano, attributes, [e.name for e in span.events],
                        )
                    )  # fmt: skip
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None


def _start(module: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m <module…>` with `env`, its output in `log`."""
    return subprocess.Popen([sys.executable, "-m", *module], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)  # fmt: skip


@dataclass
class TracedHerd:
    receiver: Receiver
    endpoint: str  # the receiver's URL: OTEL_EXPORTER_OTLP_ENDPOINT
    router: str
    router_log: Path
    api_key: str


@pytest.fixture(scope="module")
async def traced_herd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TracedHerd]:
    tmp = tmp_path_factory.mktemp("otlp")
    receiver = Receiver()
    endpoint = await RunningServer(receiver.app()).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    # All an operator sets; the batch delay only makes the test quicker.
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint.url, OTEL_BSP_SCHEDULE_DELAY="100", LLAMAKIT_HERD_TOKEN=HERD_TOKEN)
    node_port, router_port = free_port(), free_port()
    node = _start(
        ["llamakit.node", "--port", str(node_port), "--slots", "1", "--ctx-size", "1024", "--threads", "2",
         "--name", "otlp-node"],
        env, tmp / "node.log",
    )  # fmt: skip
    router_log = tmp / "router.log"
    router = _start(
        ["llamakit.router", "--port", str(router_port), "--db", str(tmp / "ledger.db"),
         "--node", f"http://127.0.0.1:{node_port}", "--admin-key", ADMIN_KEY, "--health-interval", "0.2",
         "--log-format", "json", "--log-requests", "yes"],
        env, router_log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{router_port}"
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            for _ in range(1200):
                assert node.poll() is None, (tmp / "node.log").read_text()
                assert router.poll() is None, router_log.read_text()
                try:
                    if (await admin.get("/health")).json()["ready"] == 1:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            created = await admin.post("/admin/accounts", json={"name": "traced", "deposit": 1_000_000})
            yield TracedHerd(receiver, endpoint.url, url, router_log, created.json()["api_key"])
    finally:
        for proc in (router, node):
            proc.send_signal(signal.SIGINT)
        for proc in (router, node):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        await endpoint.stop()


async def test_one_trace_across_the_sdk_the_router_and_the_node(traced_herd: TracedHerd) -> None:
    receiver = traced_herd.receiver
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-client"}))
    exporter = OTLPSpanExporter(endpoint=f"{traced_herd.endpoint}/v1/traces")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    def call() -> tuple[str, str]:
        with (
            tracer.start_as_current_span("client call") as span,
            Client(url=traced_herd.router, api_key=traced_herd.api_key, usage_log=None) as client,
        ):
            stream = client.stream_chat([{"role": "user", "content": "Say hello."}], max_tokens=12)
            text = "".join(stream)
            assert text and stream.result.usage.completion_tokens > 0
            return f"{span.get_span_context().trace_id:032x}", stream.result.request_id or ""

    trace_id, request_id = await asyncio.to_thread(call)
    provider.shutdown()

    def spans() -> list[Received]:
        return [s for s in receiver.spans if s.trace_id == trace_id]

    wanted = {"llamakit.node.decode", "llamakit.settle", "client call"}
    for _ in range(600):
        names = {s.name for s in spans()}
        roots = [s for s in spans() if s.service == "llamakit-router" and s.kind == 2]  # SERVER
        if wanted <= names and roots:
            break
        await asyncio.sleep(0.05)
    trace = spans()
    by_id = {s.span_id: s for s in trace}
    assert {s.service for s in trace} == {"sdk-client", "llamakit-router", "llamakit-node"}
    (client_span,) = [s for s in trace if s.name == "client call"]
    (router_root,) = [s for s in trace if s.service == "llamakit-router" and s.kind == 2]
    (node_call,) = [s for s in trace if s.service == "llamakit-router" and s.kind == 3]  # CLIENT
    (node_root,) = [s for s in trace if s.service == "llamakit-node" and s.kind == 2]
    assert router_root.parent == client_span.span_id
    assert node_call.parent == router_root.span_id and node_root.parent == node_call.span_id
    assert node_call.events == ["llamakit.first_token", "llamakit.last_token"]
    assert router_root.attributes["gen_ai.response.id"] == request_id
    assert node_root.attributes["gen_ai.response.id"] == request_id
    assert {s.name for s in trace if s.parent == node_root.span_id} == {
        "llamakit.node.queue",
        "llamakit.node.prefill",
        "llamakit.node.decode",
    }
    assert {s.name for s in trace if s.parent == router_root.span_id} >= {
        "llamakit.authenticate", "llamakit.limits", "llamakit.hold", "llamakit.dispatch", "llamakit.settle",
    }  # fmt: skip
    assert router_root.attributes["gen_ai.usage.output_tokens"] == node_root.attributes["gen_ai.usage.output_tokens"]
    assert all(by_id.get(s.parent) is not None for s in trace if s is not client_span)
    print("\n" + _tree(trace, client_span))
    # The router's JSON log line of the same request carries the trace id.
    lines = [json.loads(line) for line in traced_herd.router_log.read_text().splitlines() if line.startswith("{")]
    (line,) = [entry for entry in lines if entry.get("request_id") == request_id]
    assert line["trace_id"] == trace_id and line["status"] == "ok" and line["node"] == "otlp-node"
    print(json.dumps(line))


def _tree(spans: list[Received], root: Received, depth: int = 0) -> str:
    """The trace as an indented tree: service, span, duration in ms, events."""
    events = f"  events: {', '.join(root.events)}" if root.events else ""
    line = f"{'    ' * depth}{root.name}  [{root.service}]  {root.ms:.2f} ms{events}"
    children = sorted((s for s in spans if s.parent == root.span_id), key=lambda s: s.start)
    return "\n".join([line, *(_tree(spans, child, depth + 1) for child in children)])
