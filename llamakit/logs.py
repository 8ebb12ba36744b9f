"""How the router, the node and `llamakit up` write their logs: text (the default) or JSON, one object per line.

A JSON line has `time` (ISO 8601, UTC), `level`, `logger` and `message`, then whatever the line is about: a
line about a request carries its `request_id`, `account`, `model`, `node`, `status`, tokens and credits (see
`llamakit.router.paid.record`), passed as `extra=`; `trace_id` and `span_id` are added when a traced request is
being served (OpenTelemetry, see llamakit.telemetry). python-json-logger does the formatting: extras, exceptions
and stacks as a log shipper expects them, encoded by orjson.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final, Literal

__all__ = ["LOG_FORMATS", "LogFormat", "configure_logging", "json_formatter"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _TraceIds(logging.Filter):
    """Adds the current span's `trace_id` and `span_id` (hex, as OTLP back ends show them) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:  # imported only when tracing is on (llamakit.telemetry): nothing to add
            return True
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def json_formatter() -> logging.Formatter:
    """The JSON formatter: `time`, `level`, `logger`, `message`, then the record's extras."""
    from pythonjsonlogger.orjson import OrjsonFormatter

    class _TimeFirst(OrjsonFormatter):
        def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
            return {"time": log_data.pop("time", None), **log_data}  # as a person reads a line: when, first

    return _TimeFirst(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def configure_logging(fmt: LogFormat = "text", *, level: int = logging.INFO, stream: object = None) -> None:
    """Send the process's logs to `stream` (stderr by default) in `fmt`, replacing any handler set before.

    With tracing on (OpenTelemetry installed and configured), a JSON line written while a traced request is
    served carries its `trace_id` and `span_id`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(json_formatter())
        handler.addFilter(_TraceIds())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
