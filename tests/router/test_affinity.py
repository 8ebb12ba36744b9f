"""Prompt-cache affinity: a conversation's next turn goes to the node that served its last one, unless that
node is full or busier than the shared prefix is worth."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from llamakit.router.affinity import BLOCK_CHARS, Affinity, PrefixMap, chat_text
from tests.router.test_operator import sample
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

SYSTEM = {"role": "system", "content": "You are a patient tutor who answers with worked examples. " * 6}


def turn(history: list[dict[str, str]], question: str) -> list[dict[str, str]]:
    return [*history, {"role": "user", "content": question}]


async def ask(client: httpx.AsyncClient, messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """Send a chat; return the node that answered and the conversation with the answer appended."""
    body: dict[str, Any] = {"model": "fake-model", "messages": messages, "max_tokens": 5}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    answer = choice["message"]["content"] if "message" in choice else choice["text"]
    return resp.headers["X-Llamakit-Node"], [*messages, {"role": "assistant", "content": answer}]


async def occupy(herd: Herd, client: httpx.AsyncClient, node: str) -> tuple[asyncio.Event, asyncio.Task[Any]]:
    """One request held open on `node` and none on the others, until the returned event is set.

    Every node's gate is closed and requests are sent one at a time (each lands on the least-loaded node) until
    one runs on `node`; then the other nodes' gates open and their requests finish."""
    gates = {name: asyncio.Event() for name in herd.nodes}
    for name, gate in gates.items():
        herd.nodes[name].script.gate = gate
    tasks: list[asyncio.Task[Any]] = []
    while herd.nodes[node].active == 0:
        before = sum(n.active for n in herd.nodes.values())
        tasks.append(asyncio.create_task(ask(client, [{"role": "user", "content": "hold on"}])))
        while sum(n.active for n in herd.nodes.values()) == before:
            await asyncio.sleep(0.01)
    for name, gate in gates.items():
        if name != node:
            gate.set()
            herd.nodes[name].script.gate = None
    pending = set(tasks)
    while len(pending) > 1:
        _, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    (held,) = pending
    return gates[node], held


async def release(herd: Herd, node: str, gate: asyncio.Event, task: asyncio.Task[Any]) -> None:
    gate.set()
    await task
    herd.nodes[node].script.gate = None


