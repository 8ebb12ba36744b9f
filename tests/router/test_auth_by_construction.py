"""Auth by construction: every route the router registers is public by name, or refuses a request that brings no
credential. Every route under `/admin/` or `/herd/` belongs to that part's sub-application, behind the one
middleware that checks the part's credential, and refuses a missing, a wrong and a tenant's credential.

The tests walk the built app's routes, so a route added later is tried without a change here: one that skips its
part's middleware (registered on the root app, or on a part without it) fails them, and so does one that is
neither public by name nor behind a credential.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
from aiohttp import web

from llamakit.router import RouterSettings, create_app
from llamakit.router.auth import admin_key_required, herd_token_required
from tests.router.test_refusals_and_metrics import samples, value
from tests.support.fake_node import HERD_TOKEN
from tests.support.herd import ADMIN_KEY, Herd

# Routes anyone may call: the only ones that answer without a credential.
PUBLIC = {
    (method, path)
    for method in ("GET", "HEAD")
    for path in ("/health", "/ready", "/live", "/metrics", "/v1/info", "/openapi.json")
}

# The admin and herd routes there were when the parts became sub-applications (each GET has a HEAD beside it).
# The walks below cover any route added since; these only keep a walk from passing on finding none.
KNOWN_ADMIN = {
    ("GET", "/admin/accounts"), ("POST", "/admin/accounts"), ("GET", "/admin/accounts/{account}"),
    ("POST", "/admin/accounts/{account}/deposits"), ("POST", "/admin/accounts/{account}/keys"),
    ("GET", "/admin/accounts/{account}/keys"), ("GET", "/admin/keys/{key}"), ("PATCH", "/admin/keys/{key}"),
    ("DELETE", "/admin/keys/{key}"), ("GET", "/admin/fees"), ("PUT", "/admin/fees/{model}"),
    ("DELETE", "/admin/fees/{model}"), ("GET", "/admin/nodes"), ("POST", "/admin/nodes/{node}/drain"),
    ("POST", "/admin/nodes/{node}/undrain"), ("DELETE", "/admin/nodes/{node}"), ("GET", "/admin/stats"),
    ("GET", "/admin/stats/stream"), ("GET", "/admin/books"), ("GET", "/admin/usage"),
}  # fmt: skip
KNOWN_HERD = {("POST", "/herd/join"), ("POST", "/herd/heartbeat"), ("POST", "/herd/leave")}

# Each part: its mount point, the middleware that guards it, its secret and the name its refusals give it.
PARTS = {
    "/admin/": (admin_key_required, ADMIN_KEY, "admin key"),
    "/herd/": (herd_token_required, HERD_TOKEN, "herd token"),
}


def part_of(path: str) -> str | None:
    return next((prefix for prefix in PARTS if path.startswith(prefix)), None)


def walk(app: web.Application) -> Iterator[tuple[str, str, web.Application]]:
    """(method, path template, the application that serves it) of every route `app` registers, the routes of its
    sub-applications (and theirs) included."""
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            yield from walk(resource.get_info()["app"])
        else:
            yield from ((route.method, resource.canonical, app) for route in resource)


def missing(what: str) -> dict[str, object]:
    message = f"missing credentials: send 'Authorization: Bearer <{what}>'"
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "missing_credentials"}}


def invalid(what: str) -> dict[str, object]:
    message = f"the {what} is not valid"
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_credentials"}}


def test_every_admin_and_herd_route_is_its_parts_behind_its_middleware() -> None:
    app = create_app(RouterSettings(db=":memory:"))
    routes = list(walk(app))
    assert {(m, p) for m, p, _ in routes} == {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.resource
    }
    mounted = {
        resource.canonical + "/": resource.get_info()["app"]
        for resource in app.router.resources()
        if isinstance(resource, web.PrefixedSubAppResource)
    }
    for mount, (guard, _, _) in PARTS.items():
        assert list(mounted[mount].middlewares) == [guard], f"the part at {mount} must be behind {guard.__name__} alone"
    for method, path, owner in routes:
        prefix = part_of(path)
        if prefix is None:
            assert owner is app, (method, path, "a route outside the parts is the root app's")
        else:
            assert owner is mounted[prefix], (method, path, f"a route under {prefix} skips its part's middleware")
    served = {(m, p) for m, p, _ in routes}
    assert served >= KNOWN_ADMIN | KNOWN_HERD
    assert {("HEAD", p) for m, p in KNOWN_ADMIN if m == "GET"} <= served


async def test_every_route_is_public_or_refuses_without_its_credential(herd: Herd) -> None:
    router = await herd.start()
    alice = await herd.account("alice", 100)
    tenant = alice.headers["Authorization"].removeprefix("Bearer ")
    refused: dict[str, set[tuple[str, str]]] = {prefix: set() for prefix in PARTS}
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:

        async def call(method: str, path: str, authorization: str | None) -> httpx.Response:
            headers = {} if authorization is None else {"Authorization": authorization}
            body: dict[str, object] | None = None if method in ("GET", "HEAD") else {}
            # A stream (the live stats) is left at its status line: only whether the door opened is asked here.
            async with client.stream(method, path, headers=headers, json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                return resp

        for route in router.app.router.routes():
            assert route.resource is not None
            method, template = route.method, route.resource.canonical
            path = re.sub(r"\{[^}]+\}", "x", template)
            if (method, template) in PUBLIC:
                assert (await call(method, path, None)).status_code == 200, (method, path)
                continue
            resp = await call(method, path, None)
            assert resp.status_code == 401, (method, path, "neither public nor behind a credential", resp.text)
            if method != "HEAD":
                assert resp.json()["error"]["type"] == "authentication_error", (method, path, resp.text)
            prefix = part_of(template)
            if prefix is None:
                continue  # the paid API: its API key is checked by api.authenticate
            _, secret, what = PARTS[prefix]
            others = [s for _, s, _ in PARTS.values() if s != secret]
            for authorization, expected in [
                (None, missing(what)),
                ("Bearer", missing(what)),
                (f"Basic {secret}", missing(what)),
                (f"Bearer {secret}x", invalid(what)),
                (f"Bearer {secret[:-1]}", invalid(what)),
                (f"Bearer {tenant}", invalid(what)),  # a tenant's API key, a valid one
                *((f"Bearer {other}", invalid(what)) for other in others),  # the other part's secret
            ]:
                resp = await call(method, path, authorization)
                assert resp.status_code == 401, (method, path, authorization, resp.text)
                assert "WWW-Authenticate" not in resp.headers
                if method != "HEAD":
                    assert resp.json() == expected, (method, path, authorization)
            # The refusals were the door's: the part's own secret opens it, and the handler behind it answers (it
            # may refuse these made-up calls, but not fail: a 500 is, say, a handler reading `request.app[STATE]`,
            # which a sub-application does not hold; it reads `request.config_dict[STATE]`).
            resp = await call(method, path, f"Bearer {secret}")
            assert resp.status_code != 401 and resp.status_code < 500, (method, path, resp.text)
            refused[prefix].add((method, template))
    assert refused["/admin/"] >= KNOWN_ADMIN and refused["/herd/"] >= KNOWN_HERD
    await alice.aclose()


async def test_the_parts_errors_come_out_of_the_root_apps_middlewares(herd: Herd) -> None:
    router = await herd.start(max_body_bytes=1024)
    assert herd.admin is not None
    before = await samples(herd)
    admin, node = {"Authorization": f"Bearer {ADMIN_KEY}"}, {"Authorization": f"Bearer {HERD_TOKEN}"}
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
        # The guard's refusal: OpenAI-shaped, with the x-request-id every response has, and counted.
        resp = await client.get("/admin/stats")
        assert resp.status_code == 401 and resp.json() == missing("admin key")
        assert resp.headers["x-request-id"].startswith("req-")
        resp = await client.post("/herd/join", json={}, headers={"Authorization": "Bearer nope-nope"})
        assert resp.status_code == 401 and resp.json() == invalid("herd token")
        # A path or a method a part has no route for is the 404 or 405 it always was, whatever the credential.
        for headers in ({}, admin, node):
            for method, path in (("GET", "/admin/nope"), ("GET", "/admin"), ("GET", "/admin/"), ("POST", "/herd/x")):
                resp = await client.request(method, path, headers=headers)
                assert resp.status_code == 404, (method, path, resp.text)
                assert resp.json()["error"] == {
                    "message": f"there is no route {method} {path}",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            for method, path, allow in (("PATCH", "/admin/accounts", "GET,HEAD,POST"), ("GET", "/herd/join", "POST")):
                resp = await client.request(method, path, headers=headers)
                assert resp.status_code == 405 and resp.headers["Allow"] == allow, (method, path, resp.text)
                assert resp.json()["error"]["message"] == f"{method} is not allowed on {path}"
                assert resp.json()["error"]["type"] == "invalid_request_error"
        # A handler's own refusal inside a part, and a body too large for the router (its limit, not the part's).
        resp = await client.get("/admin/accounts/nobody", headers=admin)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "account_not_found"
        resp = await client.post("/admin/accounts", content=b"x" * 2048, headers=admin)
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["message"] == "the request body is too large (the limit is 1024 bytes)"
        resp = await client.post("/admin/accounts", content=b"x" * 2048)  # the door is checked before the body
        assert resp.status_code == 401 and resp.json() == missing("admin key")
    after = await samples(herd)
    for code, count in (("missing_credentials", 2), ("invalid_credentials", 1)):
        was = value(before, "llamakit_router_refusals_total", status="401", code=code) or 0
        assert value(after, "llamakit_router_refusals_total", status="401", code=code) == was + count
    assert value(after, "llamakit_router_refusals_total", status="404", code="account_not_found") == 1
