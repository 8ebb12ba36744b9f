"""Files and batches in the ledger's database (`ledger.batch_store`), on both backends: an account's files and
batches are its own, lines are claimed once, a batch finishes with its last line, and lines of a router that
died go back to pending."""

from __future__ import annotations

import asyncio
import json

import pytest

from llamakit.router.ledger import Ledger, ledger_at
from llamakit.router.ledger._batches import ClaimedLine, LineOutcome, NewLine, StoredBatch

LINES = [NewLine("m1", json.dumps({"custom_id": f"c{i}"})) for i in range(5)] + [NewLine("m2", '{"custom_id": "x"}')]


def cancelled(request: str) -> str:
    return json.dumps({"custom_id": json.loads(request)["custom_id"], "error": {"code": "batch_cancelled"}})


async def new_batch(
    ledger: Ledger, account_id: int, lines: list[NewLine] = LINES, expires: float = 1e12
) -> StoredBatch:
    store = ledger.batch_store
    file = await store.create_file(account_id, purpose="batch", filename="in.jsonl", content=b"{}\n", lines=1)
    return await store.create_batch(
        account_id, key_hash="k" * 64, input_file_id=file.id, endpoint="/v1/chat/completions",
        completion_window="24h", model="m1", metadata={"run": "1"}, discount="0.5", expires=expires, lines=lines,
    )  # fmt: skip


def ok(line: ClaimedLine, cost: int = 7) -> LineOutcome:
    return LineOutcome("completed", json.dumps({"line": line.line, "ok": True}), 3, 2, 1, cost)


async def test_files_belong_to_their_account_and_page_newest_first(ledger: Ledger) -> None:
    alice, bob = await ledger.create_account("alice"), await ledger.create_account("bob")
    store = ledger.batch_store
    made = [
        await store.create_file(alice.id, purpose="batch", filename=f"f{i}.jsonl", content=b"x" * i, lines=i)
        for i in range(1, 4)
    ]
    assert await store.find_file(alice.id, made[0].id) == made[0]
    assert await store.find_file(bob.id, made[0].id) is None
    assert await store.file_content(made[2]) == b"xxx"
    assert [f.id for f in await store.files(alice.id, after=None, limit=2, purpose=None, ascending=False)] == [
        made[2].id, made[1].id,
    ]  # fmt: skip
    assert [f.id for f in await store.files(alice.id, after=made[1].id, limit=5, purpose="batch", ascending=False)] == [
        made[0].id
    ]
    assert [f.id for f in await store.files(alice.id, after=made[0].id, limit=5, purpose=None, ascending=True)] == [
        made[1].id, made[2].id,
    ]  # fmt: skip
    assert await store.files(bob.id, after=None, limit=5, purpose=None, ascending=False) == []
    assert not await store.delete_file(bob.id, made[0].id)
    assert await store.delete_file(alice.id, made[0].id)
    assert await store.find_file(alice.id, made[0].id) is None


