"""`llamakit-tui --serve` over HTTP: every route refuses without the admin key; the sign-in form gives a session
cookie that opens the page; the dashboard's WebSocket answers only its own page; wrong keys from one address are
limited. (The page in a browser is in test_browser.py.)"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest

from llamakit.cli.up import CannotStart, Launcher, UpOptions
from llamakit.tui._cli import build_parser, main
from llamakit.tui._serve import COOKIE, DashboardServer
from llamakit.tui._sign_in_limit import SignInLimit, client_address
from tests.support.ports import free_port, taken_port
from tests.support.servers import RunningServer
from tests.tui.conftest import ADMIN_KEY

ROUTER = "http://127.0.0.1:9"  # never called: no browser opens the dashboard's WebSocket here
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.fixture
async def served() -> AsyncIterator[tuple[DashboardServer, RunningServer]]:
    # Room for every route's wrong keys: the limit on them has tests of its own (`limited`).
    limit = SignInLimit(max_failures=1000)
    server = DashboardServer(url=ROUTER, admin_key=ADMIN_KEY, host="127.0.0.1", port=0, sign_in_limit=limit)
    running = await RunningServer(await server._make_app()).start()
    yield server, running
    await running.stop()


class Clock:
    """The sign-in limit's clock, moved by the test: no test waits for a window to pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def limited() -> AsyncIterator[tuple[RunningServer, Clock]]:
    clock = Clock()
    limit = SignInLimit(max_failures=3, window=300, clock=clock)
    server = DashboardServer(url=ROUTER, admin_key=ADMIN_KEY, host="127.0.0.1", port=0, sign_in_limit=limit)
    running = await RunningServer(await server._make_app()).start()
    yield running, clock
    await running.stop()


