"""`llamakit up` as a person runs it: a herd on loopback, a funded dev account, a profile, Ctrl-C to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.llama_server import llama_server_or_skip
from tests.support.ports import free_port

pytestmark = pytest.mark.model


def start_up(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], int, str]:
    """`llamakit up` on a free port with one model and `flags`, its state and profile in `tmp_path`: the process,
    its port and what it printed up to "Ctrl-C stops the herd" (or its end)."""
    port = free_port("127.0.0.1")
    env = {**os.environ, "LLAMAKIT_PROFILE": str(tmp_path / "profile.json"), "LLAMAKIT_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamakit.cli", "up", "--port", str(port), "--model", "smollm2-135m-instruct",
         "--slots", "1", "--headless", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    output = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        output.append(line)
        if "Ctrl-C stops the herd" in line or proc.poll() is not None:
            break
    return proc, port, "".join(output)


def test_llamakit_up_serves_paid_requests_and_stops_cleanly(tmp_path: Path) -> None:
    proc, port, text = start_up(tmp_path)
    try:
        assert "llamakit is up" in text, text
        profile = json.loads((tmp_path / "profile.json").read_text())
        assert oct((tmp_path / "profile.json").stat().st_mode & 0o777) == "0o600"
        assert f"export LLAMAKIT_API_KEY={profile['api_key']}" in text
        headers = {"Authorization": f"Bearer {profile['api_key']}"}
        with httpx.Client(base_url=profile["url"], headers=headers, timeout=60) as client:
            reply = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == "smollm2-135m-instruct"
            account = client.get("/v1/account").json()
            assert account["name"] == "dev" and account["spent"] == reply.json()["usage"]["cost_credits"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, text + rest
    assert "stopping" in rest
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_llamakit_up_with_llama_server_serves_each_model_through_a_node_in_front_of_it(tmp_path: Path) -> None:
    binary = llama_server_or_skip()
    proc, _port, text = start_up(tmp_path, "--llama-server-bin", binary)
    try:
        assert "llamakit is up" in text, text
        profile = json.loads((tmp_path / "profile.json").read_text())
        headers = {"Authorization": f"Bearer {profile['api_key']}"}
        with httpx.Client(base_url=profile["url"], headers=headers, timeout=60) as client:
            reply = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == "smollm2-135m-instruct"
            admin = {"Authorization": f"Bearer {profile['admin_key']}"}
            nodes = client.get("/admin/stats", headers=admin).json()["nodes"]
        assert [n["name"] for n in nodes] == ["smollm2-135m-instruct-1"]
        node_log = (tmp_path / "logs" / "node-smollm2-135m-instruct.log").read_text()
        assert "started llama-server" in node_log and binary in node_log
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, text + rest
    assert "stopped llama-server" in (tmp_path / "logs" / "node-smollm2-135m-instruct.log").read_text()
