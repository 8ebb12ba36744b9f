"""OpenAI's Files and Batch API for batches (tenant routes, Bearer API key), so that the openai client's
`files.create(purpose="batch")`, `batches.create`, `batches.retrieve/list/cancel` and `files.content` work unchanged.

    POST   /v1/files                   upload a batch's input file (multipart: `file`, `purpose=batch`)
    GET    /v1/files                   the account's files, newest first (`after`, `limit`, `order`, `purpose`)
    GET    /v1/files/{file_id}         one file
    DELETE /v1/files/{file_id}         delete a file
    GET    /v1/files/{file_id}/content its bytes: an input file as uploaded, a batch's output or error file
    POST   /v1/batches                 run a file's requests (`input_file_id`, `endpoint`, `completion_window`)
    GET    /v1/batches                 the account's batches, newest first (`after`, `limit`)
    GET    /v1/batches/{batch_id}      one batch, with its progress (`request_counts`) and cost (`usage`)
    POST   /v1/batches/{batch_id}/cancel

Files and batches are their account's: another account's id is 404, as an unknown one is. The lines run in the
background (llamakit.router.batches.runner), each a paid request at the batch's discount (docs/money.md#batches).
"""

from __future__ import annotations

import time
from typing import Any, Final

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import Field

from llamakit.router.auth import authenticate
from llamakit.router.batches.answers import (
    BatchAnswer,
    BatchList,
    FileAnswer,
    FileDeleted,
    FileList,
    FileUpload,
    NewBatch,
    batch_answer,
    file_answer,
)
from llamakit.router.batches.lines import BatchLimits, InputLine, endpoint_mismatch, read_input, too_large
from llamakit.router.batches.runner import CANCELLED, RUNNER, render
from llamakit.router.ledger import MAX_PAGE
from llamakit.router.ledger._batches import NewLine, StoredFile
from llamakit.router.limits import Caller
from llamakit.router.openapi import Operation, documented
from llamakit.router.routes.answers import parse_body
from llamakit.router.routes.query import QueryModel, parse_query
from llamakit.router.state import STATE, RouterState
from llamakit.web import json_response
from llamakit.wire.completions import parse_json
from llamakit.wire.errors import ApiError

__all__ = ["batch_routes"]

batch_routes = web.RouteTableDef()

MAX_FILENAME: Final = 255
_CHUNK: Final = 1000  # output lines read from the ledger at a time
_JSONL: Final = "application/jsonl"


def _limits(state: RouterState) -> BatchLimits:
    settings = state.settings
    return BatchLimits(settings.batch_max_lines, settings.max_body_bytes, settings.batch_max_file_bytes)


def _no_file(file_id: str) -> ApiError:
    return ApiError(
        404, f"no file {file_id!r} here: GET /v1/files lists yours", type="not_found_error", code="file_not_found",
        param="file_id",
    )  # fmt: skip


def _no_batch(batch_id: str) -> ApiError:
    return ApiError(
        404, f"no batch {batch_id!r} here: GET /v1/batches lists yours", type="not_found_error",
        code="batch_not_found", param="batch_id",
    )  # fmt: skip


# --- files --------------------------------------------------------------------------------------------------


@batch_routes.post("/v1/files")
@documented(Operation(summary="Upload a batch's input file: JSONL requests (multipart/form-data)", auth="api_key",
                      answer=FileAnswer, form=FileUpload, errors=(400, 404), tags=("batches",)))  # fmt: skip
async def upload_file(request: web.Request) -> web.Response:
    """A JSONL file of requests for a batch, one `{"custom_id", "method": "POST", "url", "body"}` a line. 400 for a
    body that is not multipart/form-data with `file` and `purpose=batch`, and for a file past the router's bounds
    (`file_too_large`, `too_many_lines`, `line_too_large`) or with a malformed line (`invalid_line`, naming it)."""
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    limits = _limits(state)
    filename, content, purpose = await _form(request, limits)
    if purpose != "batch":
        raise ApiError(
            400,
            f"purpose must be 'batch' (llamakit keeps files for batches only), got {purpose!r}",
            param="purpose",
            code="invalid_value",
        )
    lines = read_input(content, limits)
    stored = await state.ledger.batch_store.create_file(
        caller.account.id, purpose="batch", filename=filename, content=content, lines=len(lines)
    )
    return json_response(file_answer(stored))


