"""`GET /openapi.json`: the router's API as an OpenAPI 3.1 document, generated from the app's own routes and models.

Each handler carries an `Operation` (the `documented` decorator): the pydantic models it validates its body and
query with, the models of its answers, whether it streams Server-Sent Events, and which credential it needs. The
document walks the built application's routes, the `/admin/` and `/herd/` sub-applications' included, so a route
is described where it is registered; component schemas come from pydantic (`TypeAdapter.json_schemas`, JSON
Schema 2020-12 as OpenAPI 3.1 takes it) and the rest of the document is built with openapi-pydantic's objects.
A route without an `Operation` is a bug a test finds (tests/router/test_openapi.py), never a silent gap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final, Literal, TypeVar

from aiohttp import web
from openapi_pydantic.v3.v3_1 import (
    Components,
    Header,
    Info,
    MediaType,
    OpenAPI,
    Parameter,
    PathItem,
    Reference,
    RequestBody,
    Response,
    Schema,
    SecurityScheme,
)
from openapi_pydantic.v3.v3_1 import (
    Operation as OpenApiOperation,
)
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from llamakit.money.fees import BID_TEXT
from llamakit.router.routes.query import QueryModel
from llamakit.wire.answers import ErrorBody
from llamakit.wire.headers import (
    BID_HEADER,
    COST_CREDITS_HEADER,
    COST_HEADER,
    CURRENCY_HEADER,
    HEADER_DESCRIPTIONS,
    IDEMPOTENCY_HEADER,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    NODE_HEADER,
    OVERHEAD_HEADER,
    QUEUE_HEADER,
    REPLAYED_HEADER,
    REQUEST_ID_HEADER,
)

log = logging.getLogger(__name__)

__all__ = ["OPENAPI_PATH", "Operation", "documented", "openapi_document", "openapi_routes"]

OPENAPI_PATH: Final = "/openapi.json"

Credential = Literal["api_key", "admin_key", "herd_token"]

# The three bearer credentials, by the name the document gives their security schemes.
_SCHEMES: Final[dict[Credential, tuple[str, str]]] = {
    "api_key": ("ApiKey", "A tenant's API key (`llamakit keys create`): the /v1 routes except /v1/info."),
    "admin_key": ("AdminKey", "The operator's admin key (`--admin-key`): every route under /admin/."),
    "herd_token": ("HerdToken", "The herd token nodes share with the router (`--herd-token`): /herd/ routes."),
}
_STATUS_TEXT: Final = {
    200: "OK",
    201: "Created",
    400: "A malformed request: the error names the field (`param`)",
    401: "No credential, or not a valid one for this route",
    402: "Not enough credits (`needed`, `balance`), or over a key's spend cap",
    403: "The API key may not do this (a model it is not allowed)",
    404: "No such thing (a model, an account, a key, a node)",
    405: "The route does not take this method",
    409: "A conflict: the name exists, or the request under this Idempotency-Key still runs",
    413: "The request body is larger than the router takes",
    422: "The Idempotency-Key was used for a different request",
    429: "Over a rate or concurrency limit, or the queue is full: wait for Retry-After",
    499: "The client closed the connection before its answer",
    502: "The node failed the request; nothing was charged",
    503: "No node serves the model now (Retry-After)",
    504: "The request waited in the queue longer than the router's queue timeout; refunded",
}
# Every paid request may be refused so, whatever its route (docs/api.md#errors).
PAID_ERRORS: Final = (400, 401, 402, 403, 404, 409, 413, 422, 429, 499, 502, 503, 504)
# The headers of a paid answer (wire/headers.py), whole or streamed.
_PAID_HEADERS: Final = (REQUEST_ID_HEADER, NODE_HEADER, BID_HEADER, QUEUE_HEADER, OVERHEAD_HEADER, CURRENCY_HEADER)
_COST_HEADERS: Final = (COST_HEADER, COST_CREDITS_HEADER, REPLAYED_HEADER)


@dataclass(frozen=True)
class Operation:
    """What `/openapi.json` says of one route. Types are anything pydantic makes a JSON schema of (models,
    dataclasses, lists of them); `answer` None means no JSON body (then `text` names the media type)."""

    summary: str
    auth: Credential | None
    answer: Any = None
    status: int = 200
    body: Any = None  # a model or dataclass the handler validates the JSON body with
    form: Any = None  # a model of the multipart/form-data body the handler reads (a file upload)
    query: type[QueryModel] | None = None
    stream: Any = None  # the JSON of each `data:` event when the route can answer text/event-stream
    stream_only: bool = False  # the route always streams (no JSON answer)
    stream_done: bool = True  # the stream ends with `data: [DONE]`
    text: str | None = None  # the media type of an answer that is not JSON (`text/plain` metrics)
    errors: tuple[int, ...] = ()
    paid: bool = False  # a paid route: bid and idempotency headers in, cost headers out, PAID_ERRORS
    description: str | None = None
    tags: tuple[str, ...] = field(default=())


def _bare(path: str) -> Operation:
    """What is known of a route nobody described: its credential, by the part it is in."""
    auth: Credential = "admin_key" if path.startswith("/admin/") else "api_key"
    if path.startswith("/herd/"):
        auth = "herd_token"
    return Operation(summary="(not described yet)", auth=auth, answer=dict[str, Any], errors=(400, 404))


_Handler = TypeVar("_Handler", bound=Callable[..., Any])
_ATTRIBUTE: Final = "__llamakit_openapi__"


def documented(operation: Operation) -> Callable[[_Handler], _Handler]:
    """Attach `operation` to a handler (below its route decorator): `@routes.get(...)` then `@documented(...)`."""

    def attach(handler: _Handler) -> _Handler:
        setattr(handler, _ATTRIBUTE, operation)
        return handler

    return attach


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    found = getattr(handler, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None


def routes_of(app: web.Application) -> Iterator[tuple[str, str, Callable[..., Any]]]:
    """(method, path template, handler) of every route `app` registers, its sub-applications' included; HEAD
    routes aiohttp adds beside each GET are left out (they answer as the GET does, without a body)."""
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            yield from routes_of(resource.get_info()["app"])
            continue
        for route in resource:
            if route.method != "HEAD":
                yield route.method, resource.canonical, route.handler


class _Schemas:
    """The document's component schemas: every type asked for, made by pydantic in one pass so that models
    shared between routes are one component each."""

    def __init__(self) -> None:
        self._wanted: dict[tuple[int, JsonSchemaMode], tuple[Any, JsonSchemaMode]] = {}

    def ref(self, kind: Any, mode: JsonSchemaMode) -> _Ref:
        self._wanted[(id(kind), mode)] = (kind, mode)
        return _Ref(id(kind), mode)

    def build(self) -> tuple[dict[tuple[int, JsonSchemaMode], dict[str, Any]], dict[str, Any]]:
        inputs = [(key, mode, TypeAdapter(kind)) for key, (kind, mode) in self._wanted.items()]
        found, definitions = TypeAdapter.json_schemas(inputs, ref_template="#/components/schemas/{model}")
        schemas = {key: schema for (key, _mode), schema in found.items()}
        return schemas, definitions.get("$defs", {})


@dataclass(frozen=True)
class _Ref:
    key: int
    mode: JsonSchemaMode


_ERROR_REF = "#/components/responses/Error"


def openapi_document(
    app: web.Application, *, title: str = "llamakit router", version: str = "", strict: bool = False
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app` (the router's root application), as a JSON-ready dict.

    A route without an `Operation` is listed with its credential and the error body only, and logged; with
    `strict` (the tests) it raises LookupError naming the route."""
    schemas = _Schemas()
    planned: list[tuple[str, str, Operation]] = []
    for method, path, handler in routes_of(app):
        operation = operation_of(handler)
        if operation is None:
            if strict:
                raise LookupError(f"{method} {path} has no OpenAPI description: add @documented(Operation(...))")
            log.warning("%s %s has no OpenAPI description: /openapi.json lists it bare", method, path)
            operation = _bare(path)
        planned.append((method, path, operation))
    error_ref = schemas.ref(ErrorBody, "serialization")
    refs: list[tuple[str, str, Operation, dict[str, Any]]] = []
    for method, path, operation in planned:
        wanted: dict[str, Any] = {}
        if operation.body is not None:
            wanted["body"] = schemas.ref(operation.body, "validation")
        if operation.form is not None:
            wanted["form"] = schemas.ref(operation.form, "validation")
        if operation.answer is not None:
            wanted["answer"] = schemas.ref(operation.answer, "serialization")
        if operation.stream is not None:
            wanted["stream"] = schemas.ref(operation.stream, "serialization")
            wanted["error"] = error_ref
        refs.append((method, path, operation, wanted))
    made, definitions = schemas.build()

    def schema_of(ref: _Ref) -> dict[str, Any]:
        return made[(ref.key, ref.mode)]

    paths: dict[str, PathItem] = {}
    for method, path, operation, wanted in refs:
        item = paths.setdefault(path, PathItem())
        built = _operation(method, path, operation, {k: schema_of(v) for k, v in wanted.items()})
        setattr(item, method.lower(), built)
    document = OpenAPI(
        openapi="3.1.0",
        info=Info(
            title=title,
            version=version or "0",
            description="Paid, metered llama.cpp inference: OpenAI's API with llamakit's bids, costs and "
            "headers, and the operator's and the nodes' routes. Money is integer credits (docs/money.md).",
        ),
        paths=paths,
        components=Components(
            securitySchemes={
                name: SecurityScheme(type="http", scheme="bearer", description=text) for name, text in _SCHEMES.values()
            },
            responses={
                "Error": Response(
                    description="An error, in OpenAI's shape",
                    content={"application/json": MediaType(schema=_reference(schema_of(error_ref)))},
                )
            },
        ),
    )
    out: dict[str, Any] = json.loads(document.model_dump_json(by_alias=True, exclude_unset=True, exclude_none=True))
    # Pydantic's JSON schemas go in as pydantic wrote them: openapi-pydantic's Schema would coerce them.
    out["components"]["schemas"] = definitions
    inlined: dict[str, Any] = _inline(out)
    return inlined


