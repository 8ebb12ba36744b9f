"""Everything the node refuses: no credentials, bad input. Each refusal is OpenAI-shaped and generates nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.node.test_inference import metric

pytestmark = pytest.mark.model


async def test_health_and_metrics_need_no_token(client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=str(client.base_url)) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic dGVzdA=="},
        {"Authorization": "Bearer"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/admin/init"),
    ],
)
async def test_everything_else_needs_the_herd_token(
    client: httpx.AsyncClient, headers: dict[str, str], method: str, path: str
) -> None:
    async with httpx.AsyncClient(base_url=str(client.base_url), headers=headers) as anonymous:
        resp = await anonymous.request(method, path, json={"prompt": "hi", "model": "gemma-3-270m"})
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert error["type"] == "authentication_error"
    assert "herd token" in error["message"]
    assert "test-herd-token" not in resp.text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe{}", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", b'{"prompt": 42}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -0.5}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["a","b","c","d","e"]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "hi", "n": 3}', 400, "n"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "one prompt"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5"}',
        404,
        "gpt-5",
    ),
    ("/v1/completions", b'{"prompt": "hi", "grammar": "root ::= [1-5"}', 400, "GBNF"),
    ("/v1/completions", b'{"prompt": "hi", "grammar": "start ::= \\"a\\""}', 400, "root"),
    (
        "/v1/completions",
        b'{"prompt": "hi", "response_format": '
        b'{"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}}',
        400,
        "schema",
    ),
    ("/v1/completions", b'{"prompt": "hi", "response_format": {"type": "json_schema"}}', 400, "json_schema"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 5000}', 400, "context"),
]


@pytest.mark.parametrize(("path", "body", "status", "says"), BAD_REQUESTS)
async def test_bad_input_is_refused_with_a_clear_error(
    client: httpx.AsyncClient, path: str, body: bytes, status: int, says: str
) -> None:
    before = await metric(client, "llamakit_node_completion_tokens_total")
    resp = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert says.lower() in error["message"].lower(), error["message"]
    assert await metric(client, "llamakit_node_completion_tokens_total") == before
    assert (await client.get("/health")).json()["busy"] == 0


async def test_prompt_longer_than_the_context_names_both_numbers(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "word " * 3000, "max_tokens": 4})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "3001 tokens" in error["message"] and "1024" in error["message"]


async def test_oversized_body_is_413(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024)})
    assert resp.status_code == 413
    assert "too large" in resp.json()["error"]["message"]


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/nothing")).json()["error"]["type"] == "not_found_error"
    resp = await client.get("/v1/completions")
    assert resp.status_code == 405 and "not allowed" in resp.json()["error"]["message"]


async def test_admin_init_refuses_an_unknown_model(client: httpx.AsyncClient) -> None:
    resp = await client.post("/admin/init", json={"model": "no-such-model"})
    assert resp.status_code == 404
    assert "smollm2-135m-instruct" in resp.json()["error"]["message"]
    assert (await client.get("/health")).json()["status"] == "ready"
