"""Headless Chromium for the tests, driven over the DevTools protocol with aiohttp's WebSocket client.

Debian's `chromium` package is the browser (nothing is downloaded); a test that needs it skips where it is
missing. Each `Browser` has a fresh profile directory and its own process group, ended with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["CHROMIUM", "Browser", "BrowserError", "Page"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# The flags that work on a machine with no display, no GPU and no network but loopback.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


class BrowserError(Exception):
    """The browser answered a command with an error, or a page's script threw."""


class Browser:
    """One Chromium process; `page()` opens a tab in it."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        session: aiohttp.ClientSession,
        socket: aiohttp.ClientWebSocketResponse,
    ) -> None:
        self.process, self._session, self.socket = process, session, socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, profile: Path, *, width: int = 1600, height: int = 1000) -> Browser:
        assert CHROMIUM is not None, "no chromium here (apt-get install -y chromium)"
        await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
        with (profile.parent / "chromium.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its helpers too end with it (see close)
            )  # fmt: skip
        # Chromium writes the port it chose, and the browser's WebSocket path, once it listens.
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if process.returncode is not None or time.monotonic() > deadline:
                await _end(process)
                raise BrowserError(f"chromium did not start; see {profile.parent / 'chromium.log'}")
            await asyncio.sleep(0.1)
        port, path = active.read_text().splitlines()[:2]
        session = aiohttp.ClientSession()
        try:
            socket = await session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        except BaseException:
            await session.close()
            await _end(process)
            raise
        return cls(process, session, socket)

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = message.json()
            waiting = self._waiting.pop(data.get("id", -1), None)
            if waiting is not None and not waiting.done():
                waiting.set_result(data)
        for waiting in self._waiting.values():
            waiting.set_exception(BrowserError("the browser closed its DevTools connection"))

    async def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """One DevTools command (to a tab when `session` is given); its result, or BrowserError."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        answer = self._waiting[ident] = asyncio.get_running_loop().create_future()
        await self.socket.send_json(message)
        data = await asyncio.wait_for(answer, 60)
        if "error" in data:
            raise BrowserError(f"{method}: {data['error']}")
        result: dict[str, Any] = data["result"]
        return result

    async def page(self) -> Page:
        target = (await self.send("Target.createTarget", url="about:blank"))["targetId"]
        session = (await self.send("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        page = Page(self, session)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close")
        await self.socket.close()
        await self._session.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await _end(self.process)


class Page:
    """A tab: navigate, run script, wait for a condition, take a screenshot."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, self.session, **params)

    async def before_each_document(self, script: str) -> None:
        """Run `script` in every document this tab loads from now on, before the page's own scripts."""
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=script)

    async def goto(self, url: str) -> None:
        done = await self.send("Page.navigate", url=url)
        if "errorText" in done:
            raise BrowserError(f"cannot open {url}: {done['errorText']}")
        await self.wait_for("document.readyState === 'complete'", f"{url} loaded")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), as JSON brings it back."""
        done = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in done:
            raise BrowserError(f"{expression!r} threw: {done['exceptionDetails']}")
        return done["result"].get("value")

    async def wait_for(self, expression: str, what: str, within: float = 30.0) -> Any:
        """Evaluate `expression` until it is truthy (a page that is navigating away counts as not yet)."""
        deadline = time.monotonic() + within
        last: Any = None
        while True:
            with contextlib.suppress(BrowserError):
                last = await self.evaluate(expression)
                if last:
                    return last
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {what}; last: {last!r}")
            await asyncio.sleep(0.1)

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def type(self, text: str) -> None:
        """Type `text` as keys into what has the focus, one character at a time."""
        for char in text:
            await self.send("Input.dispatchKeyEvent", type="keyDown", key=char, text=char)
            await self.send("Input.dispatchKeyEvent", type="keyUp", key=char)

    async def screenshot(self, path: Path) -> Path:
        done = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(done["data"]))
        return path


async def _end(process: asyncio.subprocess.Process) -> None:
    """End Chromium and its helper processes (its own process group), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
