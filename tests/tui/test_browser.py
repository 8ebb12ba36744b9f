"""As an operator would: the dashboard that `llamakit-tui --serve` serves, opened in headless Chromium, against a
live router with a fake node; and beside a real herd under `llamakit up --serve-dashboard`.

What the page's terminal shows is read from xterm.js's own screen buffer (the text it paints), and a screenshot
of the tab is taken and looked at; `LLAMAKIT_SCREENSHOTS=DIR` keeps the screenshots there (else in tmp_path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.test_up_restarts import children
from tests.support.fake_node import FakeNode
from tests.support.herd import Herd
from tests.tui.browser import CHROMIUM, Browser, Page
from tests.tui.conftest import ADMIN_KEY, free_port

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium) so no browser to look with"
)

# textual.js keeps its xterm.js terminal to itself: catch it as it is made (it sets `fitAddon` on itself first),
# so that the test can read the screen the page paints.
CATCH_TERMINAL = """
Object.defineProperty(Object.prototype, "fitAddon", {
  configurable: true,
  set(value) {
    Object.defineProperty(this, "fitAddon", {value, writable: true, configurable: true, enumerable: true});
    window.llamakitTerminal = this.terminal;
  },
});
"""
# The rows the terminal shows, as text (empty before the page's terminal exists).
SCREEN = """(() => {
  const t = window.llamakitTerminal;
  if (!t) return "";
  const buffer = t.buffer.active, rows = [];
  for (let i = 0; i < t.rows; i++) {
    const line = buffer.getLine(buffer.viewportY + i);
    rows.push(line ? line.translateToString(true) : "");
  }
  return rows.join("\\n");
})()"""


def screen_showing(*texts: str) -> str:
    """A script whose value is the terminal's screen once it shows every one of `texts` (else false)."""
    checks = " && ".join(f"s.includes({json.dumps(text)})" for text in texts)
    return f"(() => {{ const s = {SCREEN}; return {checks} && s; }})()"


