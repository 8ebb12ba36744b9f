"""A node whose model file goes away (issue 26, item 4): it keeps serving from memory, its /health says the file
is gone (`model_file`), and its log says so once; once the file is back, /health and the log say that too."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

import httpx
import pytest

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node import NodeSettings, create_app
from llamakit.node import model_file as watched
from tests.node.conftest import HERD_TOKEN
from tests.support.servers import RunningServer

pytestmark = pytest.mark.model


async def _health_until(client: httpx.AsyncClient, ok: object) -> dict[str, object]:
    for _ in range(1200):
        health: dict[str, object] = (await client.get("/health")).json()
        if ok(health):  # type: ignore[operator]
            return health
        await asyncio.sleep(0.05)
    raise AssertionError(f"/health never changed: {health}")


async def test_a_node_whose_model_file_goes_away_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(watched, "CHECK_SECONDS", 0.1)
    kept = tmp_path / "kept.gguf"
    await asyncio.to_thread(shutil.copyfile, resolve_model(DEFAULT_MODEL).path, kept)
    model = tmp_path / "model.gguf"
    os.link(kept, model)  # the same file under the name the node loads; `kept` keeps it to bring back
    settings = NodeSettings(model=str(model), slots=1, n_ctx=512, threads=2, herd_token=HERD_TOKEN, name="n")
    server = await RunningServer(create_app(settings)).start()
    caplog.set_level(logging.INFO, logger="llamakit.node.model_file")
    try:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {HERD_TOKEN}"}, timeout=120
        ) as client:
            health = await _health_until(client, lambda h: h["status"] != "loading")
            assert health["status"] == "ready" and health["model_file"] is None
            model.unlink()
            health = await _health_until(client, lambda h: h["model_file"] is not None)
            assert str(model) in str(health["model_file"]) and "No such file" in str(health["model_file"])
            assert health["status"] == "ready"  # still serving, from memory
            answer = await client.post("/v1/completions", json={"prompt": "One, two,", "max_tokens": 3})
            assert answer.status_code == 200, answer.text
            await asyncio.sleep(0.5)  # several more checks fail meanwhile: still one line
            os.link(kept, model)
            health = await _health_until(client, lambda h: h["model_file"] is None)
    finally:
        await server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "llamakit.node.model_file"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"the model file {model} failed:") and "cannot load the model again" in lines[0]
    assert lines[1].startswith(f"the model file {model} works again after")
