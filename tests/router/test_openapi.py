"""`GET /openapi.json`: the router's whole API as a valid OpenAPI 3.1 document, generated from its routes and models."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from llamakit.router import RouterSettings, create_app
from llamakit.router.openapi import openapi_document, routes_of
from llamakit.wire.headers import (
    BID_HEADER,
    COST_CREDITS_HEADER,
    IDEMPOTENCY_HEADER,
    OVERHEAD_HEADER,
    REPLAYED_HEADER,
    REQUEST_ID_HEADER,
)
from tests.support.fake_node import FakeNode
from tests.support.herd import Herd

SCHEMES = {"ApiKey", "AdminKey", "HerdToken"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document(create_app(RouterSettings(db=":memory:")), strict=True)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_a_route_nobody_described_is_listed_bare_and_fails_the_strict_document() -> None:
    app = create_app(RouterSettings(db=":memory:"))

    async def undescribed(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/new-thing", undescribed)
    with pytest.raises(LookupError, match="GET /v1/new-thing"):
        openapi_document(app, strict=True)
    bare = openapi_document(app)["paths"]["/v1/new-thing"]["get"]
    validate(openapi_document(app))
    assert bare["security"] == [{"ApiKey": []}] and "401" in bare["responses"]


def test_every_route_is_described_with_the_credential_it_needs(document: dict[str, Any]) -> None:
    app = create_app(RouterSettings(db=":memory:"))
    served = {(method.lower(), path) for method, path, _handler in routes_of(app)}
    described = {(method, path) for path, item in document["paths"].items() for method in item}
    assert described == served
    assert {p for _m, p in served if p.startswith("/admin/")} and {p for _m, p in served if p.startswith("/herd/")}
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == SCHEMES and all(s == {**s, "type": "http", "scheme": "bearer"} for s in schemes.values())
    for method, path in served:
        operation = document["paths"][path][method]
        security = [name for requirement in operation.get("security", []) for name in requirement]
        if path.startswith("/admin/"):
            assert security == ["AdminKey"], (method, path)
        elif path.startswith("/herd/"):
            assert security == ["HerdToken"], (method, path)
        elif path in ("/v1/info", "/health", "/ready", "/live", "/metrics", "/openapi.json"):
            assert security == [], (method, path)
        else:
            assert security == ["ApiKey"], (method, path)
            assert "401" in operation["responses"]


def test_bodies_answers_errors_streams_and_headers_come_from_the_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    # The request model's own bounds and strict types, as pydantic writes them.
    max_tokens = schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"]
    assert {"type": "integer", "exclusiveMinimum": 0} in max_tokens
    ok = chat["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    sse = ok["content"]["text/event-stream"]["schema"]
    chunk_or_error = sse["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"]
    assert chunk_or_error == [{"$ref": f"#/components/schemas/{n}"} for n in ("ChatCompletionChunk", "ErrorBody")]
    assert {REQUEST_ID_HEADER, COST_CREDITS_HEADER, "x-request-id"} <= set(ok["headers"])
    # Every paid answer, a replayed one too, says the router's own time on it.
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if any(p["name"] == IDEMPOTENCY_HEADER for p in operation.get("parameters", ())):
                paid_headers = operation["responses"]["200"]["headers"]
                assert {OVERHEAD_HEADER, REPLAYED_HEADER} <= set(paid_headers), (method, path)
    assert "replayed" in ok["headers"][OVERHEAD_HEADER]["description"]
    assert {p["name"] for p in chat["parameters"]} == {BID_HEADER, IDEMPOTENCY_HEADER}
    for status in ("400", "401", "402", "429", "503"):
        assert chat["responses"][status]["$ref"] == "#/components/responses/Error"
    error = document["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    # The admin and herd bodies the handlers validate with, and the query models.
    join = document["paths"]["/herd/join"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert join == {"$ref": "#/components/schemas/NodeJoin"}
    assert set(schemas["NodeJoin"]["required"]) == {"url", "name", "models", "slots"}
    events = {p["name"]: p for p in document["paths"]["/v1/events"]["get"]["parameters"]}
    assert events["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100} | {
        k: v for k, v in events["limit"]["schema"].items() if k == "description"
    }
    stream = document["paths"]["/admin/stats/stream"]["get"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]


async def test_the_router_serves_its_document_without_a_key(herd: Herd) -> None:
    await herd.add_node(FakeNode("n1"))
    router = await herd.start()
    async with httpx.AsyncClient(base_url=router.url) as anyone:
        resp = await anyone.get("/openapi.json")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    served = resp.json()
    validate(served)
    assert "/v1/chat/completions" in served["paths"] and "/admin/books" in served["paths"]