async def test_a_batch_runs_its_lines_once_and_finishes_with_the_last(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    store = ledger.batch_store
    batch = await new_batch(ledger, alice.id)
    assert (batch.status, batch.total) == ("in_progress", 6)
    assert await store.find_batch(alice.id, batch.id) == batch
    first = await store.claim_lines("r1", {"m1": 2, "m2": 0})
    assert [(c.line, c.model, c.attempt, c.discount) for c in first] == [(0, "m1", 1, "0.5"), (1, "m1", 1, "0.5")]
    assert first[0].key == f"batch:{batch.id}:0"
    rest = await store.claim_lines("r1", {"m1": 10, "m2": 10})
    assert sorted(c.line for c in rest) == [2, 3, 4, 5]
    assert await store.claim_lines("r1", {"m1": 10, "m2": 10}) == []  # nothing twice
    assert await store.running_lines(batch.id) == 6
    view = await store.overview(limit=5)
    assert (view.open, view.pending, view.running) == ({"in_progress": 1, "cancelling": 0}, 0, 6)
    assert [(b.id, name) for b, name in view.shown] == [(batch.id, "alice")]
    for line in first + rest[:-1]:
        assert await store.finish_line(line, "r1", ok(line))
    failed = LineOutcome("failed", json.dumps({"line": 5, "error": "boom"}))
    assert not await store.finish_line(rest[-1], "r2", failed)  # another router's claim
    assert (await store.find_batch(alice.id, batch.id)).status == "in_progress"  # type: ignore[union-attr]
    assert await store.finish_line(rest[-1], "r1", failed)
    done = await store.find_batch(alice.id, batch.id)
    assert done is not None and done.status == "completed" and done.finished is not None
    assert (done.completed, done.failed, done.prompt_tokens, done.completion_tokens, done.cost) == (5, 1, 15, 10, 35)
    assert not await store.finish_line(rest[-1], "r1", failed)  # once only
    output = await store.find_file(alice.id, done.output_file_id or "")
    errors = await store.find_file(alice.id, done.error_file_id or "")
    assert output is not None and errors is not None
    assert (output.purpose, output.kind, output.lines, errors.lines) == ("batch_output", "output", 5, 1)
    lines = await store.output_lines(batch.id, "output", after=-1, limit=3)
    assert [n for n, _ in lines] == [0, 1, 2]
    assert [n for n, _ in await store.output_lines(batch.id, "output", after=2, limit=10)] == [3, 4]
    assert output.bytes == sum(len(text) + 1 for _, text in await store.output_lines(batch.id, "output", after=-1,
                                                                                       limit=10))  # fmt: skip
    assert await store.output_lines(batch.id, "errors", after=-1, limit=10) == [(5, failed.output)]
    assert (await store.overview(limit=5)).open == {"in_progress": 0, "cancelling": 0}


async def test_cancel_fails_the_pending_lines_and_waits_for_the_running_ones(ledger: Ledger) -> None:
    alice, bob = await ledger.create_account("alice"), await ledger.create_account("bob")
    store = ledger.batch_store
    batch = await new_batch(ledger, alice.id)
    running = await store.claim_lines("r1", {"m1": 2})
    assert await store.cancel_batch(bob.id, batch.id, cancelled) is None
    cancelling = await store.cancel_batch(alice.id, batch.id, cancelled)
    assert cancelling is not None and (cancelling.status, cancelling.failed) == ("cancelling", 4)
    assert await store.claim_lines("r1", {"m1": 10, "m2": 10}) == []
    assert await store.finish_line(running[0], "r1", ok(running[0]))
    assert await store.finish_line(running[1], "r1", LineOutcome("failed", cancelled(running[1].request)))
    done = await store.find_batch(alice.id, batch.id)
    assert done is not None and (done.status, done.completed, done.failed) == ("cancelled", 1, 5)
    errors = await store.output_lines(batch.id, "errors", after=-1, limit=10)
    assert [json.loads(text)["custom_id"] for _, text in errors] == ["c1", "c2", "c3", "c4", "x"]
    again = await store.cancel_batch(alice.id, batch.id, cancelled)
    assert again is not None and again.status == "cancelled"


async def test_a_stopped_batch_fails_and_an_expired_one_expires(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    store = ledger.batch_store
    stopped = await new_batch(ledger, alice.id)
    [line] = await store.claim_lines("r1", {"m1": 1})
    reason = {"code": "insufficient_quota", "message": "the balance ran out"}
    await store.stop_batch(stopped.id, reason, cancelled)
    assert (await store.find_batch(alice.id, stopped.id)).status == "in_progress"  # type: ignore[union-attr]
    assert await store.finish_line(line, "r1", ok(line))
    done = await store.find_batch(alice.id, stopped.id)
    assert done is not None and (done.status, done.stopped, done.completed, done.failed) == ("failed", reason, 1, 5)

    late = await new_batch(ledger, alice.id, expires=1.0)
    assert await store.expire_batches({"code": "batch_expired", "message": "late"}, cancelled) == [late.id]
    expired = await store.find_batch(alice.id, late.id)
    assert expired is not None and (expired.status, expired.failed, expired.output_file_id) == ("expired", 6, None)
    assert expired.stopped is not None and expired.stopped["code"] == "batch_expired"


async def test_lines_of_a_router_that_died_go_back_to_pending(ledger: Ledger) -> None:
    alice = await ledger.create_account("alice")
    store = ledger.batch_store
    batch = await new_batch(ledger, alice.id)
    lost = await store.claim_lines("dead", {"m1": 3})
    assert await store.requeue_lost("me", cluster=False, start=True) == 3
    again = await store.claim_lines("me", {"m1": 3})
    assert [(c.line, c.attempt) for c in again] == [(0, 2), (1, 2), (2, 2)]
    assert not await store.finish_line(lost[0], "dead", ok(lost[0]))  # its claim was lost with it
    assert not await store.return_line(lost[1], "dead")
    assert await store.return_line(again[1], "me")
    assert [c.line for c in await store.claim_lines("me", {"m1": 1})] == [1]
    assert (await store.statuses([batch.id, "batch_nope"])) == {batch.id: "in_progress"}


async def test_routers_on_one_database_never_claim_the_same_line(url: str) -> None:
    if not url.startswith("postgres"):
        pytest.skip("one router per SQLite ledger")
    ledgers = [ledger_at(url) for _ in range(4)]
    await asyncio.gather(*(ledger.open() for ledger in ledgers))
    try:
        alice = await ledgers[0].create_account("alice")
        batch = await new_batch(ledgers[0], alice.id, [NewLine("m1", "{}") for _ in range(200)])
        claimed: list[list[ClaimedLine]] = [[] for _ in ledgers]

        async def claim(i: int) -> None:
            while lines := await ledgers[i].batch_store.claim_lines(f"r{i}", {"m1": 3}):
                claimed[i] += lines
                for line in lines:
                    assert await ledgers[i].batch_store.finish_line(line, f"r{i}", ok(line, 1))

        await asyncio.gather(*(claim(i) for i in range(len(ledgers))))
        lines = sorted(c.line for mine in claimed for c in mine)
        assert lines == list(range(200))
        done = await ledgers[0].batch_store.find_batch(alice.id, batch.id)
        assert done is not None and (done.status, done.completed, done.cost) == ("completed", 200, 200)
        # With several routers, only the lines of routers without a live lease go back (none is in `routers`).
        again = await new_batch(ledgers[0], alice.id, [NewLine("m1", "{}") for _ in range(2)])
        await ledgers[1].batch_store.claim_lines("gone", {"m1": 1})
        await ledgers[1].batch_store.claim_lines("me", {"m1": 1})
        assert await ledgers[2].batch_store.requeue_lost("me", cluster=True, start=False) == 1  # not its own
        assert await ledgers[2].batch_store.running_lines(again.id) == 1
        assert await ledgers[2].batch_store.requeue_lost("me", cluster=True, start=True) == 1  # an earlier life's
        assert await ledgers[2].batch_store.running_lines(again.id) == 0
    finally:
        await asyncio.gather(*(ledger.close() for ledger in ledgers))