async def _form(request: web.Request, limits: BatchLimits) -> tuple[str, bytes, str | None]:
    """The upload's file name, bytes and purpose, the file read no further than the router's bound on it."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            400, "send the file as multipart/form-data, with the fields 'file' (JSONL) and 'purpose' (batch)",
            param="file", code="invalid_file",
        )  # fmt: skip
    try:
        reader = await request.multipart()
        filename: str | None = None
        content = b""
        purpose: str | None = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "a nested multipart body is not a file upload", param="file", code="invalid_file")
            if part.name == "file":
                filename = _filename(part.filename)
                content = await _read(part, limits)
            elif part.name == "purpose":
                purpose = (await part.read_chunk(256)).decode("utf-8", "replace").strip()
            else:
                raise ApiError(
                    400, f"unknown field {part.name!r}: an upload has 'file' and 'purpose' (llamakit keeps a file "
                    "until it is deleted)", param=part.name or "file", code="unsupported_field",
                )  # fmt: skip
    except (ValueError, HttpProcessingError) as exc:  # a malformed multipart body (aiohttp's own words)
        raise ApiError(400, f"the multipart body is malformed: {exc}", param="file", code="invalid_file") from exc
    if filename is None:
        raise ApiError(
            400, "the upload has no 'file' field: send the JSONL file as 'file'", param="file", code="invalid_file"
        )
    return filename, content, purpose


async def _read(part: BodyPartReader, limits: BatchLimits) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if size > limits.file_bytes:
            raise too_large(size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


def _filename(name: str | None) -> str:
    """The name a file was uploaded under, as files.create sends it (kept to MAX_FILENAME plain characters)."""
    text = "".join(c for c in (name or "upload.jsonl") if c.isprintable())[:MAX_FILENAME]
    return text.encode("utf-8", "replace").decode("utf-8") or "upload.jsonl"


class FilesParams(QueryModel):
    """The query of `GET /v1/files`."""

    after: str | None = Field(default=None, max_length=100, description="a file id: the page starts after it")
    limit: int = Field(default=100, ge=1, le=MAX_PAGE, description="files per page")
    order: str = Field(default="desc", pattern="^(asc|desc)$", description="by creation: desc (newest first) or asc")
    purpose: str | None = Field(default=None, max_length=32, description="only files of this purpose")


@batch_routes.get("/v1/files")
@documented(Operation(summary="The account's files, newest first, paged", auth="api_key", answer=FileList,
                      query=FilesParams, errors=(400,), tags=("batches",)))  # fmt: skip
async def list_files(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    query = parse_query(FilesParams, request)
    found = await state.ledger.batch_store.files(
        caller.account.id, after=query.after, limit=query.limit + 1, purpose=query.purpose,
        ascending=query.order == "asc",
    )  # fmt: skip
    return json_response(_page([file_answer(f) for f in found], query.limit))


def _page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A cursor page as OpenAI's: `has_more`, and the ids to page on from (`after=last_id`)."""
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


async def _file(request: web.Request) -> tuple[RouterState, StoredFile]:
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    file_id = request.match_info["file_id"]
    found = await state.ledger.batch_store.find_file(caller.account.id, file_id)
    if found is None:
        raise _no_file(file_id)
    return state, found


@batch_routes.get("/v1/files/{file_id}")
@documented(Operation(summary="One file", auth="api_key", answer=FileAnswer, errors=(404,), tags=("batches",)))
async def retrieve_file(request: web.Request) -> web.Response:
    _state, found = await _file(request)
    return json_response(file_answer(found))


