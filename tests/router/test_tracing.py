"""A paid request's OpenTelemetry trace (the SDK's in-memory exporter) and the router's overhead on its answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llamakit.telemetry import Tracing
from llamakit.wire.headers import OVERHEAD_HEADER, PASSED_OVER_HEADER, REQUEST_ID_HEADER
from tests.router.test_model_fallbacks import ASK, two_models
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
PROMPT = "a prompt nobody else may read"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}


async def traced(herd: Herd, node: FakeNode) -> tuple[InMemorySpanExporter, httpx.AsyncClient]:
    exporter = InMemorySpanExporter()
    await herd.add_node(node)
    await herd.start(tracing=Tracing.to_exporter(exporter, "llamakit-router"))
    return exporter, await herd.account("alice", 1_000_000)


async def finished_trace(exporter: InMemorySpanExporter, request_id: str) -> list[ReadableSpan]:
    """The spans of the request `request_id`, once its own span has ended (just after its last byte went out)."""
    for _ in range(500):
        spans = exporter.get_finished_spans()
        roots = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("gen_ai.response.id") == request_id]
        if roots:
            trace_id = roots[0].context.trace_id
            return [s for s in spans if s.context.trace_id == trace_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no finished span for {request_id}: {[s.name for s in exporter.get_finished_spans()]}")


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {f"{s.name}/{s.kind.name}": s for s in spans}


def stream_usage(text: str) -> dict[str, Any]:
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    usage: dict[str, Any] = events[-1]["usage"]
    return usage


async def test_a_streamed_request_is_one_trace_under_the_clients_span(herd: Herd) -> None:
    node = FakeNode("n1", script=Script(tokens=4))
    exporter, alice = await traced(herd, node)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await alice.post("/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT})
    assert resp.status_code == 200
    usage = stream_usage(resp.text)
    spans = await finished_trace(exporter, resp.headers[REQUEST_ID_HEADER])
    named = by_name(spans)
    assert set(named) == {
        "chat fake-model/SERVER",
        "llamakit.authenticate/INTERNAL",
        "llamakit.limits/INTERNAL",
        "llamakit.hold/INTERNAL",
        "llamakit.dispatch/INTERNAL",
        "chat fake-model/CLIENT",
        "llamakit.settle/INTERNAL",
    }
    root, call = named["chat fake-model/SERVER"], named["chat fake-model/CLIENT"]
    # Under the client's span, in the client's trace; every other span a child of the request's.
    assert root.context.trace_id == int(CLIENT_TRACE, 16)
    assert root.parent is not None and root.parent.span_id == int(CLIENT_SPAN, 16)
    for span in spans:
        if span is not root:
            assert span.parent is not None and span.parent.span_id == root.context.span_id, span.name
    # The node was asked under the node call's span: its own spans join the same trace.
    assert node.traceparents == [f"00-{CLIENT_TRACE}-{call.context.span_id:016x}-01"]
    assert [e.name for e in call.events] == ["llamakit.first_token", "llamakit.last_token"]
    assert call.attributes["server.address"] == "127.0.0.1" and call.attributes["llamakit.node"] == "n1"
    assert call.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    attributes = root.attributes
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "llamakit"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "fake-model"
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.response.id"] == resp.headers[REQUEST_ID_HEADER]
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["llamakit.credits.charged"] == usage["cost_credits"]
    assert attributes["llamakit.credits.held"] >= usage["cost_credits"]
    assert attributes["llamakit.bid"] == "1" and attributes["llamakit.node"] == "n1"
    assert attributes["llamakit.status"] == "ok" and attributes["http.response.status_code"] == 200
    account = (await alice.get("/v1/account")).json()
    assert attributes["llamakit.account.id"] == account["id"]
    # The header went out with the first byte; the span has the whole stream's, as the usage record has.
    assert 0 <= float(resp.headers[OVERHEAD_HEADER]) <= attributes["llamakit.overhead_ms"]
    # Never a key or a prompt: nothing a tenant sent is in any attribute or event.
    key = alice.headers["Authorization"].removeprefix("Bearer ")
    for span in spans:
        values = [str(v) for v in span.attributes.values()]
        values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        assert not any(PROMPT in v or key in v or key[:12] in v for v in values), span.name


async def test_a_whole_answer_tells_its_overhead_as_its_usage_record_does(herd: Herd) -> None:
    exporter, alice = await traced(herd, FakeNode("n1", script=Script(tokens=3)))
    resp = await alice.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    overhead = float(resp.headers[OVERHEAD_HEADER])
    request_id = resp.headers[REQUEST_ID_HEADER]
    (record,) = (await alice.get("/v1/account/usage")).json()["data"]
    assert record["request_id"] == request_id and record["overhead_ms"] == overhead
    assert 0 < overhead < resp.elapsed.total_seconds() * 1000  # part of what the client waited
    spans = await finished_trace(exporter, request_id)
    root = by_name(spans)["chat fake-model/SERVER"]
    assert root.attributes["llamakit.overhead_ms"] == overhead
    call = by_name(spans)["chat fake-model/CLIENT"]
    assert call.attributes["gen_ai.response.finish_reasons"] == ("length",)
    metrics = (await alice.get("/metrics")).text
    assert 'llamakit_router_overhead_seconds_count{model="fake-model"} 1.0' in metrics


async def test_a_request_that_waited_has_a_queue_span_and_no_wait_in_its_overhead(herd: Herd) -> None:
    gate = asyncio.Event()
    exporter, alice = await traced(herd, FakeNode("n1", slots=1, script=Script(tokens=2, gate=gate)))
    first = asyncio.ensure_future(alice.post("/v1/completions", json={"model": "fake-model", "prompt": "a"}))
    second = asyncio.ensure_future(alice.post("/v1/completions", json={"model": "fake-model", "prompt": "b"}))
    while (await alice.get("/v1/info")).json()["queue_length"] < 1:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # the second waits for the first's slot, held at the node
    gate.set()
    answers = await asyncio.gather(first, second)
    waited = max(answers, key=lambda r: float(r.headers["X-Llamakit-Queue-Ms"]))
    spans = by_name(await finished_trace(exporter, waited.headers[REQUEST_ID_HEADER]))
    queue, dispatch = spans["llamakit.queue/INTERNAL"], spans["llamakit.dispatch/INTERNAL"]
    assert queue.parent is not None and queue.parent.span_id == dispatch.context.span_id
    assert spans["text_completion fake-model/SERVER"].attributes["gen_ai.operation.name"] == "text_completion"
    # Half a second in the queue, none of it the router's own.
    assert float(waited.headers[OVERHEAD_HEADER]) < float(waited.headers["X-Llamakit-Queue-Ms"]) / 2


async def test_a_refused_request_ends_its_span_with_the_error(herd: Herd) -> None:
    exporter, alice = await traced(herd, FakeNode("n1"))
    resp = await alice.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"})
    assert resp.status_code == 404
    for _ in range(500):
        if exporter.get_finished_spans():
            break
        await asyncio.sleep(0.01)
    (root,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert root.attributes["http.response.status_code"] == 404
    assert root.attributes["error.type"] == "model_not_found"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_after_a_fallback_the_spans_say_which_model_answered(herd: Herd, stream: bool) -> None:
    # `big`'s node fails before the first token: `small`, the next of the request's models, serves it.
    exporter = InMemorySpanExporter()
    await two_models(herd, Script(fail_status=500), tracing=Tracing.to_exporter(exporter, "llamakit-router"))
    alice = await herd.account("alice", 1_000_000)
    resp = await alice.post("/v1/completions", json={**ASK, "models": ["big", "small"], "stream": stream})
    assert resp.status_code == 200 and resp.headers[PASSED_OVER_HEADER] == "big=no_node"
    spans = await finished_trace(exporter, resp.headers[REQUEST_ID_HEADER])
    named = by_name(spans)
    # The request's span: named after the model asked and keeping it; the model that answered is the response's.
    root = named["text_completion big/SERVER"].attributes
    assert root["gen_ai.request.model"] == "big" and root["gen_ai.response.model"] == "small"
    assert root["llamakit.node"] == "s1" and root["llamakit.passed_over"] == "big=no_node"
    # Each node call is the model it asked for: big's failed and answered nothing, small's answered.
    failed, served = named["text_completion big/CLIENT"], named["text_completion small/CLIENT"]
    assert failed.attributes["gen_ai.request.model"] == "big" and "gen_ai.response.model" not in failed.attributes
    assert failed.attributes["error.type"] == "NodeFailed"
    assert served.attributes["gen_ai.request.model"] == served.attributes["gen_ai.response.model"] == "small"
    # Each dispatch says the model it found a node for, in order: big's node, none of big's left, small's node.
    dispatches = sorted((s for s in spans if s.name == "llamakit.dispatch"), key=lambda s: s.start_time or 0)
    assert [(d.attributes["llamakit.model"], d.attributes.get("llamakit.node")) for d in dispatches] == [
        ("big", "b1"),
        ("big", None),
        ("small", "s1"),
    ]


async def test_a_request_no_model_answered_has_no_response_model_on_its_span(herd: Herd) -> None:
    exporter = InMemorySpanExporter()
    await two_models(herd, tracing=Tracing.to_exporter(exporter, "llamakit-router"))
    alice = await herd.account("alice", 1_000_000)
    resp = await alice.post("/v1/completions", json={**ASK, "models": ["ghost", "ghost2"]})
    assert resp.status_code == 503
    spans = await finished_trace(exporter, resp.headers[REQUEST_ID_HEADER])
    root = by_name(spans)["text_completion ghost/SERVER"].attributes
    assert root["gen_ai.request.model"] == "ghost" and "gen_ai.response.model" not in root
    assert root["error.type"] == "no_node" and root["llamakit.passed_over"] == "ghost=no_node"


def test_without_otel_variables_nothing_of_opentelemetry_is_imported() -> None:
    code = (
        "import sys; from llamakit.router import RouterSettings, create_app; from llamakit.node import NodeSettings;"
        "from llamakit.node.app import create_app as node_app; create_app(RouterSettings(db=':memory:'));"
        "node_app(NodeSettings()); print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
