"""A batch's input file, read and bounded, and the lines of its output and error files, as OpenAI writes them.

An input line is `{"custom_id", "method": "POST", "url", "body"}`; an output line `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}`; a line that failed with an answer has that answer's status
and error body in `response`, and a line that never ran (cancelled, expired, the balance ran out) has `response:
null` and `error: {"code", "message"}`. Each refusal of a file is a 400 that names the limit or the line.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from llamakit.wire.completions import parse_json
from llamakit.wire.errors import ApiError

__all__ = [
    "ENDPOINTS",
    "MAX_CUSTOM_ID",
    "BatchLimits",
    "InputLine",
    "answered_line",
    "custom_id_of",
    "failed_line",
    "not_run_line",
    "read_input",
]

# What a batch may run: the paid endpoints with a whole answer.
ENDPOINTS: Final = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID: Final = 512


@dataclass(frozen=True)
class BatchLimits:
    """The most a batch's input file may hold: `lines` requests, `line_bytes` bytes per line (a request body's
    bound, --max-body-bytes) and `file_bytes` bytes in all (--batch-max-lines, --batch-max-file-bytes)."""

    lines: int
    line_bytes: int
    file_bytes: int


@dataclass(frozen=True)
class InputLine:
    """A line of an input file: its number (1-based, as an editor counts), `custom_id`, `url`, `body` and its
    text as uploaded."""

    number: int
    custom_id: str
    url: str
    body: dict[str, Any]
    text: str


def too_large(size: int, limits: BatchLimits) -> ApiError:
    return ApiError(
        400,
        f"the file is larger than the {limits.file_bytes} bytes a batch's input file may have (--batch-max-file-bytes"
        f"{'' if size <= limits.file_bytes else f'; it has {size}'}): split it into several batches",
        param="file",
        code="file_too_large",
    )


def read_input(content: bytes, limits: BatchLimits) -> list[InputLine]:
    """The requests of a JSONL input file, blank lines skipped; 400 for a file past `limits` (`file_too_large`,
    `too_many_lines`, `line_too_large`), a line that is not UTF-8 JSON of OpenAI's shape (`invalid_line`, naming
    it), or a `custom_id` used twice (`duplicate_custom_id`)."""
    if len(content) > limits.file_bytes:
        raise too_large(len(content), limits)
    lines: list[InputLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(raw) > limits.line_bytes:
            raise ApiError(
                400,
                f"line {number} is {len(raw)} bytes; a line of a batch may have at most {limits.line_bytes} "
                "(--max-body-bytes, the bound of a request's body)",
                param="file",
                code="line_too_large",
            )
        if len(lines) == limits.lines:
            raise ApiError(
                400,
                f"the file has more than {limits.lines} requests, the most a batch may have (--batch-max-lines): "
                "split it into several batches",
                param="file",
                code="too_many_lines",
            )
        line = _line(number, raw)
        if line.custom_id in seen:
            raise ApiError(
                400,
                f"line {number}: custom_id {line.custom_id!r} is on line {seen[line.custom_id]} too; each request of "
                "a batch needs its own",
                param="file",
                code="duplicate_custom_id",
            )
        seen[line.custom_id] = number
        lines.append(line)
    if not lines:
        raise ApiError(400, "the file holds no request: one JSON object per line", param="file", code="invalid_file")
    return lines


def _line(number: int, raw: bytes) -> InputLine:
    def bad(what: str) -> ApiError:
        return ApiError(400, f"line {number}: {what}", param="file", code="invalid_line")

    try:
        text = raw.decode("utf-8").strip()
        data = parse_json(raw)
    except UnicodeDecodeError:
        raise bad("it is not UTF-8 text") from None
    except ApiError as exc:
        raise bad(exc.message.replace("the request body", "the line")) from None
    custom_id, method, url, body = (data.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise bad(f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters that names the request")
    if method != "POST":
        raise bad(f'method must be "POST", got {method!r}')
    if url not in ENDPOINTS:
        raise bad(f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
    if not isinstance(body, dict):
        raise bad("body must be a JSON object: the request as its endpoint takes it")
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))}: a line has custom_id, method, url and body")
    return InputLine(number, custom_id, url, body, text)


def custom_id_of(text: str) -> str:
    """The custom_id of an input line as stored (read_input checked it)."""
    value = json.loads(text).get("custom_id")
    return value if isinstance(value, str) else ""


def _line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def answered_line(custom_id: str, request_id: str, body: dict[str, Any]) -> str:
    """The output line of a request answered 200 with `body`."""
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return _dumps({"id": _line_id(), "custom_id": custom_id, "response": response, "error": None})


def failed_line(custom_id: str, request_id: str | None, status: int, error: dict[str, Any]) -> str:
    """The error line of a request answered with `status` and the error body `error` (`{"error": {...}}`)."""
    response = {"status_code": status, "request_id": request_id, "body": error}
    return _dumps({"id": _line_id(), "custom_id": custom_id, "response": response, "error": None})


def not_run_line(custom_id: str, code: str, message: str) -> str:
    """The error line of a request that never ran: `code` is batch_cancelled, batch_expired, insufficient_quota …"""
    return _dumps(
        {"id": _line_id(), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
    )


def endpoint_mismatch(lines: Sequence[InputLine], endpoint: str) -> ApiError | None:
    """A 400 for the first line whose url is not the batch's `endpoint`, or None."""
    for line in lines:
        if line.url != endpoint:
            return ApiError(
                400,
                f"line {line.number}: url is {line.url}, but the batch's endpoint is {endpoint}: every line of a batch "
                "goes to its endpoint",
                param="input_file_id",
                code="invalid_line",
            )
    return None