@batch_routes.delete("/v1/files/{file_id}")
@documented(Operation(summary="Delete a file", auth="api_key", answer=FileDeleted, errors=(404,), tags=("batches",)))
async def delete_file(request: web.Request) -> web.Response:
    """Delete a file: an input file (a batch that runs keeps its lines), or a batch's output or error file."""
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    file_id = request.match_info["file_id"]
    if not await state.ledger.batch_store.delete_file(caller.account.id, file_id):
        raise _no_file(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


@batch_routes.get("/v1/files/{file_id}/content")
@documented(Operation(summary="A file's bytes: an input file as uploaded, or a batch's output or error file (JSONL)",
                      auth="api_key", text=_JSONL, errors=(404,), tags=("batches",)))  # fmt: skip
async def file_content(request: web.Request) -> web.StreamResponse:
    state, found = await _file(request)
    store = state.ledger.batch_store
    if found.batch_id is None or found.kind is None:
        return web.Response(body=await store.file_content(found), content_type=_JSONL)
    # A batch's output or error file: its lines, in order, read a chunk at a time.
    response = web.StreamResponse(headers={"Content-Type": _JSONL})
    response.content_length = found.bytes
    await response.prepare(request)
    after = -1
    while lines := await store.output_lines(found.batch_id, found.kind, after=after, limit=_CHUNK):
        await response.write("".join(text + "\n" for _, text in lines).encode())
        after = lines[-1][0]
    await response.write_eof()
    return response


# --- batches ------------------------------------------------------------------------------------------------


@batch_routes.post("/v1/batches")
@documented(Operation(summary="Run an uploaded file's requests as a batch, at a discount, behind every interactive "
                      "request", auth="api_key", answer=BatchAnswer, body=NewBatch, errors=(400, 404),
                      tags=("batches",)))  # fmt: skip
async def create_batch(request: web.Request) -> web.Response:
    """A new batch of the requests in `input_file_id`, each sent to `endpoint`. 404 for a file that is not the
    account's; 400 for a line whose url is not the endpoint, that streams or bids (a line is answered whole, at the
    batch's discount), or whose model the router does not know (`model_not_found`, naming the line)."""
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    body = parse_body(NewBatch, parse_json(await request.read()))
    store = state.ledger.batch_store
    found = await store.find_file(caller.account.id, body.input_file_id)
    if found is None:
        raise ApiError(
            404, f"no file {body.input_file_id!r} here: upload it with POST /v1/files (purpose 'batch')",
            type="not_found_error", code="file_not_found", param="input_file_id",
        )  # fmt: skip
    if found.purpose != "batch":
        raise ApiError(400, f"file {found.id!r} is a batch's {found.kind} file, not an input file",
                       param="input_file_id", code="invalid_value")  # fmt: skip
    lines = read_input(await store.file_content(found), _limits(state))
    mismatch = endpoint_mismatch(lines, body.endpoint)
    if mismatch is not None:
        raise mismatch
    new = [NewLine(_model_of(state, line), line.text) for line in lines]
    models = {line.model for line in new}
    batch = await store.create_batch(
        caller.account.id, key_hash=caller.key_hash, input_file_id=found.id, endpoint=body.endpoint,
        completion_window=body.completion_window, model=models.pop() if len(models) == 1 else None,
        metadata=body.metadata, discount=str(state.settings.batch_discount), expires=time.time() + body.window,
        lines=new,
    )  # fmt: skip
    request.config_dict[RUNNER].wake()
    return json_response(batch_answer(batch, state.settings.money))


def _model_of(state: RouterState, line: InputLine) -> str:
    """The model a line waits for a slot of: the first it names that the router knows (`model`, then `models`), or
    the router's default; 400 for a line that bids or streams, or names only models the router does not know."""
    body = line.body
    for field, why in (("bid", "a line is priced at the batch's discount, not a bid"),
                       ("stream", "a line is answered whole, into the batch's output file")):  # fmt: skip
        if body.get(field) not in (None, False):
            raise ApiError(400, f"line {line.number}: remove {field!r}: {why}", param="input_file_id",
                           code="invalid_line")  # fmt: skip
    named: list[Any] = body["models"] if isinstance(body.get("models"), list) else []
    candidates = [m for m in [body.get("model"), *named] if isinstance(m, str) and m]
    for model in candidates:
        if state.knows_model(model):
            return model
    if not candidates and (default := state.default_model()) is not None:
        return default
    available = ", ".join(state.known_models()) or "none (no node has joined yet)"
    raise ApiError(
        404, f"line {line.number}: no model here by the name(s) {', '.join(map(repr, candidates)) or '(none)'}; "
        f"available models: {available}", type="not_found_error", code="model_not_found", param="input_file_id",
    )  # fmt: skip


class BatchesParams(QueryModel):
    """The query of `GET /v1/batches`."""

    after: str | None = Field(default=None, max_length=100, description="a batch id: the page starts after it")
    limit: int = Field(default=20, ge=1, le=100, description="batches per page")


@batch_routes.get("/v1/batches")
@documented(Operation(summary="The account's batches, newest first, paged", auth="api_key", answer=BatchList,
                      query=BatchesParams, errors=(400,), tags=("batches",)))  # fmt: skip
async def list_batches(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    caller = await authenticate(request)
    query = parse_query(BatchesParams, request)
    found = await state.ledger.batch_store.batches(caller.account.id, after=query.after, limit=query.limit + 1)
    money = state.settings.money
    return json_response(_page([batch_answer(b, money) for b in found], query.limit))


async def _caller_and_id(request: web.Request) -> tuple[RouterState, Caller, str]:
    return request.config_dict[STATE], await authenticate(request), request.match_info["batch_id"]


@batch_routes.get("/v1/batches/{batch_id}")
@documented(Operation(summary="One batch: its status, progress (request_counts) and cost (usage)", auth="api_key",
                      answer=BatchAnswer, errors=(404,), tags=("batches",)))  # fmt: skip
async def retrieve_batch(request: web.Request) -> web.Response:
    state, caller, batch_id = await _caller_and_id(request)
    found = await state.ledger.batch_store.find_batch(caller.account.id, batch_id)
    if found is None:
        raise _no_batch(batch_id)
    return json_response(batch_answer(found, state.settings.money))


@batch_routes.post("/v1/batches/{batch_id}/cancel")
@documented(Operation(summary="Cancel a batch: lines not started fail, refunded; lines on a node finish, charged",
                      auth="api_key", answer=BatchAnswer, errors=(404, 409), tags=("batches",)))  # fmt: skip
async def cancel_batch(request: web.Request) -> web.Response:
    """A batch in progress becomes `cancelling` (then `cancelled` once its lines on nodes end): its pending lines
    fail with `batch_cancelled`. Cancelling one that is cancelling or cancelled again changes nothing; 409
    `batch_not_cancellable` for one that ended otherwise."""
    state, caller, batch_id = await _caller_and_id(request)
    code, message = CANCELLED
    found = await state.ledger.batch_store.cancel_batch(caller.account.id, batch_id, render(code, message))
    if found is None:
        raise _no_batch(batch_id)
    if found.status not in ("cancelling", "cancelled"):
        raise ApiError(
            409, f"batch {batch_id!r} is {found.status}: only a batch in progress can be cancelled",
            code="batch_not_cancellable", param="batch_id",
        )  # fmt: skip
    request.config_dict[RUNNER].cancelled(batch_id)
    return json_response(batch_answer(found, state.settings.money))
