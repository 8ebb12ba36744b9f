"""As an operator would: `llamakit-tui --serve` opened in headless Chromium, against a live router with a fake node.

What the page's terminal shows is read from xterm.js's own screen buffer (the text it paints), and a screenshot
of the tab is taken and looked at; `LLAMAKIT_SCREENSHOTS=DIR` keeps it there (else in the test's tmp_path).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.router.conftest import Herd
from tests.router.fake_node import FakeNode
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
# The rows the terminal shows, as text (undefined before the page's terminal exists).
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
    await page.evaluate(
        f"window.beforeSignIn = true; document.querySelector('#key').value = {key!r}; "
        "document.querySelector('form').requestSubmit()"
    )
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
        assert await page.evaluate("document.querySelector('.textual-terminal') === null")
        assert await page.evaluate("document.cookie") == ""  # and the session cookie is not for scripts

        await sign_in(page, ADMIN_KEY)
        screen = await page.wait_for(
            f"(() => {{ const s = {SCREEN}; return s.includes('alpha') && s.includes('books balance') && s; }})()",
            "the herd with alpha, and the fees",
        )
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

        shots = Path(os.environ.get("LLAMAKIT_SCREENSHOTS") or tmp_path)
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