def _reference(schema: dict[str, Any]) -> Reference | Schema:
    """A schema as openapi-pydantic holds it: a reference to a component, or a placeholder `_inline` fills."""
    if set(schema) == {"$ref"}:
        return _ref(schema["$ref"])
    return _ref(_PLACEHOLDER + json.dumps(schema, sort_keys=True))


def _ref(target: str, description: str | None = None) -> Reference:
    return Reference.model_validate({"$ref": target, "description": description})


def _parameter(name: str, where: str, schema: Schema | Reference, *, required: bool = False,
               description: str | None = None) -> Parameter:  # fmt: skip
    return Parameter.model_validate(
        {"name": name, "in": where, "required": required, "description": description, "schema": schema}
    )


_PLACEHOLDER = "llamakit-inline:"


def _inline(node: Any) -> Any:
    """The document with each placeholder reference replaced by the schema it stands for, unchanged."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_PLACEHOLDER):
            return json.loads(ref.removeprefix(_PLACEHOLDER))
        return {k: _inline(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v) for v in node]
    return node


def _operation(method: str, path: str, op: Operation, schemas: dict[str, dict[str, Any]]) -> OpenApiOperation:
    parameters = [
        _parameter(name, "path", Schema(type="string", minLength=1), required=True) for name in _path_names(path)
    ]
    if op.query is not None:
        query_schema = op.query.model_json_schema()
        for name, model_field in op.query.model_fields.items():
            schema = _reference(_without_title(query_schema["properties"][name]))
            parameters.append(
                _parameter(
                    name, "query", schema, required=model_field.is_required(), description=model_field.description
                )
            )
    if op.paid:
        bid = HEADER_DESCRIPTIONS[BID_HEADER] + " (a body's `bid` wins)"
        printable = "^[ -~]+$"  # printable ASCII, as `Idempotency.key_of` takes it
        key = Schema(type="string", minLength=1, maxLength=MAX_IDEMPOTENCY_KEY_LENGTH, pattern=printable)
        bid_text = Schema(type="string", pattern=f"^({BID_TEXT.pattern})$")
        parameters += [
            _parameter(BID_HEADER, "header", bid_text, description=bid),
            _parameter(IDEMPOTENCY_HEADER, "header", key, description=HEADER_DESCRIPTIONS[IDEMPOTENCY_HEADER]),
        ]
    content: dict[str, MediaType] = {}
    if "answer" in schemas and not op.stream_only:
        content["application/json"] = MediaType(schema=_reference(schemas["answer"]))
    if op.text is not None:
        content[op.text] = MediaType(schema=Schema(type="string"))
    if "stream" in schemas:
        content["text/event-stream"] = MediaType(schema=_reference(_event_schema(op, schemas)))
    headers = {"x-request-id": Header(description="the request's id (a paid one's usage record)", schema=_STRING)}
    if op.paid:
        for name in _PAID_HEADERS + _COST_HEADERS:
            headers[name] = Header(description=HEADER_DESCRIPTIONS[name], schema=_STRING)
    ok = Response(description=_STATUS_TEXT[op.status], headers=headers, content=content or None)
    errors = sorted(set(op.errors) | ({401} if op.auth else set()) | (set(PAID_ERRORS) if op.paid else set()))
    responses: dict[str, Response | Reference] = {str(op.status): ok}
    for status in errors:
        responses[str(status)] = _ref(_ERROR_REF, _STATUS_TEXT[status])
    body = None
    if "body" in schemas:
        body = RequestBody(required=True, content={"application/json": MediaType(schema=_reference(schemas["body"]))})
    elif "form" in schemas:
        form = MediaType(schema=_reference(schemas["form"]))
        body = RequestBody(required=True, content={"multipart/form-data": form})
    scheme = _SCHEMES[op.auth][0] if op.auth else None
    return OpenApiOperation(
        summary=op.summary,
        description=op.description,
        operationId=_operation_id(method, path),
        tags=list(op.tags) or [_tag(path)],
        parameters=parameters or None,
        requestBody=body,
        responses=responses,
        security=[{scheme: []}] if scheme else [],
    )


_STRING: Final = Schema(type="string")


def _event_schema(op: Operation, schemas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One Server-Sent Event of the route's stream, as OpenAPI 3.2's `itemSchema` would give it (before 3.2,
    a `text/event-stream` media type's `schema` describes each event): its `data` is JSON text holding the
    route's event, or an error event; a stream that ends with `data: [DONE]` allows that too."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [schemas["stream"], schemas["error"]]},
    }
    data: dict[str, Any] = {"anyOf": [{"const": "[DONE]"}, json_data]} if op.stream_done else json_data
    return {
        "type": "object",
        "description": "one event: `data:` holds the JSON of "
        + ("an event (or an error), then `[DONE]` ends the stream" if op.stream_done else "an event (or an error)"),
        "properties": {"event": {"type": "string"}, "data": data},
        "required": ["data"],
    }


def _without_title(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != "title"}


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _operation_id(method: str, path: str) -> str:
    words = [p.strip("{}") for p in path.strip("/").split("/") if p]
    return method.lower() + "_" + "_".join(w.replace(".", "_").replace("-", "_") for w in words)


def _tag(path: str) -> str:
    if path.startswith("/admin/"):
        return "operator"
    if path.startswith("/herd/"):
        return "herd"
    return "tenant" if path.startswith("/v1/") else "router"


def _version() -> str:
    try:
        return metadata.version("llamakit")
    except metadata.PackageNotFoundError:  # run from a checkout that was not installed
        return "0"


def openapi_routes() -> web.RouteTableDef:
    """`GET /openapi.json`, public: the document of the app that serves it, made once at its first call."""
    table = web.RouteTableDef()
    version = _version()
    cached: dict[str, bytes] = {}

    @table.get(OPENAPI_PATH)
    @documented(Operation(summary="This document: the router's API in OpenAPI 3.1", auth=None, answer=dict[str, Any]))
    async def openapi(request: web.Request) -> web.Response:
        if "body" not in cached:
            root = request.app
            cached["body"] = json.dumps(openapi_document(root, version=version), ensure_ascii=False).encode()
        return web.Response(body=cached["body"], content_type="application/json")

    return table
