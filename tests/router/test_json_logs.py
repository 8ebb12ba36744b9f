"""`--log-format json`: the router's lines as JSON objects, a paid request's line with its usage and trace id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamakit.logs import json_formatter
from llamakit.router.paid.record import REQUEST_LOG
from llamakit.telemetry import Tracing
from llamakit.wire.headers import OVERHEAD_HEADER, REQUEST_ID_HEADER
from tests.router.test_tracing import CHAT, TRACEPARENT, by_name, finished_trace
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd


@pytest.fixture
def request_lines() -> Iterator[io.StringIO]:
    """The `llamakit.requests` lines (what --log-requests turns on), formatted as --log-format json does."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(json_formatter())
    from llamakit.logs import _TraceIds

    handler.addFilter(_TraceIds())
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    yield out
    REQUEST_LOG.removeHandler(handler)
    REQUEST_LOG.setLevel(logging.NOTSET)


async def test_a_paid_request_is_one_json_line_with_its_usage_and_trace(herd: Herd, request_lines: io.StringIO) -> None:
    exporter = InMemorySpanExporter()
    await herd.add_node(FakeNode("n1", script=Script(tokens=4)))
    await herd.start(tracing=Tracing.to_exporter(exporter, "llamakit-router"))
    alice = await herd.account("alice", 1_000_000)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await alice.post("/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT})
    request_id = resp.headers[REQUEST_ID_HEADER]
    root = by_name(await finished_trace(exporter, request_id))["chat fake-model/SERVER"]
    lines = [json.loads(line) for line in request_lines.getvalue().splitlines()]
    (line,) = [entry for entry in lines if entry.get("request_id") == request_id]
    assert line["level"] == "INFO" and line["logger"] == "llamakit.requests"
    assert line["time"].startswith("20") and line["message"].startswith(request_id)
    assert (line["account"], line["model"], line["node"], line["status"]) == ("alice", "fake-model", "n1", "ok")
    assert line["completion_tokens"] == 4 and line["prompt_tokens"] > 0
    assert line["cost_credits"] == root.attributes["llamakit.credits.charged"] > 0
    assert line["overhead_ms"] >= float(resp.headers[OVERHEAD_HEADER])
    assert line["trace_id"] == f"{root.context.trace_id:032x}"
    print(json.dumps(line))


async def test_refusals_are_lines_too(herd: Herd, request_lines: io.StringIO) -> None:
    await herd.add_node(FakeNode("n1"))
    await herd.start()
    poor = await herd.account("poor", 1)
    assert (await poor.post("/v1/chat/completions", json=CHAT)).status_code == 402
    (line,) = [json.loads(text) for text in request_lines.getvalue().splitlines()]
    assert (line["account"], line["status"], line["http_status"]) == ("poor", "insufficient_funds", 402)
    assert "trace_id" not in line  # tracing is off