async def test_a_follow_up_goes_to_the_node_that_holds_the_conversation(herd: Herd) -> None:
    for name in ("a", "b"):
        await herd.add_node(FakeNode(name, slots=2, script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 1_000_000)
    # The first turn lands on b because a is busy; without affinity every later turn would go to a (the tie-break).
    gate, held = await occupy(herd, alice, "a")
    node, history = await ask(alice, turn([SYSTEM], "What is a prime number?"))
    assert node == "b"
    await release(herd, "a", gate, held)

    node, history = await ask(alice, turn(history, "Is 91 prime?"))
    assert node == "b", "the node whose slot holds the history"
    node, history = await ask(alice, turn(history, "And 97?"))
    assert node == "b"
    # Another conversation with no shared history takes the least-loaded node as before.
    assert (await ask(alice, turn([], "Hello there, who are you?")))[0] == "a"
    metrics = (await alice.get("/metrics")).text
    assert sample(metrics, "llamakit_router_affinity_dispatches_total", outcome="held") == 2


async def test_a_prefix_belongs_to_its_account_at_the_router_and_at_the_node(herd: Herd) -> None:
    # A node reuses an account's cells only for that account (the cache salt the router sends it), so another
    # account's request sent there for the same text would gain nothing: it is not routed by that hint either.
    for name in ("a", "b"):
        await herd.add_node(FakeNode(name, slots=2, script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 1_000_000)
    mallory = await herd.account("mallory", 1_000_000)
    gate, held = await occupy(herd, alice, "a")
    node, history = await ask(alice, turn([SYSTEM], "What is a prime number?"))
    assert node == "b"
    await release(herd, "a", gate, held)
    # The same system prompt and question from another account: no affinity to b, the tie-break's node a.
    assert (await ask(mallory, turn([SYSTEM], "What is a prime number?")))[0] == "a"
    assert (await ask(alice, turn(history, "Is 91 prime?")))[0] == "b", "alice's own follow-up still holds"
    ids = {name: (await client.get("/v1/account")).json()["id"] for name, client in (("a", alice), ("m", mallory))}
    salts = set(herd.nodes["a"].cache_salts) | set(herd.nodes["b"].cache_salts)
    assert salts == {f"account-{ids['a']}", f"account-{ids['m']}"}, salts


async def test_a_busier_holder_loses_the_conversation_when_its_prefix_is_short(herd: Herd) -> None:
    for name in ("a", "b"):
        await herd.add_node(FakeNode(name, slots=2, script=Script(tokens=5)))
    await herd.start()
    alice = await herd.account("alice", 1_000_000)
    short = {"role": "system", "content": "Be brief and exact in every answer you give. " * 7}  # > 1 block, < 1 KiB
    gate, held = await occupy(herd, alice, "a")
    node, history = await ask(alice, turn([short], "Name a colour."))
    assert node == "b"
    await release(herd, "a", gate, held)
    # b now runs one request more than a: the few hundred characters it holds are not worth waiting behind it.
    gate, held = await occupy(herd, alice, "b")
    node, _ = await ask(alice, turn(history, "Another one?"))
    assert node == "a"
    await release(herd, "b", gate, held)
    metrics = (await alice.get("/metrics")).text
    assert sample(metrics, "llamakit_router_affinity_dispatches_total", outcome="moved") == 1


async def test_affinity_can_be_turned_off(herd: Herd) -> None:
    for name in ("a", "b"):
        await herd.add_node(FakeNode(name, slots=2, script=Script(tokens=5)))
    await herd.start(affinity=False)
    alice = await herd.account("alice", 1_000_000)
    gate, held = await occupy(herd, alice, "a")
    node, history = await ask(alice, turn([SYSTEM], "What is a prime number?"))
    assert node == "b"
    await release(herd, "a", gate, held)
    assert (await ask(alice, turn(history, "Is 91 prime?")))[0] == "a", "least loaded, then by name"


def test_the_prefix_map_finds_the_longest_remembered_prefix_and_forgets_the_oldest() -> None:
    prefixes = PrefixMap(capacity=6)
    first = chat_text([("system", "s" * 600), ("user", "hi")])
    prefixes.remember(PrefixMap.chain("m", first), "a")
    longer = first + chat_text([("assistant", "x" * 300), ("user", "more")])
    assert prefixes.holder(PrefixMap.chain("m", longer)) == Affinity("a", 2 * BLOCK_CHARS)
    assert prefixes.holder(PrefixMap.chain("other-model", longer)) is None, "a prefix is per model"
    assert prefixes.holder(PrefixMap.chain("m", "s" * 100)) is None, "less than a block is never remembered"
    prefixes.remember(PrefixMap.chain("m", longer), "b")
    assert prefixes.holder(PrefixMap.chain("m", longer)) == Affinity("b", 3 * BLOCK_CHARS), "the last holder wins"
    prefixes.remember(PrefixMap.chain("m", "t" * 5 * BLOCK_CHARS), "c")
    assert len(prefixes) == 6
    # Of the 8 blocks remembered, the two oldest went: the conversation's first two (its third still matches).
    assert prefixes.holder(PrefixMap.chain("m", longer)) == Affinity("b", 3 * BLOCK_CHARS)
    assert prefixes.holder(PrefixMap.chain("m", first)) is None
    prefixes.remember(PrefixMap.chain("m", "u" * BLOCK_CHARS), "d")
    assert prefixes.holder(PrefixMap.chain("m", longer)) is None
    assert prefixes.holder(PrefixMap.chain("m", "t" * 5 * BLOCK_CHARS)) == Affinity("c", 5 * BLOCK_CHARS)
