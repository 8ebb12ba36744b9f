"""`/admin/init` swaps the node's model (the AO worker's Init) while /health keeps answering."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support.servers import RunningServer

pytestmark = pytest.mark.model

TOKEN = "swap-test-token"


async def wait_ready(client: httpx.AsyncClient, seen: list[str]) -> dict[str, object]:
    for _ in range(1200):
        health = (await client.get("/health")).json()
        seen.append(health["status"])
        if health["status"] != "loading":
            return health  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError("the model never finished loading")


async def test_swap_to_gemma_and_back(serve: object) -> None:
    from llamakit.node import NodeSettings, create_app

    node: RunningServer = await serve(create_app(NodeSettings(slots=1, n_ctx=512, herd_token=TOKEN, threads=2)))  # type: ignore[operator]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=node.url, headers=headers, timeout=120) as client:
        seen: list[str] = []
        assert (await wait_ready(client, seen))["model"] == "smollm2-135m-instruct"
        request = {"prompt": "The sky is", "max_tokens": 24, "temperature": 0}
        # A request in flight when the swap starts finishes on the old model.
        in_flight = asyncio.create_task(client.post("/v1/completions", json=request))
        await asyncio.sleep(0.05)
        resp = await client.post("/admin/init", json={"model": "gemma-3-270m"})
        assert resp.status_code == 202 and resp.json() == {"status": "loading", "model": "gemma-3-270m"}
        # A request sent while loading waits for the new model.
        waiting = asyncio.create_task(client.post("/v1/completions", json=request))
        seen.clear()
        health = await wait_ready(client, seen)
        assert "loading" in seen, "/health must answer, and say 'loading', while the model loads"
        assert health["status"] == "ready" and health["model"] == "gemma-3-270m"
        assert (await in_flight).json()["model"] == "smollm2-135m-instruct"
        swapped = (await waiting).json()
        assert swapped["model"] == "gemma-3-270m" and swapped["usage"]["completion_tokens"] > 0
        chat = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        )
        assert chat.status_code == 200, "a base model without a chat template still chats, on a plain transcript"
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["gemma-3-270m"]

        assert (await client.post("/admin/init", json={"model": "smollm2-135m-instruct"})).status_code == 202
        assert (await wait_ready(client, []))["model"] == "smollm2-135m-instruct"
        back = await client.post("/v1/completions", json=request)
        assert back.json()["model"] == "smollm2-135m-instruct"
