"""Batches through the real openai client (issue 28, item 3): files and batches as OpenAI's, each line priced, held
and settled like any request at the batch's discount, queued behind every interactive request, cancelled, stopped
when the balance runs out, refunded when it fails, bounded, and private to its account.

A fake node with one slot holds every request at a gate the test opens one request at a time, so the order in
which requests reach the node is the dispatcher's, and the test asserts on it, never on time.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from llamakit.router.ledger import Remembered, hash_key, ledger_at
from llamakit.router.ledger._batches import NewLine, line_key
from tests.router.ledger.conftest import postgres_schema
from tests.support.fake_node import FakeNode, Script
from tests.support.herd import Herd

FEES = (10, 1, 2)  # base, prompt, completion: the Herd's
MODEL = "fake-model"


def price(prompt_tokens: int, completion_tokens: int, discount: str = "0.5") -> int:
    """What a batch line costs: ceil(discount × (base + prompt × p + completion × c)), rounded up once."""
    base, prompt, completion = FEES
    return math.ceil(Decimal(discount) * (base + prompt * prompt_tokens + completion * completion_tokens))


def line(i: int, *, words: int = 1, max_tokens: int = 3, **body: Any) -> dict[str, Any]:
    text = f"batch{i}" + " w" * (words - 1)
    return {
        "custom_id": f"line-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(x) for x in lines).encode() + b"\n"


class Tenant:
    """An account's openai client and its httpx client on the router."""

    def __init__(self, herd: Herd, http: httpx.AsyncClient) -> None:
        assert herd.router is not None
        self.http = http
        self.key = http.headers["Authorization"].removeprefix("Bearer ")
        self.openai = AsyncOpenAI(base_url=herd.router.url + "/v1", api_key=self.key, max_retries=0)

    async def submit(self, lines: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> Any:
        upload = await self.openai.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
        return await self.openai.batches.create(
            input_file_id=upload.id,
            endpoint=endpoint,
            completion_window="24h",
            metadata={"test": "yes"},  # type: ignore[arg-type]
        )

    async def finished(self, batch_id: str) -> Any:
        for _ in range(1000):
            batch = await self.openai.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
            await asyncio.sleep(0.01)
        raise AssertionError(f"batch {batch_id} did not finish: {batch}")

    async def lines_of(self, file_id: str | None) -> dict[str, dict[str, Any]]:
        if file_id is None:
            return {}
        content = await self.openai.files.content(file_id)
        return {x["custom_id"]: x for x in map(json.loads, content.text.splitlines())}

    async def close(self) -> None:
        await self.openai.close()
        await self.http.aclose()


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for `check()` to hold: an event the test waits for, not a time it asserts on."""
    for _ in range(2000):
        if await check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def stats(herd: Herd) -> dict[str, Any]:
    assert herd.admin is not None
    answer: dict[str, Any] = (await herd.admin.get("/admin/stats")).json()
    return answer


class Gate:
    """The node's gate: each `step()` lets the requests held at the node go, and waits for the next to arrive."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.event = asyncio.Event()
        node.script.gate = self.event

    def tags(self) -> list[str]:
        """What reached the node, in order: 'batchN' for line N, 'askN' for interactive request N."""
        return [(r.get("prompt") or r["messages"][0]["content"]).split()[0] for r in self.node.received]

    async def arrived(self, count: int) -> None:
        await until(lambda: _true(len(self.node.received) >= count), f"{count} requests at the node")

    async def step(self) -> None:
        before = len(self.node.received)
        self.event.set()
        self.event.clear()
        await self.arrived(before + 1)


async def _true(value: bool) -> bool:
    return value


@pytest.fixture(params=["sqlite", "postgres"])  # before `herd`, so that it is torn down after the books are read
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.db")
    else:
        async with postgres_schema() as url:
            yield url


async def started(herd: Herd, *, slots: int = 1, gate: bool = False, **settings: Any) -> tuple[FakeNode, Gate | None]:
    node = await herd.add_node(FakeNode("n1", slots=slots, script=Script(tokens=5), openai_shapes=True))
    opened = Gate(node) if gate else None
    await herd.start(**settings)
    return node, opened


async def test_a_batch_waits_behind_every_interactive_request_and_costs_its_discount(db: str, herd: Herd) -> None:
    _node, gate = await started(herd, gate=True, db=db)
    assert gate is not None
    alice = Tenant(herd, await herd.account("alice", 1_000_000))
    asks: list[asyncio.Task[Any]] = []

    def ask() -> None:
        n = len(asks)
        asks.append(asyncio.create_task(alice.openai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"ask{n} one two"}], max_tokens=4,
        )))  # fmt: skip

    async def interactive_waiting(n: int) -> None:
        async def check() -> bool:
            return int((await alice.http.get("/v1/info")).json()["queue_length"]) == n

        await until(check, f"{n} interactive requests waiting")

    async def line_waiting() -> None:
        async def check() -> bool:
            return bool((await stats(herd))["batches"]["here"].get("waiting") == 1)

        await until(check, "a batch line held and waiting for the slot")

    # An interactive request holds the node's one slot; the batch's first line is held and waits for it.
    ask()
    await gate.arrived(1)
    lines = [line(i, words=1 + i % 4, max_tokens=1 + i % 5) for i in range(50)]
    batch = await alice.submit(lines)
    assert (batch.status, batch.request_counts.total, batch.model_extra["discount"]) == ("in_progress", 50, "0.5")
    await line_waiting()
    # Two interactive requests come after it and go before it: the slot is theirs as long as one waits.
    ask(), ask()
    await interactive_waiting(2)
    for _ in range(3):
        await gate.step()
    assert gate.tags() == ["ask0", "ask1", "ask2", "batch0"]
    for _ in range(2):  # and so again mid-batch, twice
        for _ in range(15):
            await gate.step()
        running = gate.tags()[-1]  # a line on the node
        ask()  # waits for the slot; when it has it, the next line is held and waits behind it
        await interactive_waiting(1)
        await gate.step()
        await line_waiting()
        ask(), ask()  # these come after the waiting line, and go before it
        await interactive_waiting(2)
        for _ in range(3):
            await gate.step()
        n = len(asks)
        following = f"batch{int(running.removeprefix('batch')) + 1}"
        assert gate.tags()[-5:] == [running, f"ask{n - 3}", f"ask{n - 2}", f"ask{n - 1}", following], gate.tags()
    gate.event.set()  # the rest of the batch, with nothing else waiting
    done = await alice.finished(batch.id)
    await asyncio.gather(*asks)
    tags = gate.tags()
    assert sorted(t for t in tags if t.startswith("batch")) == sorted(f"batch{i}" for i in range(50))
    assert len(tags) == 50 + len(asks) == 59

    # Each line cost its discount on its exact tokens; the batch's usage and the ledger agree.
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 50, 0)
    outputs = await alice.lines_of(done.output_file_id)
    assert done.error_file_id is None and sorted(outputs) == sorted(x["custom_id"] for x in lines)
    costs = {}
    for i, sent in enumerate(lines):
        out = outputs[sent["custom_id"]]
        assert out["error"] is None and out["response"]["status_code"] == 200
        body = out["response"]["body"]
        usage = body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (1 + i % 4 + 3, min(5, 1 + i % 5))
        costs[body["id"]] = usage["cost_credits"]
        assert usage["cost_credits"] == price(usage["prompt_tokens"], usage["completion_tokens"])
        assert out["response"]["request_id"] == body["id"] and body["object"] == "chat.completion"
    assert done.usage is not None and done.usage.model_extra["cost_credits"] == sum(costs.values())
    assert done.usage.input_tokens == sum(1 + i % 4 + 3 for i in range(50))
    records = (await alice.http.get("/v1/account/usage", params={"limit": 200})).json()["data"]
    by_id = {r["request_id"]: r for r in records}
    assert {rid: by_id[rid]["cost_credits"] for rid in costs} == costs
    assert {by_id[rid]["bid"] for rid in costs} == {"0.5"}
    asked = sum(a.result().usage.model_extra["cost_credits"] for a in asks)
    books = await herd.books()
    assert books["balanced"] and books["holds"] == 0 and books["charges"] == sum(costs.values()) + asked
    assert (await stats(herd))["batches"]["open"] == {"in_progress": 0, "cancelling": 0}
    await alice.close()


