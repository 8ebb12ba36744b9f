"""Fees for the models the herd serves: a typo is refused, fees set ahead of a model's nodes on purpose are
kept, and a model's own fees can be deleted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.router.test_cli import llamakit
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

PROMPT = "one two three four"  # the fake node counts 4 + 3 = 7 prompt tokens
DEFAULT = {"base_fee": 10, "prompt_token_fee": 1, "completion_token_fee": 2}  # the herd fixture's
OWN = {"base_fee": 100, "prompt_token_fee": 3, "completion_token_fee": 7}


def cost(fees: dict[str, int]) -> int:
    """What PROMPT with 5 completion tokens costs at bid 1."""
    return fees["base_fee"] + fees["prompt_token_fee"] * 7 + fees["completion_token_fee"] * 5


async def models_named(herd: Herd) -> set[str]:
    """The models the router names anywhere: its fees, /v1/info, the stats' queues."""
    assert herd.admin is not None
    fees = set((await herd.admin.get("/admin/fees")).json()) - {"*"}
    info = (await herd.admin.get("/v1/info")).json()
    stats = (await herd.admin.get("/admin/stats")).json()
    assert set(info["models"]) == set(info["fees"]) - {"*"} == fees == set(stats["queue"]["models"])
    return fees


async def not_found(client: httpx.AsyncClient, model: str) -> str:
    """The message of the 404 a request for `model` gets."""
    resp = await client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 5})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", resp.text
    message: str = resp.json()["error"]["message"]
    return message


async def test_fees_for_a_model_no_node_serves_are_refused_unless_meant(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", script=Script(tokens=5)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    try:
        resp = await herd.admin.put("/admin/fees/nosuch", json=OWN)
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert "models served: fake-model." in error["message"] and "?unserved=true" in error["message"]
        # The typo is nowhere: not a model, not offered to the next client that gets a model wrong.
        assert await models_named(herd) == {"fake-model"}
        assert (await not_found(alice, "nosuch")).endswith("available models: fake-model")

        # On purpose, ahead of the model's nodes (a scale-out): the fees are there when its first node joins.
        resp = await herd.admin.put("/admin/fees/next-model", params={"unserved": "true"}, json=OWN)
        assert resp.status_code == 200 and resp.json() == {"model": "next-model", **OWN}
        assert await models_named(herd) == {"fake-model", "next-model"}
        await herd.add_node(FakeNode("beta", model="next-model", script=Script(tokens=5)), static=False)
        assert (await herd.join("beta")).status_code == 201
        body: dict[str, Any] = {"model": "next-model", "prompt": PROMPT, "max_tokens": 5}
        assert (await alice.post("/v1/completions", json=body)).json()["usage"]["cost_credits"] == cost(OWN)
        # A model with fees already, or served, needs no flag to change them.
        cheaper = {**OWN, "base_fee": 50}
        assert (await herd.admin.put("/admin/fees/next-model", json=cheaper)).status_code == 200
        assert (await herd.admin.put("/admin/fees/fake-model", json=OWN)).status_code == 200
    finally:
        await alice.aclose()


async def test_a_models_own_fees_are_deleted(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha", script=Script(tokens=5)))
    await herd.start()
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 5}
    try:
        assert (await herd.admin.put("/admin/fees/fake-model", json=OWN)).status_code == 200
        assert (await alice.post("/v1/completions", json=body)).json()["usage"]["cost_credits"] == cost(OWN)

        # A served model goes back to the default fees, from the next request on.
        resp = await herd.admin.delete("/admin/fees/fake-model")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"model": "fake-model", "deleted": OWN, "fees": DEFAULT}
        assert (await alice.post("/v1/completions", json=body)).json()["usage"]["cost_credits"] == cost(DEFAULT)
        assert (await herd.admin.get("/admin/fees")).json() == {"*": DEFAULT, "fake-model": DEFAULT}

        # Fees set for a model no node serves: deleted, it is no model here any more.
        assert (await herd.admin.put("/admin/fees/later", params={"unserved": "1"}, json=OWN)).status_code == 200
        assert "later" in await not_found(alice, "nosuch")
        resp = await herd.admin.delete("/admin/fees/later")
        assert resp.status_code == 200 and resp.json() == {"model": "later", "deleted": OWN, "fees": None}
        assert await models_named(herd) == {"fake-model"}
        assert (await not_found(alice, "later")).endswith("available models: fake-model")

        # Nothing to delete: 404; the default can only be changed.
        for model in ("later", "fake-model", "nosuch"):
            resp = await herd.admin.delete(f"/admin/fees/{model}")
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "fees_not_found", resp.text
        resp = await herd.admin.delete("/admin/fees/*")
        assert resp.status_code == 400 and (await herd.admin.get("/admin/fees")).json()["*"] == DEFAULT
    finally:
        await alice.aclose()


