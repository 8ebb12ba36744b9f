"""Hostile and malformed input to every public route: never a 5xx, always a clear 4xx, and the books untouched.

The router runs on its own event loop in a thread, in front of a scripted fake node, so that hypothesis can
drive it with plain synchronous HTTP calls.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamakit.router import RouterSettings, create_app
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.servers import RunningServer

ADMIN = "fuzz-admin-key"


@dataclass
class Target:
    url: str
    key: str
    admin: httpx.Client
    client: httpx.Client
    node: FakeNode

    def books(self) -> dict[str, Any]:
        books: dict[str, Any] = self.admin.get("/admin/books").json()
        return books


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    node = FakeNode("fuzz-node", slots=64, script=Script(tokens=2))
    tmp: Path = tmp_path_factory.mktemp("fuzz")

    async def start() -> tuple[RunningServer, RunningServer]:
        node_server = await RunningServer(node.app()).start()
        settings = RouterSettings(
            db=tmp / "ledger.db", admin_key=ADMIN, herd_token=HERD_TOKEN, nodes=[node_server.url],
            health_interval=0.1, max_body_bytes=64 * 1024,
        )  # fmt: skip
        router = await RunningServer(create_app(settings)).start()
        return node_server, router

    node_server, router = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    admin = httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    for _ in range(100):
        if admin.get("/health").json()["ready"] == 1:
            break
        threading.Event().wait(0.05)
    key = admin.post("/admin/accounts", json={"name": "fuzzer", "deposit": 10_000_000}).json()["api_key"]
    client = httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    yield Target(router.url, key, admin, client, node)
    books = admin.get("/admin/books").json()
    assert books["balanced"] and books["holds"] == 0, books
    client.close()
    admin.close()
    asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
    asyncio.run_coroutine_threadsafe(node_server.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def assert_clear_refusal(resp: httpx.Response) -> None:
    assert resp.status_code < 500, f"{resp.status_code}: {resp.text[:500]}"
    if resp.status_code >= 400 and not resp.headers.get("content-type", "").startswith("application/json"):
        # Refused by aiohttp's HTTP parser before any handler ran (a control character in a header).
        assert resp.status_code == 400 and "header" in resp.text
    elif resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and len(error["message"]) > 10
        assert error["type"]


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
    "stream_options", "n", "grammar", "response_format", "bid", "max_completion_tokens", "user",
]  # fmt: skip
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_generation_bodies(target: Target, body: dict[str, Any], path: str) -> None:
    before = target.books()
    resp = target.client.post(path, content=json.dumps(body, allow_nan=True))
    assert_clear_refusal(resp)
    after = target.books()
    assert after["holds"] == 0 and after["balanced"]
    if resp.status_code != 200:
        assert after["charges"] == before["charges"], "a refused request was charged"
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        assert resp.text.rstrip().endswith("data: [DONE]")


@SETTINGS
@given(
    bid=st.text(max_size=40) | st.sampled_from(["NaN", "-1", "0.5", "inf", "1e400", "1" * 100, "١", "1_0"]),
    prompt=st.text(max_size=50),
)
def test_bid_headers(target: Target, bid: str, prompt: str) -> None:
    try:
        resp = target.client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, headers={"X-Llamakit-Bid": bid}
        )
    except (httpx.LocalProtocolError, UnicodeEncodeError):
        return  # not a header value any HTTP client can send
    assert_clear_refusal(resp)


@SETTINGS
@given(
    query=st.dictionaries(st.sampled_from(["limit", "before"]) | st.text(max_size=5), st.text(max_size=12), max_size=3)
)
def test_usage_query(target: Target, query: dict[str, str]) -> None:
    assert_clear_refusal(target.client.get("/v1/account/usage", params=query))


@SETTINGS
@given(body=json_values)
def test_event_bodies(target: Target, body: Any) -> None:
    assert_clear_refusal(target.client.post("/v1/events", content=json.dumps(body)))


@pytest.mark.parametrize(
    ("content", "status", "says"),
    [
        (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 413, "too large"),
        (b"[" * 20_000 + b"]" * 20_000, 400, "nested too deeply"),
        (b'{"prompt": "x", "max_tokens": 10000000000000000000000}', 400, "max_tokens"),
        (b'{"prompt": "x", "bid": NaN}', 400, "bid"),
        (b'{"prompt": "x", "bid": -Infinity}', 400, "bid"),
        (b'{"prompt": "x", "bid": -2}', 400, "bid"),
        (b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
        (b'{"prompt": "x", "max_tokens": 2, "surprise": {"deep": [1, 2]}}', 400, "'surprise' is not supported"),
        (b'{"prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
        (b'{"prompt": "x" }' + b" " * 70_000, 413, "too large"),
        # A lone surrogate, as a client that cuts a string inside an emoji sends it: JSON can escape it, UTF-8
        # cannot hold it; served like any other text, and named as sent in a refusal.
        (b'{"prompt": "Hi \\ud800 there", "max_tokens": 2}', 200, ""),
        (b'{"prompt": "Hi", "stop": ["\\udfff"], "max_tokens": 2}', 200, ""),
        (b'{"prompt": "Hi", "max_tokens": 2, "bogus\\ud800": 1}', 400, "is not supported"),
        # Deep enough for the standard library to read, too deep to be written again.
        (b'{"prompt": "x", "max_tokens": 2, "stop": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "more than 128 levels"),
    ],
)
def test_specific_hostile_bodies(target: Target, content: bytes, status: int, says: str) -> None:
    before = target.books()
    resp = target.client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text[:300]
    if status != 200:
        assert says.lower() in resp.json()["error"]["message"].lower()
        assert target.books()["charges"] == before["charges"]
