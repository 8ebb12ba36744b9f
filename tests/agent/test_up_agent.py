"""`llamakit up --agent` as an operator runs it: within a few rounds the dashboard's stats show buys and skips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.ports import free_port

pytestmark = pytest.mark.model


def test_the_demo_agent_buys_and_skips_within_a_few_rounds(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    env = {**os.environ, "LLAMAKIT_PROFILE": str(tmp_path / "profile.json")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamakit.cli", "up", "--port", str(port), "--headless", "--agent",
         "--state-dir", str(tmp_path), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    output = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        output.append(line)
        if "Ctrl-C stops the herd" in line or proc.poll() is not None:
            break
    try:
        assert "llamakit is up" in "".join(output), "".join(output)
        admin_key = json.loads((tmp_path / "profile.json").read_text())["admin_key"]
        headers = {"Authorization": f"Bearer {admin_key}"}
        agent: dict[str, Any] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as admin:
            # Eight rounds at most, one every 5 s: the room shows every mood within its first six ticks.
            deadline = time.monotonic() + 8 * 5 + 30
            while time.monotonic() < deadline:
                agent = admin.get("/admin/stats").json()["agents"].get("demo-agent", {})
                if agent.get("counts", {}).get("buy") and agent["counts"].get("skip"):
                    break
                time.sleep(1)
        log = (tmp_path / "logs" / "agent.log").read_text()
        assert agent.get("counts", {}).get("buy") and agent["counts"].get("skip"), (agent, log)
        assert not agent["counts"].get("error"), log
        assert agent["total"] <= 8 and agent["position"] > 0 and agent["pnl"] != 0, agent
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