async def test_the_cli_sets_fees_ahead_and_deletes_them(herd: Herd) -> None:
    await herd.add_node(FakeNode("alpha"))
    await herd.start()
    assert herd.admin is not None
    code, out = await llamakit(herd, "fees", "typo", "--base", "5")
    assert code == 1 and "model_not_found" in out and "--unserved" in out
    code, out = await llamakit(herd, "fees", "later", "--base", "5", "--prompt", "1", "--unserved")
    assert code == 0 and (await herd.admin.get("/admin/fees")).json()["later"]["base_fee"] == 5, out
    code, out = await llamakit(herd, "fees", "later", "--delete")
    assert code == 0 and '"fees": null' in out, out
    code, out = await llamakit(herd, "fees", "later", "--delete")
    assert code == 1 and "fees_not_found" in out
    code, out = await llamakit(herd, "fees", "--delete")
    assert code == 1 and "--delete needs the MODEL" in out
    assert set((await herd.admin.get("/admin/fees")).json()) == {"*", "fake-model"}


async def test_fees_too_high_to_hold_are_refused_and_never_make_a_500(herd: Herd, tmp_path: Path) -> None:
    # Fees the router started with are not checked (a --fees file): requests at them are 400, not 500.
    absurd = {"base_fee": 10**15, "prompt_token_fee": 1, "completion_token_fee": 2}
    fees_file = tmp_path / "fees.json"
    fees_file.write_text(json.dumps({"fake-model": absurd}))
    await herd.add_node(FakeNode("alpha", script=Script(tokens=5)))
    await herd.start(fees_file=fees_file)
    assert herd.admin is not None
    alice = await herd.account("alice", 100_000)
    body: dict[str, Any] = {"model": "fake-model", "prompt": PROMPT, "max_tokens": 5}
    try:
        resp = await alice.post("/v1/completions", json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["code"], error["param"]) == ("hold_too_large", "max_tokens")
        held = 10**15 + (len(PROMPT) + 4) + 2 * 5  # the prompt bound: its bytes and 4
        assert f"up to {held} credits at bid 1, more than the ledger can hold" in error["message"]
        # The refusal is recorded as one, nothing held.
        assert (await alice.get("/v1/account")).json()["held"] == 0

        # Fees set live are bound so that the largest request (bid 1000, max_tokens 32768, a prompt of a token per
        # byte of a 4 MiB body) can still be held within the ledger's 10^15.
        most = 10**15 // 1000 - 1 * 4 * 1024 * 1024 - 2 * 32768
        for base in (10**15, most + 1):
            resp = await herd.admin.put("/admin/fees/fake-model", json={**absurd, "base_fee": base})
            assert resp.status_code == 400, resp.text
            assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == ("fees_too_high", "fees")
        assert (await herd.admin.get("/admin/fees")).json()["fake-model"] == absurd, "a refused PUT changes nothing"
        resp = await herd.admin.put(
            "/admin/fees/*", json={"base_fee": 0, "prompt_token_fee": 0, "completion_token_fee": 10**12}
        )
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "fees_too_high"

        resp = await herd.admin.put("/admin/fees/fake-model", json={**absurd, "base_fee": most})
        assert resp.status_code == 200, resp.text
        # The highest bid and the most tokens: held (and refused for want of credit, not with a 500).
        big = await herd.account("big", 10**15)
        try:
            resp = await big.post("/v1/completions", json={**body, "bid": 1000, "max_tokens": 32768})
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["cost_credits"] == 1000 * (most + 7 + 2 * 5)
            resp = await alice.post("/v1/completions", json={**body, "bid": 1000, "max_tokens": 32768})
            assert resp.status_code == 402 and resp.json()["error"]["code"] == "insufficient_funds"
        finally:
            await big.aclose()
    finally:
        await alice.aclose()