async def test_the_batch_discount_is_published_before_a_batch_is_made(herd: Herd) -> None:
    await started(herd, batch_discount="0.25")
    alice = Tenant(herd, await herd.account("alice", 100_000))
    info = (await alice.http.get("/v1/info")).json()
    [model] = (await alice.http.get("/v1/models")).json()["data"]
    assert info["batch_discount"] == model["batch_discount"] == "0.25"
    batch = await alice.submit([line(0, max_tokens=3)])
    assert batch.model_extra["discount"] == info["batch_discount"]
    done = await alice.finished(batch.id)
    [out] = (await alice.lines_of(done.output_file_id)).values()
    usage = out["response"]["body"]["usage"]
    assert usage["cost_credits"] == price(usage["prompt_tokens"], usage["completion_tokens"], discount="0.25")
    await alice.close()


async def test_cancel_stops_the_lines_not_started_and_charges_those_that_ran(herd: Herd) -> None:
    _node, gate = await started(herd, slots=2, gate=True)
    assert gate is not None
    alice = Tenant(herd, await herd.account("alice", 1_000_000))
    ask = asyncio.create_task(alice.openai.completions.create(model=MODEL, prompt="ask0 one", max_tokens=2))
    await gate.arrived(1)
    batch = await alice.submit([line(i) for i in range(10)])
    await gate.arrived(2)  # line 0 is on the node; line 1 is held and waits for a slot
    await until(lambda: _here(herd, "waiting", 1), "a line waiting")
    cancelling = await alice.openai.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    await until(lambda: _here(herd, "waiting", 0), "the waiting line gone")
    gate.event.set()
    done = await alice.finished(batch.id)
    await ask
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("cancelled", 1, 9)
    assert done.cancelled_at is not None
    ran = await alice.lines_of(done.output_file_id)
    assert list(ran) == ["line-0"]
    errors = await alice.lines_of(done.error_file_id)
    assert sorted(errors) == [f"line-{i}" for i in range(1, 10)]
    assert {(e["response"], e["error"]["code"]) for e in errors.values()} == {(None, "batch_cancelled")}
    assert gate.tags() == ["ask0", "batch0"]  # line 1 never reached the node
    records = (await alice.http.get("/v1/account/usage")).json()["data"]
    assert sorted((r["status"], r["cost_credits"] > 0) for r in records) == [
        ("cancelled", False), ("ok", True), ("ok", True),  # line 1 refunded; line 0 and the ask charged
    ]  # fmt: skip
    assert done.usage is not None and done.usage.model_extra["cost_credits"] == ran["line-0"]["response"]["body"][
        "usage"]["cost_credits"]  # fmt: skip
    again = await alice.openai.batches.cancel(batch.id)
    assert again.status == "cancelled"
    await alice.close()


