"""Schemathesis holds the router to its own OpenAPI document (issue 26, item 1).

A live router on a real SQLite ledger, in front of a fake node that answers in OpenAI's exact shapes, runs in a
thread of its own (schemathesis calls it over HTTP from the test's thread). Every operation of `/openapi.json` is
called with generated requests, valid and invalid, each with the credential its security scheme names: a tenant's
API key, the admin key or the herd token. Each answer must be no 5xx, a documented status, a documented content
type and match its documented schema. Then the books must balance with no hold left open, and the herd must still
serve. `/admin/stats/stream` is left out: it streams until the client leaves, and schemathesis reads to the end.

The seed is fixed and the examples bounded (25 per operation), so the run is the same in CI every time and
takes well under a minute.
`LLAMAKIT_FUZZ_EXAMPLES` raises the bound for the longer run before a release (`make fuzz`), and
`LLAMAKIT_FUZZ_SEED` explores other cases.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from llamakit.router import RouterSettings, create_app
from tests.support.fake_node import HERD_TOKEN, FakeNode, Script
from tests.support.herd import ADMIN_KEY
from tests.support.servers import RunningServer

SEED = int(os.environ.get("LLAMAKIT_FUZZ_SEED", "26"))
EXAMPLES = int(os.environ.get("LLAMAKIT_FUZZ_EXAMPLES", "25"))
NODE = "fuzz-node-7f3a"  # a name no generated path or body will hit by chance, so the herd keeps serving
MODEL = "fake-model"
TENANT = "fuzz-tenant"
# Where a generated /herd/join points the router: a loopback port where nothing listens. The router checks the
# health of every node that joins, and a generated URL could name any host on any network.
NOWHERE = "http://127.0.0.1:9"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class LiveRouter:
    """A router and its fake node served from their own event loop in a background thread."""

    tmp: Path
    url: str = ""
    node: FakeNode = field(default_factory=lambda: FakeNode(NODE, model=MODEL, slots=4, openai_shapes=True))
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> LiveRouter:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # reported to the test's thread below
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="live router", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        node = await RunningServer(self.node.app()).start()
        settings = RouterSettings(
            db=self.tmp / "ledger.db",
            admin_key=ADMIN_KEY,
            herd_token=HERD_TOKEN,
            nodes=[node.url],
            health_interval=0.1,
            base_fee=10,
            prompt_token_fee=1,
            completion_token_fee=2,
        )
        router = await RunningServer(create_app(settings)).start()
        self.url = router.url
        ready.set()
        await self._stop.wait()
        await router.stop()
        await node.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRouter]:
    router = LiveRouter(tmp_path_factory.mktemp("fuzz")).start()
    with httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        for _ in range(200):  # the node's first health check
            if any(n["state"] == "ready" for n in admin.get("/admin/nodes").json()["data"]):
                break
            threading.Event().wait(0.05)
    yield router
    router.stop()


@pytest.fixture(scope="module")
def tenant_key(live: LiveRouter) -> str:
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        made = admin.post("/admin/accounts", json={"name": TENANT, "deposit": 10**13})
        assert made.status_code == 201, made.text
        key: str = made.json()["api_key"]
        return key


@pytest.fixture(scope="module")
def api_schema(live: LiveRouter, tenant_key: str) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES, "with-security-parameters": False},
            "request-timeout": 30,
            "auth": {
                "openapi": {
                    "ApiKey": {"bearer": tenant_key},
                    "AdminKey": {"bearer": ADMIN_KEY},
                    "HerdToken": {"bearer": HERD_TOKEN},
                }
            },
            "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        }
    )
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/admin/stats/stream")


# Path parameters that name what exists, so that these routes do their work rather than answer 404 to a
# generated name: the tenant's account (deposits, keys) and the model served. Not the node (DELETE would take
# it out of the herd), the tenant's key (DELETE would revoke it) or the fees (PUT would price it out).
_AIMED_PATHS = {
    ("POST", "/admin/accounts/{account}/deposits"): {"account": TENANT},
    ("POST", "/admin/accounts/{account}/keys"): {"account": TENANT},
    ("GET", "/admin/accounts/{account}/keys"): {"account": TENANT},
    ("GET", "/admin/accounts/{account}"): {"account": TENANT},
    ("GET", "/v1/models/{model}"): {"model": MODEL},
}


def _aimed(case: schemathesis.Case) -> None:
    """Requests that reach the router's work rather than only its refusals: a generated model name is almost
    never a model served, so a string there names the one that is; a node that joins points at loopback."""
    aimed = _AIMED_PATHS.get((case.method.upper(), case.operation.path))
    if aimed is not None and case.path_parameters is not None:
        case.path_parameters.update(aimed)
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and case.operation.path.startswith("/v1/"):
        body["model"] = MODEL
    if case.operation.path == "/herd/join" and isinstance(body.get("url"), str):
        body["url"] = NOWHERE


# What the run got, by operation and status: the closing test reads it, and the long run prints it.
SEEN: Counter[tuple[str, int]] = Counter()
REASONS: Counter[tuple[str, str]] = Counter()


@schema.parametrize()
def test_every_operation_keeps_to_the_document(case: schemathesis.Case, live: LiveRouter) -> None:
    _aimed(case)
    response = case.call_and_validate(base_url=live.url, checks=CHECKS)
    SEEN[(f"{case.method} {case.operation.path}", response.status_code)] += 1
    if os.environ.get("FUZZ_DEBUG") and response.status_code == 400 and case.operation.path.startswith("/v1/"):
        REASONS[(case.operation.path, response.json()["error"]["message"][:70])] += 1


def test_after_the_run_the_books_balance_no_hold_is_open_and_the_herd_serves(live: LiveRouter, tenant_key: str) -> None:
    report = sorted(SEEN.items())
    print(f"\n{sum(SEEN.values())} calls over {len({op for op, _ in SEEN})} operations:")
    for (operation, status), count in report:
        print(f"  {operation:45} {status}  × {count}")
    for reason, count in REASONS.most_common(40):
        print(count, reason)
    live.node.script = Script(tokens=2)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as admin:
        books = admin.get("/admin/books").json()
        assert books["balanced"] and books["holds"] == 0, books
        states = {n["name"]: n["state"] for n in admin.get("/admin/nodes").json()["data"]}
        assert states[NODE] == "ready", states
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30) as tenant:
        answer = tenant.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code == 200 and answer.json()["object"] == "chat.completion", answer.text