class Dashboard:
    """`llamakit-tui --serve` as its own process, as an operator starts it."""

    def __init__(self, router: str, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router, self.tmp = router, tmp
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAKIT_")}
        env |= {"LLAMAKIT_PROFILE": str(self.tmp / "none.json"), "LLAMAKIT_ADMIN_KEY": ADMIN_KEY}
        tui = Path(sys.executable).parent / "llamakit-tui"
        program = [str(tui)] if tui.exists() else [sys.executable, "-m", "llamakit.tui"]
        args = ["--serve", "--port", str(self.port), "--url", self.router, "--interval", "0.5"]
        with (self.tmp / "serve.log").open("w") as log:
            self.process = await asyncio.create_subprocess_exec(
                *program, *args, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                assert self.process.returncode is None, (self.tmp / "serve.log").read_text()
                try:
                    await client.get(self.url)
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        raise AssertionError(f"llamakit-tui --serve never answered: {(self.tmp / 'serve.log').read_text()}")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    chromium = await Browser.start(tmp_path / "chromium-profile")
    yield chromium
    await chromium.close()


async def sign_in(page: Page, key: str) -> None:
    """Type `key` into the sign-in form and send it; returns once the browser shows the answer."""
    await page.evaluate("window.beforeSignIn = true; document.querySelector('#key').focus()")
    await page.type(key)
    await page.evaluate("document.querySelector('button[type=submit]').click()")
    await page.wait_for("!window.beforeSignIn && document.readyState === 'complete'", "the answer to the sign-in")


async def test_the_dashboard_in_a_browser(herd: Herd, browser: Browser, tmp_path: Path) -> None:
    await herd.add_node(FakeNode("alpha", slots=2))
    router = await herd.start()
    alice = await herd.account("alice", 100_000)
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3}
    done = await alice.post("/v1/completions", json=body)
    assert done.status_code == 200
    earned = done.json()["usage"]["cost_credits"]
    await alice.aclose()

    dashboard = Dashboard(router.url, tmp_path)
    await dashboard.start()
    try:
        page = await browser.page()
        await page.before_each_document(CATCH_TERMINAL)

        # Without the admin key the browser gets the sign-in form, and no dashboard; a wrong key, the same.
        await page.goto(dashboard.url)
        text = await page.evaluate("document.body.innerText")
        assert "Admin key" in text and router.url in text, text
        assert await page.evaluate("document.querySelector('.textual-terminal') === null")
        await sign_in(page, "lka-not-the-key")
        assert "not the admin key" in await page.evaluate("document.body.innerText")
        shots = Path(os.environ.get("LLAMAKIT_SCREENSHOTS") or tmp_path)
        print(f"screenshot: {await page.screenshot(shots / 'dashboard-sign-in-refused.png')}")
        assert await page.evaluate("document.querySelector('.textual-terminal') === null")
        assert await page.evaluate("document.cookie") == ""  # and the session cookie is not for scripts

        await sign_in(page, ADMIN_KEY)
        screen = await page.wait_for(screen_showing("alpha", "books balance"), "the herd with alpha, and the fees")
        assert await page.evaluate("document.cookie") == ""
        # Every panel by its title, the router's address in the header.
        for title in ("Herd", "Queue", "Fees", "Agents", "Accounts", "Refusals", "Requests"):
            assert f"─ {title} ─" in screen, screen
        assert f"llamakit — {router.url}" in screen, screen
        # The herd table: alpha serves fake-model, ready, none of its 2 slots busy, and has earned the fee.
        header = next(line for line in screen.splitlines() if "Busy/slots" in line)
        assert re.split(r"\s{2,}", header.strip("│ ")) == [
            "Node", "Models", "State", "Busy/slots", "tok/s", "Requests", "Fees earned", "Last seen"
        ], header  # fmt: skip
        row = next(line for line in screen.splitlines() if "alpha" in line)
        cells = re.split(r"\s{2,}", row.strip("│ "))
        assert cells[:3] == ["alpha", "fake-model", "ready"] and "0/2" in cells, row
        assert cells[-2] == str(earned), row  # fees earned, then last seen
        # The fees: what alice's request was charged, and the credit's value in the operator's currency.
        assert re.search(rf"│ earned +{earned} +│", screen), screen
        assert "in USD" in screen and "credits · 1 = 0.000001 USD" in screen, screen

        # A click gives the page's terminal the focus: the footer shows the keys, and they work.
        await page.click(400, 400)
        await page.wait_for(screen_showing("Quit", "Pause", "Drain node"), "the keys in the footer")
        await page.type("p")
        await page.wait_for(screen_showing("PAUSED"), "the dashboard paused")
        await page.type("p")
        await page.wait_for(f"!{SCREEN}.includes('PAUSED')", "the dashboard resumed")

        shot = await page.screenshot(shots / "dashboard-in-chromium.png")
        print(f"screenshot: {shot}")
        # The screenshot shows the terminal the page painted (not the page's intro or a blank tab).
        assert await page.evaluate("document.body.classList.contains('-first-byte')")
        viewport = await page.evaluate("[innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]")
        with Image.open(shot) as picture:
            assert list(picture.size) == viewport
            colours = picture.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is not None and len(colours) > 20, "the screenshot is (nearly) one colour"
    finally:
        await dashboard.stop()


@pytest.mark.model
async def test_llamakit_up_serves_the_dashboard_and_keeps_it_up(browser: Browser, tmp_path: Path) -> None:
    from llamakit.catalog import DEFAULT_MODEL

    port, web = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAKIT_")}
    env |= {"LLAMAKIT_PROFILE": str(tmp_path / "profile.json"), "LLAMAKIT_STATE_DIR": str(tmp_path / "state")}
    with (tmp_path / "up.log").open("w") as log:
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llamakit.cli", "up", "--port", str(port), "--model", DEFAULT_MODEL,
            "--slots", "1", "--threads", "1", "--headless", "--serve-dashboard", str(web),
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def said(text: str, within: float) -> str:
        deadline = time.monotonic() + within
        while text not in (out := (tmp_path / "up.log").read_text()):
            assert up.returncode is None and time.monotonic() < deadline, out
            await asyncio.sleep(0.2)
        return out

    try:
        out = await said("Ctrl-C stops the herd", 240)
        url = f"http://127.0.0.1:{web}/"
        assert f"The dashboard in a browser: {url} (sign in with the admin key" in out, out
        admin_key = json.loads((tmp_path / "profile.json").read_text())["admin_key"]
        async with httpx.AsyncClient() as client:
            for _ in range(100):  # it may still be starting
                with contextlib.suppress(httpx.TransportError):
                    refused = await client.get(url)
                    break
                await asyncio.sleep(0.1)
            assert refused.status_code == 401 and "Admin key" in refused.text

        page = await browser.page()
        await page.before_each_document(CATCH_TERMINAL)
        await page.goto(url)
        await sign_in(page, admin_key)
        screen = await page.wait_for(screen_showing(DEFAULT_MODEL[:12], "ready"), "the herd's node ready")
        assert f"llamakit — http://127.0.0.1:{port}" in screen, screen

        # The dashboard server dies: `llamakit up` starts it again, as it does a node; the herd stays. The open
        # page's own dashboard process, which the dead server can no longer stop, quits by itself.
        parts = children(up.pid, "llamakit.")
        [server] = children(up.pid, "llamakit.tui")
        [tab] = children(server, "llamakit.tui")
        os.kill(server, signal.SIGKILL)
        await said("dashboard started again", 30)
        deadline = time.monotonic() + 30
        while running(tab):
            assert time.monotonic() < deadline, "the dead server's dashboard process is still running"
            await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    refused = await client.get(url)
                    break
                await asyncio.sleep(0.1)
            assert refused.status_code == 401
            assert (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
        parts += children(up.pid, "llamakit.tui")  # the new dashboard server
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
            await asyncio.wait_for(up.wait(), 30)
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    # The router, the node and both dashboard servers are gone.
    assert len(parts) == 4 and not any(running(pid) for pid in parts), parts


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
