"""A router killed with SIGKILL under load: within its lease the routers still running release its holds,
drop its queue rows (freeing the slots its requests held) and its idempotency claims. No credit is lost."""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import httpx
import pytest

from tests.scaleout.conftest import Routers
from tests.support.fake_node import FakeNode, Script

LEASE = 1.5


async def _load(client: httpx.AsyncClient, until: float, outcomes: list[str]) -> None:
    body = {"model": "fake-model", "prompt": "one two three", "max_tokens": 4}
    while time.monotonic() < until:
        try:
            resp = await client.post("/v1/completions", json=body)
            outcomes.append(str(resp.status_code))
        except httpx.TransportError:
            outcomes.append("gone")
            return  # its router is dead


async def test_the_routers_left_clean_up_after_a_killed_one_within_its_lease(routers: Routers) -> None:
    for name in ("n1", "n2"):
        await routers.add_node(FakeNode(name, slots=2, script=Script(tokens=4, token_delay=0.05)))
    started = [await routers.spawn_router(lease=LEASE) for _ in range(3)]
    urls = [url for url, _ in started]
    for name in ("n1", "n2"):
        await routers.join(urls[0], name)
    for url in urls:
        await routers.wait_nodes(url, {"n1": "ready", "n2": "ready"})
    key = await routers.account("alice", 10_000_000)
    outcomes: dict[str, list[str]] = {url: [] for url in urls}
    until = time.monotonic() + 3.0
    load = [
        asyncio.ensure_future(_load(routers.client(url, key), until, outcomes[url])) for url in urls for _ in range(4)
    ]
    await asyncio.sleep(1.0)
    victim_url, victim = started[1]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    conn = await asyncpg.connect(routers.db)
    try:
        victim_id = f"127.0.0.1:{victim_url.rsplit(':', 1)[1]}"
        # Within the lease (and a janitor round, a third of it), the others have cleaned up.
        while await conn.fetchval("SELECT count(*) FROM routers WHERE id = $1", victim_id):
            assert time.monotonic() - killed_at < LEASE * 1.5 + 1, "the dead router's lease was not reaped"
            await asyncio.sleep(0.05)
        assert await conn.fetchval("SELECT count(*) FROM queue WHERE router_id = $1", victim_id) == 0
        while await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open' AND router_id = $1", victim_id):
            assert time.monotonic() - killed_at < LEASE * 1.5 + 1, "the dead router's holds are still open"
            await asyncio.sleep(0.05)
        await asyncio.gather(*load)
        lost = await conn.fetchval("SELECT count(*) FROM usage WHERE status = 'router_lost'")
        # A slot is handed back just after its answer went out: give the last ones a moment.
        settled = time.monotonic()
        while await conn.fetchval("SELECT COALESCE(sum(running), 0) FROM nodes"):
            assert time.monotonic() - settled < 2, "slots are still counted as busy after every request ended"
            await asyncio.sleep(0.05)
        assert await conn.fetchval("SELECT count(*) FROM queue") == 0
    finally:
        await conn.close()
    routers.urls.remove(victim_url)
    for url in (urls[0], urls[2]):  # the routers left served every request they took, after the kill too
        assert outcomes[url] and set(outcomes[url]) == {"200"}, outcomes[url]
    assert lost >= 1, "the killed router had requests in flight: their holds were released as router_lost"


async def test_a_second_router_with_a_live_routers_id_is_refused_and_the_first_keeps_serving(routers: Routers) -> None:
    await routers.add_node(FakeNode("n1", slots=2, script=Script(tokens=4, token_delay=0.05)))
    first_url, first = await routers.spawn_router(router_id="r1")
    await routers.join(first_url, "n1")
    await routers.wait_nodes(first_url, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    client = routers.client(first_url, key)
    body = {"model": "fake-model", "prompt": "one two three", "max_tokens": 4}
    running = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await asyncio.sleep(0.05)
    # Copying one host's LLAMAKIT_ROUTER_ID to another: the second must not take the first one's requests
    # for an earlier life of its own and release their holds.
    with pytest.raises(AssertionError, match="another router is running with the router id 'r1'"):
        await routers.spawn_router(router_id="r1")
    assert (await running).status_code == 200
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    # A router that dies lets go of its id at once: its successor starts under the same id.
    first.send_signal(signal.SIGKILL)
    first.wait()
    routers.urls.remove(first_url)
    second_url, _ = await routers.spawn_router(router_id="r1")
    await routers.wait_nodes(second_url, {"n1": "ready"})
    assert (await routers.client(second_url, key).post("/v1/completions", json=body)).status_code == 200


async def test_a_router_paused_past_its_lease_answers_free_and_fails_its_queued_requests_at_once(
    routers: Routers,
) -> None:
    # One slot: the first request runs for about 5 s, the next two wait behind it in the herd's queue.
    await routers.add_node(FakeNode("n1", slots=1, script=Script(tokens=20, token_delay=0.25)))
    keeper = await routers.start_router()
    paused_url, paused = await routers.spawn_router(queue_timeout=60)
    await routers.join(keeper, "n1")
    for url in (keeper, paused_url):
        await routers.wait_nodes(url, {"n1": "ready"})
    key = await routers.account("alice", 1_000_000)
    client = routers.client(paused_url, key)
    body = {"model": "fake-model", "prompt": "one two three", "max_tokens": 20}
    running = asyncio.ensure_future(client.post("/v1/completions", json=body))
    await asyncio.sleep(0.5)
    queued = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(2)]
    await asyncio.sleep(0.3)
    paused.send_signal(signal.SIGSTOP)  # a VM stopped longer than the lease
    try:
        conn = await asyncpg.connect(routers.db)
        try:
            stopped = time.monotonic()
            while await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open'"):
                assert time.monotonic() - stopped < LEASE * 1.5 + 2, "the paused router's holds were not released"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
    finally:
        paused.send_signal(signal.SIGCONT)
    woke = time.monotonic()
    answers = await asyncio.gather(*queued)
    assert [r.status_code for r in answers] == [503, 503], [r.text for r in answers]
    assert all(r.json()["error"]["code"] == "router_lease_lost" for r in answers)
    assert time.monotonic() - woke < 5, "the queued requests waited for their queue timeout"
    done = await running
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["cost_credits"] == 0  # its hold went back in full while it was paused
    spent = (await routers.client(keeper, key).get("/v1/account")).json()
    assert spent["balance"] == 1_000_000, spent
