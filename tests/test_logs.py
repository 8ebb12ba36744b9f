"""llamakit.logs: text stays the default; JSON is one object per line with time, level, logger and message."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from llamakit.logs import configure_logging


def test_json_lines_carry_the_records_fields_extras_exceptions_and_the_current_trace() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging("json", stream=out)
        log = logging.getLogger("llamakit.test")
        log.warning("node %s failed", "n1", extra={"request_id": "req-1", "node": "n1"})
        try:
            raise ValueError("bad")
        except ValueError:
            log.exception("it broke")
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("work") as span:
            log.info("inside a span")
        first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
        assert {k: first[k] for k in ("level", "logger", "message", "request_id", "node")} == {
            "level": "WARNING",
            "logger": "llamakit.test",
            "message": "node n1 failed",
            "request_id": "req-1",
            "node": "n1",
        }
        assert first["time"].endswith("+00:00") and "trace_id" not in first
        assert second["level"] == "ERROR" and "ValueError: bad" in second["exc_info"]
        assert third["trace_id"] == f"{span.get_span_context().trace_id:032x}"
        assert third["span_id"] == f"{span.get_span_context().span_id:016x}"
        out.truncate(0), out.seek(0)
        configure_logging("text", stream=out)
        log.warning("plain")
        assert out.getvalue().rstrip().endswith("WARNING llamakit.test: plain")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
