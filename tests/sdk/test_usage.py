"""Usage accounting: one record per call under many threads, tasks and processes; JSONL lines; frames; meters."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pandas as pd  # type: ignore[import-untyped]
import pytest

import llamakit.sdk as sdk
from llamakit.sdk import _retry

URL = "http://router.test"
LONG = "x" * 6000  # longer than PIPE_BUF and a page: a torn write would show


def answer(request: httpx.Request) -> httpx.Response:
    """Completions that echo the prompt upper-cased; prompts starting with "bad" fail with a long message."""
    body = json.loads(request.content)
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    if prompt.startswith("bad"):
        error = {"message": f"bad prompt {LONG}", "type": "invalid_request_error", "param": None, "code": None}
        return httpx.Response(400, json={"error": error})
    # 7 credits at a router whose credit is worth 0.0025 EUR
    usage: dict[str, object] = {
        "prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2, "cost": 0.0175,
        "cost_credits": 7,
    }  # fmt: skip
    if prompt.startswith("cached"):
        usage["prompt_tokens_details"] = {"cached_tokens": 3}
    if prompt.startswith("older"):  # a router older than prices in a currency: cost was the credits
        usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cost": 7}
        return httpx.Response(200, json={"id": "req-x", "model": "m", "choices": [{"text": "OLD"}], "usage": usage})
    choice = {"index": 0, "text": prompt.upper(), "finish_reason": "stop"}
    body = {"id": "req-x", "model": "m", "choices": [choice], "usage": usage}
    return httpx.Response(200, json=body, headers={"X-Llamakit-Currency": "EUR"})


def sync_client(**kwargs: object) -> sdk.Client:
    kwargs.setdefault("usage_log", None)
    http = httpx.Client(transport=httpx.MockTransport(answer))
    return sdk.Client(url=URL, api_key="lk", http_client=http, **kwargs)  # type: ignore[arg-type]


def async_client(**kwargs: object) -> sdk.AsyncClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    return sdk.AsyncClient(url=URL, api_key="lk", http_client=http, **kwargs)  # type: ignore[arg-type]


WRITER = textwrap.dedent(
    """
    import sys, threading, time
    from datetime import UTC, datetime
    from pathlib import Path
    from llamakit.sdk import UsageBook, UsageRecord

    log, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    book = UsageBook(log)
    while not go.exists():
        time.sleep(0.001)

    def write(n):
        for i in range(n):
            book.add(UsageRecord(time=datetime.now(UTC), kind="generate", status="error", error="p" * 6000,
                                 idempotency_key=f"proc-{threading.get_ident()}-{i}"))

    threads = [threading.Thread(target=write, args=(count // 4,)) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    """
)


def test_many_threads_tasks_and_processes_record_every_call_once_in_whole_lines(tmp_path: Path) -> None:
    log, go = tmp_path / "usage.jsonl", tmp_path / "go"
    other = subprocess.Popen([sys.executable, "-c", WRITER, str(log), str(go), "400"])
    client = sync_client(usage_log=log, max_retries=0)
    threads, per_thread, tasks = 16, 25, 200

    def work(worker: int) -> None:
        for i in range(per_thread):
            prompt = f"bad {worker}-{i}" if i % 3 == 0 else f"ok {worker}-{i}"
            with contextlib.suppress(sdk.BadRequestError):
                client.generate(prompt)

    async def many_tasks() -> None:
        async with async_client(usage=client.usage) as aclient:

            async def one(i: int) -> None:
                with contextlib.suppress(sdk.BadRequestError):
                    await aclient.chat(f"bad {i}" if i % 2 else f"ok {i}")

            await asyncio.gather(*(one(i) for i in range(tasks)))

    time.sleep(0.3)  # let the other process get to its start line
    go.touch()
    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for w in workers:
        w.start()
    asyncio.run(many_tasks())
    for w in workers:
        w.join()
    assert other.wait(30) == 0

    ours = threads * per_thread + tasks
    assert len(client.usage) == ours
    assert len({r.idempotency_key for r in client.usage_records}) == ours
    raw = log.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == ours + 400
    records = [sdk.UsageRecord.model_validate_json(line) for line in lines]  # each line is whole JSON
    assert sum(r.idempotency_key is not None and r.idempotency_key.startswith("proc-") for r in records) == 400
    assert sum(r.status == "error" for r in client.usage_records) == 16 * 9 + 100
    frame = sdk.read_usage_log(log)
    assert len(frame) == ours + 400 and str(frame["time"].dtype) == "datetime64[ns, UTC]"


EXPECTED_DTYPES = {
    "time": "datetime64[ns, UTC]",
    "kind": "category",
    "stream": "bool",
    "model": "category",
    "node": "category",
    "request_id": "string",
    "idempotency_key": "string",
    "status": "category",
    "status_code": "Int64",
    "prompt_tokens": "Int64",
    "cached_tokens": "Int64",
    "completion_tokens": "Int64",
    "total_tokens": "Int64",
    "cost": "float64",
    "cost_credits": "Int64",
    "cache_discount": "float64",
    "cache_discount_credits": "Int64",
    "currency": "category",
    "passed_over": "string",
    "bid": "float64",
    "latency": "float64",
    "ttft": "float64",
    "queue_wait": "float64",
    "attempts": "Int64",
    "error_type": "category",
    "error": "string",
    "user": "string",
}


def test_usage_frame_has_proper_dtypes_with_and_without_records() -> None:
    client = sync_client(max_retries=0)
    empty = client.usage_frame()
    assert len(empty) == 0 and {c: str(t) for c, t in empty.dtypes.items()} == EXPECTED_DTYPES
    client.generate("ok one")
    with pytest.raises(sdk.BadRequestError):
        client.generate("bad one")
    frame = client.usage_frame()
    assert {c: str(t) for c, t in frame.dtypes.items()} == EXPECTED_DTYPES == sdk.FRAME_DTYPES
    ok, bad = frame.iloc[0], frame.iloc[1]
    assert ok["total_tokens"] == 8 and ok["cost_credits"] == 7 and pd.isna(ok["error"])
    assert (ok["cost"], ok["currency"]) == (0.0175, "EUR")
    assert pd.isna(bad["cost_credits"]) and pd.isna(bad["cost"]) and pd.isna(bad["prompt_tokens"])
    assert bad["status_code"] == 400
    assert bad["error_type"] == "BadRequestError" and bad["error"].startswith("bad prompt")
    assert frame["time"].iloc[0] <= pd.Timestamp(datetime.now(UTC))
    assert frame["cost_credits"].sum() == 7  # NA is skipped, not turned into a float


def test_the_jsonl_log_from_the_environment_reads_back_as_the_same_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "logs" / "usage.jsonl"
    monkeypatch.setenv("LLAMAKIT_USAGE_LOG", str(log))
    client = sync_client(usage_log=sdk.NOT_GIVEN)
    client.generate("ok a")
    client.chat("ok b", bid=1.5)
    pd.testing.assert_frame_equal(sdk.read_usage_log(log), client.usage_frame())
    assert sync_client().usage.log_path is None  # usage_log=None turns the environment's log off
    with pytest.raises(OSError, match="cannot be written"):
        sdk.UsageBook(log / "under-a-file.jsonl")


def test_meter_collects_the_calls_in_its_block_and_nests() -> None:
    client = sync_client(max_retries=0)
    client.generate("ok before")
    with sdk.meter() as outer:
        client.generate("ok one")
        with sdk.meter() as inner:
            client.chat("ok two")
            with pytest.raises(sdk.BadRequestError):
                client.generate("bad three")
        # a thread started with a copy of the context is inside the block too
        ctx = contextvars.copy_context()
        thread = threading.Thread(target=ctx.run, args=(client.generate, "ok four"))
        thread.start()
        thread.join()
    client.generate("ok after")
    assert (outer.calls, inner.calls, outer.errors, inner.errors) == (4, 2, 1, 1)
    assert outer.cost_credits == 21 and inner.cost_credits == 7
    # The price is an exact sum of exact decimals: 3 × 0.0175, where floats would give 0.052500000000000005.
    assert (outer.cost, outer.currency, inner.cost) == (Decimal("0.0525"), "EUR", Decimal("0.0175"))
    assert "21 credits (0.0525 EUR)" in outer.summary()
    assert outer.prompt_tokens == len("ok one") + len("ok two") + len("ok four")
    assert outer.completion_tokens == 6 and outer.total_tokens == outer.prompt_tokens + 6
    assert len(outer.frame()) == 4 and list(inner.frame()["status"]) == ["ok", "error"]
    assert "4 calls (1 failed)" in repr(outer) and "21 credits" in outer._repr_html_()


async def test_meter_as_an_async_context_manager_sees_its_tasks_only() -> None:
    async with async_client(usage_log=None) as client:
        outside = asyncio.create_task(asyncio.sleep(0))
        async with sdk.meter() as m:
            await asyncio.gather(*(client.generate(f"ok {i}") for i in range(5)))
        await client.generate("ok outside")
        await outside
    assert m.calls == 5 and m.cost_credits == 35 and len(client.usage_records) == 6


def test_generate_many_keeps_order_survives_failures_and_bounds_concurrency(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as where tqdm is not installed: the text counter
    active, peak, lock = 0, 0, threading.Lock()

    def slow(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return answer(request)

    client = sdk.Client(
        url=URL, api_key="lk", usage_log=None, http_client=httpx.Client(transport=httpx.MockTransport(slow))
    )
    prompts: list[str | list[dict[str, str]]] = [f"ok {i}" for i in range(12)]
    prompts += ["bad one", [{"role": "user", "content": "ok chat"}]]
    with sdk.meter() as m:
        frame = client.generate_many(prompts, concurrency=3, max_retries=0)
    assert 1 < peak <= 3
    assert list(frame.columns[:2]) == ["prompt", "text"] and len(frame) == 14
    assert list(frame["prompt"][:12]) == [f"ok {i}" for i in range(12)] and frame["prompt"].iloc[13] == "ok chat"
    assert list(frame["text"][:12]) == [f"OK {i}" for i in range(12)] and frame["text"].iloc[13] == "OK CHAT"
    assert pd.isna(frame["text"].iloc[12]) and frame["status"].iloc[12] == "error"
    assert list(frame["kind"][-2:]) == ["generate", "chat"]
    assert str(frame["text"].dtype) == "string" and str(frame["cost_credits"].dtype) == "Int64"
    assert m.calls == 14 and len(client.usage_records) == 14
    err = capsys.readouterr().err
    assert "generate_many: 14/14 (100%)" in err
    with pytest.raises(ValueError, match="concurrency"):
        client.generate_many(["x"], concurrency=0)
    with pytest.raises(ValueError, match="idempotency key per prompt"):
        client.generate_many(["x"], idempotency_key="one-for-all")


def test_generate_many_chat_mode_and_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    client = sync_client()
    frame = client.generate_many(["ok a", "ok b"], chat=True, system="be nice", progress=False)
    assert list(frame["kind"]) == ["chat", "chat"] and list(frame["text"]) == ["OK A", "OK B"]
    assert capsys.readouterr().err == ""


def test_generation_shows_as_text_with_a_usage_line_in_a_notebook() -> None:
    result = sdk.Generation(
        text="<b>4</b> stars",
        model="smollm2",
        node="n1",
        usage=sdk.TokenUsage(prompt_tokens=7, completion_tokens=3, total_tokens=10, cost=26e-6, cost_credits=26),
        cost=Decimal("0.000026"),
        cost_credits=26,
        currency="USD",
        bid=1.0,
        latency=0.42,
        ttft=0.05,
    )
    assert str(result) == "<b>4</b> stars" and f"{result}" == "<b>4</b> stars"
    summary = (
        "smollm2 on n1 · 7 prompt + 3 completion = 10 tokens · 26 credits (0.000026 USD) at bid 1 · 0.42 s "
        "(first token 0.05 s)"
    )
    assert result.usage is not None and result.usage.cost == Decimal("0.000026")
    assert result.summary() == summary
    html = result._repr_html_()
    assert "&lt;b&gt;4&lt;/b&gt; stars" in html and "26 credits" in html and "<b>4</b>" not in html
    assert result._repr_markdown_().startswith("<b>4</b> stars\n\n<sub>smollm2 on n1")


def test_retry_sleep_hooks_are_real_sleeps() -> None:
    started = time.monotonic()
    _retry.sleep(0.01)
    asyncio.run(_retry.asleep(0.01))
    assert time.monotonic() - started >= 0.02


def test_cached_prompt_tokens_reach_the_result_the_meter_and_the_frame() -> None:
    client = sync_client()
    with sdk.meter() as m:
        cached = client.generate("cached prompt")
        plain = client.generate("plain prompt")
    assert cached.usage is not None and cached.usage.cached_tokens == 3
    assert plain.usage is not None and plain.usage.cached_tokens is None, "a node that does not say: unknown"
    assert "13 prompt (3 cached)" in cached.summary()
    assert m.cached_tokens == 3 and m.prompt_tokens == 25
    assert "25 prompt (3 cached) +" in m.summary()
    frame = m.frame()
    assert frame["cached_tokens"].iloc[0] == 3 and pd.isna(frame["cached_tokens"].iloc[1])


def test_an_older_router_that_sent_credits_as_cost_gives_credits_and_no_price(tmp_path: Path) -> None:
    client = sync_client()
    with sdk.meter() as m:
        result = client.generate("older router")
    assert (result.cost_credits, result.cost, result.currency) == (7, None, None)
    assert result.usage is not None and (result.usage.cost_credits, result.usage.cost) == (7, None)
    assert (m.cost_credits, m.cost, m.currency) == (7, Decimal(0), None)
    # A line an older SDK wrote, with `cost` in credits, reads back the same way.
    log = tmp_path / "old.jsonl"
    log.write_text('{"time": "2026-11-01T10:00:00Z", "kind": "generate", "cost": 7}\n')
    frame = sdk.read_usage_log(log)
    assert frame["cost_credits"].tolist() == [7] and pd.isna(frame["cost"].iloc[0])


def test_a_meter_does_not_add_up_prices_in_different_currencies() -> None:
    def record(currency: str) -> sdk.UsageRecord:
        now = datetime.now(UTC)
        return sdk.UsageRecord(time=now, kind="chat", cost=Decimal("0.01"), cost_credits=10, currency=currency)

    with sdk.meter() as m:
        m.add(record("EUR"))
        m.add(record("USD"))
    assert m.cost_credits == 20 and m.summary().endswith("· 20 credits")
    with pytest.raises(ValueError, match="priced in EUR, USD"):
        _ = m.cost


def test_generate_many_draws_tqdms_bar_where_tqdm_is_installed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    client = sdk.Client(
        url=URL, api_key="lk", usage_log=None, http_client=httpx.Client(transport=httpx.MockTransport(answer))
    )
    frame = client.generate_many([f"ok {i}" for i in range(5)], concurrency=2)
    assert list(frame["text"]) == [f"OK {i}" for i in range(5)]
    err = capsys.readouterr().err
    assert "generate_many: 100%" in err and "5/5" in err and "(100%)" not in err  # tqdm's bar, not the counter