async def _here(herd: Herd, what: str, n: int) -> bool:
    return bool((await stats(herd))["batches"]["here"].get(what) == n)


async def test_a_batch_the_balance_cannot_pay_stops_with_its_remaining_lines_marked(herd: Herd) -> None:
    await started(herd)
    # Each line holds for its prompt bound and max_tokens and is charged for far less: the balance pays a few.
    hold = price(len(b"batch0") + 64 + 8, 5)
    charge = price(1 + 3, 5)
    deposit = 3 * hold
    ran = (deposit - hold) // charge + 1
    alice = Tenant(herd, await herd.account("alice", deposit))
    batch = await alice.submit([line(i, max_tokens=5) for i in range(10)])
    done = await alice.finished(batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("failed", ran, 10 - ran)
    assert done.errors is not None and [e.code for e in done.errors.data] == ["insufficient_quota"]
    errors = await alice.lines_of(done.error_file_id)
    assert len(errors) == 10 - ran and {e["error"]["code"] for e in errors.values()} == {"insufficient_quota"}
    account = (await alice.http.get("/v1/account")).json()
    assert (account["balance"], account["held"], account["spent"]) == (deposit - ran * charge, 0, ran * charge)
    assert account["balance"] < hold
    await alice.close()


class PickyNode(FakeNode):
    """Refuses (400, as a node refuses a prompt over its context) every prompt that says "refuse"."""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "refuse" in json.dumps(body):
            self.received.append(body)
            error = {
                "message": "the prompt is too long",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            }
            return web.json_response({"error": error}, status=400)
        return await super().generate(request)


async def test_a_line_that_fails_is_refunded_and_in_the_error_file(herd: Herd) -> None:
    await herd.add_node(PickyNode("n1", script=Script(tokens=2), openai_shapes=True))
    await herd.start(max_tokens_limit=64)
    alice = Tenant(herd, await herd.account("alice", 100_000))
    refused = line(1)
    refused["body"]["messages"][0]["content"] = "refuse me"
    lines = [line(0), refused, line(2, max_tokens=100), line(3)]
    done = await alice.finished((await alice.submit(lines)).id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 2, 2)
    assert sorted(await alice.lines_of(done.output_file_id)) == ["line-0", "line-3"]
    with pytest.raises(openai.BadRequestError, match="not an input file") as caught:
        await alice.openai.batches.create(input_file_id=str(done.output_file_id), endpoint="/v1/chat/completions",
                                          completion_window="24h")  # fmt: skip
    assert caught.value.body["code"] == "invalid_value"  # type: ignore[index]
    outputs = (await alice.http.get("/v1/files", params={"purpose": "batch_output"})).json()["data"]
    assert sorted(f["id"] for f in outputs) == sorted([done.output_file_id, done.error_file_id])
    assert {f["purpose"] for f in outputs} == {"batch_output"}
    errors = await alice.lines_of(done.error_file_id)
    node_said, too_many = errors["line-1"]["response"], errors["line-2"]["response"]
    assert (node_said["status_code"], node_said["body"]["error"]["code"]) == (400, "context_length_exceeded")
    assert (too_many["status_code"], too_many["body"]["error"]["param"]) == (400, "max_tokens")
    records = {r["request_id"]: r for r in (await alice.http.get("/v1/account/usage")).json()["data"]}
    # The node's refusal: held, then released in full; the line over the limit: refused before any hold.
    assert (records[node_said["request_id"]]["cost_credits"], records[node_said["request_id"]]["held"]) == (0, price(
        len("refuse me") + 64 + 8, 3))  # fmt: skip
    assert (records[too_many["request_id"]]["held"], records[too_many["request_id"]]["http_status"]) == (0, 400)
    # Every line's record has the batch's bid, its discount, refusals included: in the ledger and the usage log.
    assert {r["bid"] for r in records.values()} == {"0.5"} and len(records) == 4
    recent = {r["request_id"]: r for r in (await stats(herd))["requests"]["recent"]}
    assert {recent[rid]["bid"] for rid in records} == {"0.5"}
    await alice.close()


async def test_files_and_batches_are_bounded_with_400s_that_name_the_limit(herd: Herd) -> None:
    await started(herd, batch_max_lines=3, batch_max_file_bytes=2048, max_body_bytes=1024)
    alice = Tenant(herd, await herd.account("alice", 100_000))

    async def refused(content: bytes) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as caught:
            await alice.openai.files.create(file=("f.jsonl", content), purpose="batch")
        return caught.value

    def code(error: openai.BadRequestError) -> str:
        return str(error.body["code"])  # type: ignore[index]

    assert code(await refused(jsonl([line(i) for i in range(4)]))) == "too_many_lines"
    big = await refused(jsonl([line(0, words=400), line(1, words=400), line(2, words=400)]))
    assert code(big) == "file_too_large" and "--batch-max-file-bytes" in big.message
    wide = await refused(jsonl([line(0, words=600)]))
    assert code(wide) == "line_too_large" and "line 1" in wide.message and "--max-body-bytes" in wide.message
    assert code(await refused(b'{"custom_id": "a"\n')) == "invalid_line"
    assert code(await refused(jsonl([line(0), line(0)]))) == "duplicate_custom_id"
    assert code(await refused(jsonl([{**line(0), "url": "/v1/images"}]))) == "invalid_line"
    # Every refusal has a code, and names its field, as OpenAI's do.
    with pytest.raises(openai.BadRequestError, match="purpose") as caught:
        await alice.openai.files.create(file=("f.jsonl", jsonl([line(0)])), purpose="fine-tune")
    assert (code(caught.value), caught.value.body["param"]) == ("invalid_value", "purpose")  # type: ignore[index]
    for form, files, expected in (({"purpose": "batch", "expires_after": "1"}, {"file": b"{}"}, "unsupported_field"),
                                  ({"purpose": "batch"}, {"other": b"{}"}, "unsupported_field")):  # fmt: skip
        answer = await alice.http.post("/v1/files", data=form, files=files)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == expected, answer.text
    only_purpose = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b--\r\n'
    answer = await alice.http.post(
        "/v1/files", content=only_purpose, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "invalid_file"), answer.text
    # A batch's lines go to its endpoint, answered whole, at its discount, for a model the router knows.
    for bad, what in (({**line(0), "url": "/v1/completions"}, "endpoint"), (line(0, stream=True), "stream"),
                      (line(0, bid=2), "bid")):  # fmt: skip
        upload = await alice.openai.files.create(file=("f.jsonl", jsonl([bad])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match=what):
            await alice.openai.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
    nowhere = {**line(0), "body": {**line(0)["body"], "model": "no-such-model"}}
    upload = await alice.openai.files.create(file=("f.jsonl", jsonl([nowhere])), purpose="batch")
    with pytest.raises(openai.NotFoundError, match="line 1"):
        await alice.openai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")  # fmt: skip
    assert (await alice.http.get("/v1/batches")).json()["data"] == []
    await alice.close()


async def test_another_tenant_finds_none_of_them(herd: Herd) -> None:
    await started(herd)
    alice = Tenant(herd, await herd.account("alice", 100_000))
    bob = Tenant(herd, await herd.account("bob", 100_000))
    done = await alice.finished((await alice.submit([line(0)])).id)
    upload = done.input_file_id
    for call in (
        bob.openai.files.retrieve(upload),
        bob.openai.files.content(upload),
        bob.openai.files.content(done.output_file_id or ""),
        bob.openai.files.delete(upload),
        bob.openai.batches.retrieve(done.id),
        bob.openai.batches.cancel(done.id),
        bob.openai.batches.create(input_file_id=upload, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            await call
    assert [b.id async for b in bob.openai.batches.list()] == []
    assert [f.id async for f in bob.openai.files.list()] == []
    assert [b.id async for b in alice.openai.batches.list()] == [done.id]
    assert {f.purpose async for f in alice.openai.files.list()} == {"batch", "batch_output"}
    assert (await alice.openai.files.delete(upload)).deleted
    with pytest.raises(openai.NotFoundError):
        await alice.openai.files.retrieve(upload)
    await alice.close()
    await bob.close()


async def test_batches_page_as_openai_pages_them(herd: Herd) -> None:
    await started(herd)
    alice = Tenant(herd, await herd.account("alice", 100_000))
    made = [(await alice.submit([line(i)])).id for i in range(5)]
    page = await alice.openai.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id async for b in await alice.openai.batches.list(limit=2)] == made[::-1]  # every page, in turn
    for batch_id in made:
        await alice.finished(batch_id)
    await alice.close()


async def test_a_line_settled_by_a_router_that_died_is_not_run_again(herd: Herd, tmp_path: Path) -> None:
    """The router settled a line (its answer remembered with the charge) and died before it wrote the line's end:
    the next router finds the answer under the line's key and does not run it again."""
    answer = {"id": "req-first", "object": "chat.completion", "model": MODEL, "choices": [],
              "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5, "cost_credits": 8}}  # fmt: skip
    async with ledger_at(tmp_path / "ledger.db") as ledger:
        alice = await ledger.create_account("alice")
        await ledger.deposit(alice.id, 1000)
        key = await ledger.create_key(alice.id)
        store = ledger.batch_store
        upload = await store.create_file(alice.id, purpose="batch", filename="f", content=jsonl([line(0)]), lines=1)
        batch = await store.create_batch(
            alice.id, key_hash=hash_key(key), input_file_id=upload.id,
            endpoint="/v1/chat/completions", completion_window="24h", model=MODEL, metadata=None, discount="0.5",
            expires=2e9, lines=[NewLine(MODEL, json.dumps(line(0)))],
        )  # fmt: skip
        [claimed] = await store.claim_lines("router", {MODEL: 1})
        await ledger.hold(alice.id, 50, request_id="req-first", model=MODEL, bid="0.5")
        remembered = Remembered(line_key(batch.id, 0), "fp", json.dumps({"body": answer, "headers": {}}))
        await ledger.settle("req-first", charge=8, node="n1", prompt_tokens=4, completion_tokens=1, remember=remembered)
        assert claimed.key == line_key(batch.id, 0)  # left running, as by a router that died here
    node, _ = await started(herd)
    tenant = Tenant(herd, httpx.AsyncClient(base_url=herd.router.url, headers={"Authorization": f"Bearer {key}"}))  # type: ignore[union-attr]
    done = await tenant.finished(batch.id)
    assert (done.status, done.request_counts.completed) == ("completed", 1)
    assert node.received == []
    [out] = (await tenant.lines_of(done.output_file_id)).values()
    assert out["response"]["body"]["id"] == "req-first" and out["response"]["request_id"] == "req-first"
    assert (await herd.books())["charges"] == 8
    await tenant.close()
