"""What a node's operator reads on its stderr: llamakit's lines and llama.cpp's warnings, not llama.cpp's
thousand lines of detail per context; and a stderr that stays the node's own while models load."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.ports import free_port

TOKEN = "node-log-token"


def run_node(tmp_path: Path, *flags: str) -> str:
    """Start a node, wait until it is ready, have it embed (a second llama.cpp context) and stop it; its stderr."""
    port = free_port()
    err = tmp_path / "node.err"
    with err.open("w") as sink:
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamakit.node",
                "--port",
                str(port),
                "--herd-token",
                TOKEN,
                "--threads",
                "1",
                *flags,
            ],
            stderr=sink,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ready":
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            done = httpx.post(f"{url}/v1/embeddings", json={"input": "a cat"}, headers=headers, timeout=60)
            assert done.status_code == 200, done.text
        finally:
            node.terminate()
            node.wait(timeout=60)
    return err.read_text()


@pytest.mark.timeout(300)
def test_the_node_log_has_llamakits_lines_and_not_llama_cpps_detail(tmp_path: Path) -> None:
    text = run_node(tmp_path)
    assert "serving on" in text and "loaded smollm2-135m-instruct" in text, text
    # Before: about a thousand lines per llama.cpp context (model loader, graph, KV cache), two contexts here.
    assert "llama_model_loader" not in text and "llama_kv_cache" not in text, text[:2000]
    assert len(text.splitlines()) < 40, text[:4000]


@pytest.mark.timeout(300)
def test_llama_log_info_shows_llama_cpps_own_lines_through_logging(tmp_path: Path) -> None:
    text = run_node(tmp_path, "--llama-log", "info")
    assert "INFO llama.cpp: llama_model_loader: loaded meta data" in text, text[:2000]