async def sign_in(url: str, key: str, *, source: str = "127.0.0.1", **headers: str) -> httpx.Response:
    """The sign-in form sent with `key` from the loopback address `source`, from a client of its own (so no cookie
    jar carries the answer on)."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=url, transport=transport) as client:
        return await client.post("/login", data={"key": key}, headers=headers)


def session(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


def every_route(server: RunningServer) -> list[tuple[str, str]]:
    """(method, path) for each route of the app, with a value in each placeholder."""
    found = []
    for resource in server.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter") or f"{info['prefix']}/js/textual.js"
        path = re.sub(r"\{[^}]+\}", "x", path)
        found += [(route.method, path) for route in resource if route.method != "HEAD"]
    return found


async def test_every_route_refuses_without_the_admin_key(served: tuple[DashboardServer, RunningServer]) -> None:
    _, running = served
    routes = every_route(running)
    assert {path for _, path in routes} >= {"/", "/ws", "/login", "/static/js/textual.js", "/download/x"}
    async with httpx.AsyncClient(base_url=running.url) as client:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer lka-not-the-key"}, {"Cookie": f"{COOKIE}=made-up"}):
                answer = await client.request(method, path, headers=headers | (UPGRADE if path == "/ws" else {}))
                assert answer.status_code == 401, (method, path, headers, answer.status_code)
                assert "textual-terminal" not in answer.text and "/ws" not in answer.text
        page = await client.get("/")
        assert "Admin key" in page.text and ROUTER in page.text and 'type="password"' in page.text
        # The key itself opens every route (curl, or a proxy in front that adds it).
        bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert (await client.get("/", headers=bearer)).status_code == 200
        assert (await client.get("/static/js/textual.js", headers=bearer)).status_code == 200
        # The address the browser used is written into the page: a Host that is not one gets a 400.
        for host in ('x"><script>alert(1)</script>', "dash.example:99999", "dash.example:port", "a b"):
            assert (await client.get("/", headers=bearer | {"Host": host})).status_code == 400, host
        assert (await client.get("/", headers=bearer | {"Host": "[::1]:8000"})).status_code == 200


async def test_signing_in_gives_a_session_cookie_that_opens_the_page(
    served: tuple[DashboardServer, RunningServer],
) -> None:
    server, running = served
    async with httpx.AsyncClient(base_url=running.url) as client:
        wrong = await sign_in(running.url, "lka-not-the-key")
        assert wrong.status_code == 401 and "not the admin key" in wrong.text
        assert COOKIE not in wrong.headers.get("set-cookie", "")

        signed_in = await sign_in(running.url, ADMIN_KEY)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
        set_cookie = signed_in.headers["set-cookie"]
        morsel = SimpleCookie(set_cookie)[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
        assert not morsel["secure"]  # plain http here; over https (or behind a TLS proxy) it is Secure
        assert int(morsel["max-age"]) > 0
        token = morsel.value
        assert ADMIN_KEY not in set_cookie and token not in ADMIN_KEY

        page = await client.get("/", headers=session(token))
        assert page.status_code == 200 and "textual-terminal" in page.text
        # The page's WebSocket and static files are where the browser reached it, whatever the name or tunnel.
        port = running.url.rsplit(":", 1)[1]
        assert f"ws://127.0.0.1:{port}/ws" in page.text and f"http://127.0.0.1:{port}/static/" in page.text
        proxied = await client.get(
            "/", headers=session(token) | {"Host": "dash.example:9443", "X-Forwarded-Proto": "https"}
        )
        assert "wss://dash.example:9443/ws" in proxied.text
        assert (await client.get("/static/js/textual.js", headers=session(token))).status_code == 200

        over_https = await sign_in(running.url, ADMIN_KEY, **{"X-Forwarded-Proto": "https"})
        assert SimpleCookie(over_https.headers["set-cookie"])[COOKIE]["secure"]

        # A session ends: the page asks for the key again.
        server._sessions[token] = 0.0
        assert (await client.get("/", headers=session(token))).status_code == 401


async def test_the_websocket_answers_only_its_own_page(served: tuple[DashboardServer, RunningServer]) -> None:
    _, running = served
    async with httpx.AsyncClient(base_url=running.url) as client:
        signed_in = await sign_in(running.url, ADMIN_KEY)
        token = SimpleCookie(signed_in.headers["set-cookie"])[COOKIE].value
        # A page of another site that gets the browser to open the WebSocket with its cookie is refused.
        other = await client.get("/ws", headers=session(token) | UPGRADE | {"Origin": "http://evil.example"})
        assert other.status_code == 403
        assert (await client.get("/ws", headers=UPGRADE | {"Origin": running.url})).status_code == 401


async def test_wrong_keys_from_one_address_lock_it_out_until_the_window_passes(
    limited: tuple[RunningServer, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    running, clock = limited
    url = running.url
    signed_in = await sign_in(url, ADMIN_KEY)
    token = SimpleCookie(signed_in.headers["set-cookie"])[COOKIE].value
    caplog.set_level(logging.WARNING, logger="llamakit.tui.serve")
    for _ in range(3):  # at 1010, 1020, 1030
        clock.now += 10
        assert (await sign_in(url, "lka-not-the-key")).status_code == 401
    # Locked out: the right key too, on the form and as a Bearer, so that it cannot be guessed through the lockout.
    refused = await sign_in(url, ADMIN_KEY)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "280"  # 300 s after 1010
    assert "Too many wrong keys from your address: try again in 280 s." in refused.text
    assert COOKIE not in refused.headers.get("set-cookie", "")
    async with httpx.AsyncClient(base_url=url) as client:
        bearer = await client.get("/", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert bearer.status_code == 429 and bearer.headers["Retry-After"] == "280"
        assert "textual-terminal" not in bearer.text
        # A browser signed in before keeps its session: a session token is not a key anyone can guess.
        assert (await client.get("/", headers=session(token))).status_code == 200
    refusals = [r for r in caplog.records if r.levelno == logging.WARNING and "refused an admin key" in r.message]
    assert len(refusals) == 2 and all("127.0.0.1" in r.message for r in refusals)
    assert ADMIN_KEY not in caplog.text and "lka-not-the-key" not in caplog.text
    # Another address is not locked out.
    assert (await sign_in(url, ADMIN_KEY, source="127.0.0.2")).status_code == 303
    # Once the first wrong key is 300 s old, the address may try again; no more than 3 wrong keys in any 300 s.
    clock.now = 1309
    assert (await sign_in(url, ADMIN_KEY)).status_code == 429
    clock.now = 1310
    assert (await sign_in(url, ADMIN_KEY)).status_code == 303
    again = await sign_in(url, "lka-not-the-key")
    assert again.status_code == 401
    assert (await sign_in(url, "lka-not-the-key")).headers["Retry-After"] == "10"  # 300 s after 1020


async def test_wrong_bearer_keys_count_as_wrong_sign_ins(limited: tuple[RunningServer, Clock]) -> None:
    running, _clock = limited
    async with httpx.AsyncClient(base_url=running.url) as client:
        for path in ("/", "/static/js/textual.js", "/ws"):
            assert (await client.get(path, headers={"Authorization": "Bearer guess"})).status_code == 401
        # No key at all is no guess: not counted, and still a 401 (the page's form) while locked out.
        assert (await client.get("/")).status_code == 401
        assert (await client.get("/", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).status_code == 429
    assert (await sign_in(running.url, ADMIN_KEY)).status_code == 429


def test_the_limit_remembers_a_bounded_number_of_addresses_and_forgets_old_ones() -> None:
    clock = Clock()
    limit = SignInLimit(max_failures=2, window=60, max_addresses=100, clock=clock)
    for n in range(1000):
        assert limit.failed(f"10.0.{n // 256}.{n % 256}") == 0
    assert len(limit) == 100  # the least recently failing went first
    limit.failed("10.0.3.231")
    assert limit.retry_after("10.0.3.231") == 60 and limit.retry_after("10.0.0.0") == 0
    clock.now += 60
    assert limit.retry_after("10.0.3.231") == 0 and len(limit) == 0  # none failed within the window
    with pytest.raises(ValueError, match="at least 1 failure"):
        SignInLimit(max_failures=0)


def test_an_ipv6_client_is_counted_by_its_64_and_a_mapped_ipv4_one_by_its_address() -> None:
    assert client_address("2001:db8:1:2:aaaa::1") == client_address("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_address("2001:db8:1:3::1") != client_address("2001:db8:1:2::1")
    assert client_address("::ffff:192.0.2.7") == client_address("192.0.2.7") == "192.0.2.7"
    assert client_address("fe80::1%eth0") == "fe80::/64"
    assert client_address(None) == "unknown"


def test_the_sign_in_limit_is_set_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = build_parser().parse_args(["--serve"])
    assert (defaults.max_sign_in_failures, defaults.sign_in_window) == (10, 300.0)
    args = build_parser().parse_args(["--serve", "--max-sign-in-failures", "5", "--sign-in-window", "60"])
    assert (args.max_sign_in_failures, args.sign_in_window) == (5, 60.0)
    for flag, value in (("--max-sign-in-failures", "0"), ("--sign-in-window", "0"), ("--sign-in-window", "nan")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--serve", flag, value])
    served: dict[str, object] = {}
    monkeypatch.setattr("llamakit.tui._serve.serve_dashboard", lambda **kwargs: served.update(kwargs))
    monkeypatch.setenv("LLAMAKIT_URL", ROUTER)
    monkeypatch.setenv("LLAMAKIT_ADMIN_KEY", ADMIN_KEY)
    main(["--serve", "--max-sign-in-failures", "5", "--sign-in-window", "60"])
    assert (served["max_sign_in_failures"], served["sign_in_window"]) == (5, 60.0)


def test_llamakit_up_refuses_a_dashboard_port_that_is_taken(tmp_path: Path) -> None:
    router = free_port("127.0.0.1")
    with taken_port() as port:
        options = UpOptions(state_dir=tmp_path, port=router, dashboard_port=port, profile=tmp_path / "profile.json")
        with pytest.raises(CannotStart, match=rf"127\.0\.0\.1:{port} .*another herd's dashboard\? Pick another "):
            Launcher(options)
    options.dashboard_port = router
    with pytest.raises(CannotStart, match="cannot share the router's port"):
        Launcher(options)


def test_the_port_of_the_page_is_a_port(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAKIT_")}
    env |= {"LLAMAKIT_URL": ROUTER, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "llamakit.tui", "--serve", "--port", "70000"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "a port is a number from 1 to 65535, not '70000'" in done.stderr
