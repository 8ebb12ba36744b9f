"""A stream whose router is killed under it, once the router has checkpointed what it delivered (see
llamakit/router/paid/checkpoint.py): shared by the one-router and the cluster tests of crash recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from llamakit.router.ledger import ledger_at

# The fake node goes silent after STALL tokens (Script.stall_after), so that the client has all of them and the
# router has written all of them to it; the router checkpoints every CHECKPOINT_TOKENS tokens
# (--checkpoint-tokens, with --checkpoint-ms too long to matter).
STALL = 11
CHECKPOINT_TOKENS = 4
CHECKPOINT_FLAGS = ("--checkpoint-tokens", str(CHECKPOINT_TOKENS), "--checkpoint-ms", "60000")
PROMPT = "one two three four"
PROMPT_TOKENS = 4 + 3  # as the fake node counts them: words + 3


async def checkpointed(db: str, request_id: str, *, at_least: int) -> int:
    """Wait until the open hold of `request_id` in the ledger at `db` has a checkpoint of at least `at_least`
    completion tokens; returns its tokens."""
    async with ledger_at(db) as ledger:
        for _ in range(400):
            hold = await ledger.find_hold(request_id)
            if hold is not None and hold.delivered is not None and hold.delivered.completion_tokens >= at_least:
                return hold.delivered.completion_tokens
            await asyncio.sleep(0.025)
    raise AssertionError(f"no checkpoint of {at_least} tokens on {request_id}: {hold}")


async def stream_until_killed(url: str, key: str, db: str, kill: Callable[[], Awaitable[None]]) -> tuple[str, int]:
    """A stream through the router at `url` (ledger at `db`), whose router `kill` kills once it has delivered STALL
    tokens and checkpointed them; returns the request's id and the token chunks the client got, after the kill
    too (what was on its way)."""
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 64, "stream": True}
    chunks = 0
    async with (
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        request_id = resp.headers["X-Llamakit-Request-Id"]
        lines = resp.aiter_lines()
        while chunks < STALL:
            if (await anext(lines)).startswith("data: {"):
                chunks += 1
        # Every token went out; fewer than CHECKPOINT_TOKENS of them can be past the last checkpoint.
        await checkpointed(db, request_id, at_least=STALL - CHECKPOINT_TOKENS + 1)
        await kill()
        try:
            async for line in lines:
                chunks += line.startswith("data: {")
        except httpx.TransportError:
            pass  # the stream was cut short by the kill
    return request_id, chunks
