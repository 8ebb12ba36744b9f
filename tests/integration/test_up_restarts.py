"""`llamakit up` keeps the herd up when a node dies: the router stays, the node's requests are refunded or
failed over, and the node is started again and rejoins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port

pytestmark = pytest.mark.model


def children(pid: int, marker: str) -> list[int]:
    """Processes whose parent is `pid` and whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmdline:
            found.append(int(entry.name))
    return found


def test_a_node_killed_under_llamakit_up_is_started_again_and_the_router_stays(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    env = {**os.environ, "LLAMAKIT_PROFILE": str(tmp_path / "profile.json"), "LLAMAKIT_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamakit.cli", "up", "--port", str(port), "--model", "smollm2-135m-instruct",
         "--slots", "1", "--headless", "--credit-value", "0.0025", "--currency", "eur"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def wait_for(text: str, within: float) -> None:
        deadline = time.monotonic() + within
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.1)

    try:
        wait_for("Ctrl-C stops the herd", 240)
        profile = json.loads((tmp_path / "profile.json").read_text())
        admin_key = json.loads((tmp_path / "secrets.json").read_text())["admin_key"]
        [router] = children(proc.pid, "llamakit.router")
        [node] = children(proc.pid, "llamakit.node")
        client = httpx.Client(
            base_url=profile["url"], headers={"Authorization": f"Bearer {profile['api_key']}"}, timeout=120
        )
        admin = httpx.Client(base_url=profile["url"], headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        spent = client.get("/v1/account").json()["spent"]
        info = client.get("/v1/info").json()  # `up` passed what a credit is worth on to the router
        assert (info["currency"], info["credit_value_exact"]) == ("EUR", "0.0025"), info

        # A request in flight on the node when it dies: the only node, so a 503 and a full refund.
        answers: list[httpx.Response] = []
        body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0}
        flight = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json=body)))
        flight.start()
        time.sleep(1.0)
        os.kill(node, signal.SIGKILL)
        flight.join(60)
        [answer] = answers
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_node", answer.text
        assert client.get("/v1/account").json()["spent"] == spent
        books = admin.get("/admin/books").json()
        assert books["balanced"] and books["holds"] == 0, books

        wait_for("started again", 30)
        deadline = time.monotonic() + 120
        while True:
            resp = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
            if resp.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert resp.status_code == 200, resp.text + "".join(lines)
        assert children(proc.pid, "llamakit.router") == [router], "the router kept running"
        assert children(proc.pid, "llamakit.node") != [node]
        assert (tmp_path / "logs" / "up.log").read_text().count("started again") == 1
        client.close()
        admin.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        reader.join(5)
    assert proc.returncode == 0, "".join(lines)
