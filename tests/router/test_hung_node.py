"""A node that takes a request and never answers: the request fails over (or is refunded), and the node is given
no more work while its health check still says it is fine."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"


async def test_a_request_on_a_hung_node_fails_over_and_the_node_gets_no_more_work(herd: Herd) -> None:
    hung = await herd.add_node(FakeNode("a-hung", slots=2, script=Script(hang=True)))
    good = await herd.add_node(FakeNode("b-good", slots=2, script=Script(tokens=3)))
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    started = asyncio.get_running_loop().time()
    # Idle nodes tie and a-hung wins by name: the first request goes to it and times out there.
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "b-good"
    assert 0.5 <= asyncio.get_running_loop().time() - started < 1.5
    assert len(hung.received) == 1
    assert (await herd.node_states())["a-hung"] == "down"
    # Its /health still answers "ready", yet it gets nothing more: plain and streamed, one after another.
    served: Counter[str] = Counter()
    for stream in (False, True) * 3:
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": stream})
        assert resp.status_code == 200
        served[resp.headers["X-Llamakit-Node"]] += 1
    await asyncio.sleep(0.3)  # several health checks answer in the meantime
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    served[resp.headers["X-Llamakit-Node"]] += 1
    assert served == {"b-good": 7}
    assert len(hung.received) == 1 and len(good.received) == 8
    assert (await herd.node_states())["a-hung"] == "down"
    account = (await alice.get("/v1/account")).json()
    assert account["held"] == 0 and account["spent"] == 8 * (10 + 7 + 2 * 3)
    assert {u["node"] for u in (await alice.get("/v1/account/usage")).json()["data"]} == {"b-good"}


async def test_a_hung_only_node_is_503_with_a_full_refund_and_gets_no_more_work(herd: Herd) -> None:
    hung = await herd.add_node(FakeNode("n1", slots=4, script=Script(hang=True)))
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    for stream in (False, True):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": stream})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "no_node" and "nothing was charged" in resp.json()["error"]["message"]
        await asyncio.sleep(0.3)  # its health checks answer "ready" meanwhile
    assert len(hung.received) == 1, "the second request was not sent to the node that hung on the first"
    account = (await alice.get("/v1/account")).json()
    assert (account["balance"], account["held"], account["spent"]) == (100_000, 0, 0)
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["cost_credits"]) for u in usage] == [("no_node", 0), ("no_node", 0)]


async def test_a_node_that_hung_is_taken_back_after_its_rest_and_rests_longer_if_it_hangs_again(
    herd: Herd,
) -> None:
    node = await herd.add_node(FakeNode("n1", slots=1, script=Script(hang=True)))
    await herd.start(node_timeout=0.15, node_rest=0.3)
    alice = await herd.account("alice", 100_000)

    async def hang_once() -> dict[str, object]:
        """Send a request that hangs; the node as the router reports it right after."""
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        assert resp.status_code == 503
        nodes = (await herd.admin.get("/admin/nodes")).json()["data"]  # type: ignore[union-attr]
        reported: dict[str, object] = next(n for n in nodes if n["name"] == "n1")
        assert reported["state"] == "down"
        await herd.wait_state("n1", "ready", within=5)  # it is taken back after its rest
        return reported

    first = await hang_once()
    assert first["timeouts"] == 1 and 0 < first["resting"] <= 0.3  # type: ignore[operator]
    second = await hang_once()  # hung again, in a row: the rest doubles
    assert second["timeouts"] == 2 and 0.3 < second["resting"] <= 0.6  # type: ignore[operator]
    node.script = Script(tokens=1)  # it recovers
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "n1"
    assert len(node.received) == 3
    node.script = Script(hang=True)  # a served request reset the count: the next rest is the first again
    third = await hang_once()
    assert third["timeouts"] == 1 and third["resting"] <= 0.3  # type: ignore[operator]


async def test_a_stream_that_stalls_before_its_first_token_fails_over_and_the_node_rests(herd: Herd) -> None:
    stalls = await herd.add_node(FakeNode("a-stalls", script=Script(tokens=5, stall_after=0)))
    await herd.add_node(FakeNode("b-good", script=Script(tokens=5)))
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    resp = await alice.post("/v1/completions", json=body)
    assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "b-good"
    assert resp.text.count('"text":" tok"') == 5 and '"error"' not in resp.text
    await asyncio.sleep(0.3)
    for _ in range(3):
        assert (await alice.post("/v1/completions", json=body)).headers["X-Llamakit-Node"] == "b-good"
    assert len(stalls.received) == 1
    assert (await alice.get("/v1/account")).json()["spent"] == 4 * (10 + 7 + 2 * 5)


async def test_a_stream_that_stalls_midway_is_charged_for_what_was_delivered_and_the_node_rests(herd: Herd) -> None:
    stalls = await herd.add_node(FakeNode("a-stalls", script=Script(tokens=5, stall_after=2)))
    await herd.add_node(FakeNode("b-good", script=Script(tokens=5)))
    await herd.start(node_timeout=0.5)
    alice = await herd.account("alice", 100_000)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert resp.status_code == 200 and resp.headers["X-Llamakit-Node"] == "a-stalls"
    assert resp.text.count('"text":" tok"') == 2 and '"code":"node_failed"' in resp.text
    usage = (await alice.get("/v1/account/usage")).json()["data"][0]
    assert (usage["status"], usage["completion_tokens"], usage["cost_credits"]) == ("broken", 2, 10 + 7 + 2 * 2)
    await asyncio.sleep(0.3)
    resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert resp.headers["X-Llamakit-Node"] == "b-good"
    assert len(stalls.received) == 1 and (await herd.node_states())["a-stalls"] == "down"


async def test_stalling_midway_again_doubles_the_rest(herd: Herd) -> None:
    # Tokens delivered before a stall are charged, but they do not count as the node having recovered.
    await herd.add_node(FakeNode("n1", script=Script(tokens=5, stall_after=1)))
    await herd.start(node_timeout=0.15, node_rest=0.3)
    alice = await herd.account("alice", 100_000)
    timeouts = []
    for _ in range(2):
        resp = await alice.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True})
        assert resp.status_code == 200 and '"code":"node_failed"' in resp.text
        nodes = (await herd.admin.get("/admin/nodes")).json()["data"]  # type: ignore[union-attr]
        timeouts.append(next(n["timeouts"] for n in nodes if n["name"] == "n1"))
        await herd.wait_state("n1", "ready", within=5)
    assert timeouts == [1, 2], "a stall after some tokens does not end the run of timeouts: the rest doubles"
    usage = (await alice.get("/v1/account/usage")).json()["data"]
    assert [(u["status"], u["completion_tokens"]) for u in usage] == [("broken", 1), ("broken", 1)]
