"""Once as a person would: `llamakit-tui` in a real terminal (tmux, 120x40) against a running router.

The router runs as its own process (`python -m llamakit.router`) in front of a fake node; keys are typed
with `tmux send-keys` and what the terminal shows is read with `tmux capture-pane`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fake_node import HERD_TOKEN, FakeNode
from tests.support.ports import free_port
from tests.support.servers import RunningServer
from tests.tui.conftest import ADMIN_KEY

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux) so no terminal to look at"
)


@dataclass
class Terminal:
    """A detached tmux session on a private server socket, so no one else's tmux is touched."""

    socket: str
    session: str = "tui"

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)

    def start(self, command: str) -> None:
        done = self.tmux("new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command)
        assert done.returncode == 0, done.stderr

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session).stdout

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.session).returncode == 0

    async def wait_for(self, check: Callable[[str], bool], what: str, within: float = 15.0) -> str:
        deadline = time.monotonic() + within
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the terminal never showed {what}; it shows:\n{screen}")
            await asyncio.sleep(0.1)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal(socket=f"llamakit-test-{os.getpid()}")
    yield term
    term.tmux("kill-server")


async def test_the_dashboard_in_a_terminal(tmp_path: Path, terminal: Terminal) -> None:
    node = await RunningServer(FakeNode("alpha", slots=2).app()).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LLAMAKIT_ADMIN_KEY": ADMIN_KEY, "LLAMAKIT_HERD_TOKEN": HERD_TOKEN}
    with (tmp_path / "router.log").open("w") as log:
        router = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llamakit.router", "--port", str(port), "--db", str(tmp_path / "ledger.db"),
            "--node", node.url, "--health-interval", "0.2",
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    admin = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    try:
        for _ in range(100):
            try:
                if (await admin.get("/health")).json().get("ready") == 1:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        key = (await admin.post("/admin/accounts", json={"name": "alice", "deposit": 10_000})).json()["api_key"]
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as alice:
            body = {"model": "fake-model", "prompt": "hello", "max_tokens": 3}
            assert (await alice.post("/v1/completions", json=body)).status_code == 200

        tui = Path(sys.executable).parent / "llamakit-tui"
        program = shlex.quote(str(tui)) if tui.exists() else f"{shlex.quote(sys.executable)} -m llamakit.tui"
        # COLUMNS and LINES would override the terminal's real size; tmux can hand stale ones down.
        terminal.start(
            f"env -u COLUMNS -u LINES TERM=xterm-256color LLAMAKIT_PROFILE={shlex.quote(str(tmp_path / 'none.json'))} "
            f"LLAMAKIT_URL={url} LLAMAKIT_ADMIN_KEY={ADMIN_KEY} {program}"
        )

        screen = await terminal.wait_for(lambda s: "alpha" in s and "ready" in s, "alpha ready")
        for heading in ("Herd", "Queue", "Fees", "Agents", "Accounts", "Refusals", "Requests", "Busy/slots", "TTFT"):
            assert heading in screen, screen
        assert url in screen
        await terminal.wait_for(lambda s: "alice" in s and "fake-model" in s, "alice's request in the log")

        terminal.keys("?")
        await terminal.wait_for(lambda s: "the operator's live view" in s, "the help")
        terminal.keys("Escape")
        await terminal.wait_for(lambda s: "the operator's live view" not in s, "the help closed")

        terminal.keys("p")
        await terminal.wait_for(lambda s: "PAUSED" in s, "paused")
        terminal.keys("p")
        await terminal.wait_for(lambda s: "PAUSED" not in s, "resumed")

        terminal.keys("d")
        await terminal.wait_for(lambda s: "Drain node alpha?" in s, "the drain question")
        terminal.keys("y")
        await terminal.wait_for(lambda s: "draining" in s, "alpha draining")
        nodes = (await admin.get("/admin/nodes")).json()["data"]
        assert [(n["name"], n["state"]) for n in nodes] == [("alpha", "draining")]
        # The toast says "draining" before the herd table does; undrain asks only about a node shown draining.
        await terminal.wait_for(lambda s: "1 nodes · 0 ready" in s, "the herd table showing alpha draining")

        terminal.keys("u")
        await terminal.wait_for(lambda s: "Undrain node alpha?" in s, "the undrain question")
        terminal.keys("y")
        await terminal.wait_for(lambda s: "1 nodes · 1 ready" in s, "alpha ready again")
        nodes = (await admin.get("/admin/nodes")).json()["data"]
        assert [(n["name"], n["state"]) for n in nodes] == [("alpha", "ready")]

        # The router dies: the terminal says so.
        router.kill()
        await router.wait()
        await terminal.wait_for(lambda s: f"Router unreachable at {url}" in s, "the banner")

        terminal.keys("q")
        deadline = time.monotonic() + 10
        while terminal.alive():
            assert time.monotonic() < deadline, f"q did not quit:\n{terminal.screen()}"
            await asyncio.sleep(0.1)
    finally:
        await admin.aclose()
        if router.returncode is None:
            router.kill()
            await router.wait()
        await node.stop()


@pytest.mark.model
async def test_llamakit_up_shows_the_dashboard_and_q_stops_the_herd(tmp_path: Path, terminal: Terminal) -> None:
    from llamakit.catalog import DEFAULT_MODEL

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    llamakit = Path(sys.executable).parent / "llamakit"
    program = shlex.quote(str(llamakit)) if llamakit.exists() else f"{shlex.quote(sys.executable)} -m llamakit.cli"
    up = (
        f"{program} up --port {port} --model {DEFAULT_MODEL} --slots 1 --threads 1 "
        f"--state-dir {shlex.quote(str(tmp_path / 'state'))}"
    )
    profile = shlex.quote(str(tmp_path / "profile.json"))
    terminal.start(
        f"env -u COLUMNS -u LINES TERM=xterm-256color LLAMAKIT_PROFILE={profile} sh -c '{up}; echo EXITED-$?; sleep 60'"
    )
    screen = await terminal.wait_for(lambda s: "Busy/slots" in s and "ready" in s, "the dashboard", within=120)
    assert url in screen and DEFAULT_MODEL[:12] in screen, screen
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/health")).status_code == 200

    terminal.keys("q")
    screen = await terminal.wait_for(lambda s: "EXITED-" in s, "llamakit up exiting", within=30)
    assert "stopping" in screen and "EXITED-0" in screen, screen
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/health")
