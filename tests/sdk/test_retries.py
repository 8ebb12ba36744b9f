"""The retry policy, with `httpx.MockTransport`: which failures are retried, how long between, and what is sent."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

import llamakit.sdk as sdk
from llamakit.sdk import _retry

URL = "http://router.test"
Handler = Callable[[httpx.Request], httpx.Response]


def completion(text: str = "hi", cost: int = 25) -> httpx.Response:
    body = {
        "id": "req-1",
        "object": "text_completion",
        "model": "m",
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": cost},
    }
    return httpx.Response(200, json=body, headers={"X-Llamakit-Request-Id": "req-1", "X-Llamakit-Bid": "1"})


def error(status: int, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"error": {"message": f"scripted {status}", "type": "x", "param": None, "code": code, **extra}}
    return httpx.Response(status, json=body, headers=headers)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM_BODY = sse(
    {"id": "req-s", "choices": [{"index": 0, "text": "Hel", "finish_reason": None}]},
    {"id": "req-s", "choices": [{"index": 0, "text": "lo", "finish_reason": "stop"}]},
    {
        "id": "req-s",
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "cost": 16},
    },
)


class Script:
    """Answers requests in turn from a list of responses (or exceptions), recording each request."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer) and not isinstance(answer, httpx.Response):
            return answer(request)
        return answer

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("Idempotency-Key") for r in self.requests]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the delays the clients would sleep, without sleeping."""
    slept: list[float] = []

    async def asleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(_retry, "sleep", slept.append)
    monkeypatch.setattr(_retry, "asleep", asleep)
    return slept


def client_for(script: Script, **kwargs: Any) -> sdk.Client:
    kwargs.setdefault("usage_log", None)
    return sdk.Client(
        url=URL, api_key="lk-test", http_client=httpx.Client(transport=httpx.MockTransport(script)), **kwargs
    )


def async_client_for(script: Script, **kwargs: Any) -> sdk.AsyncClient:
    transport = httpx.MockTransport(script)
    return sdk.AsyncClient(
        url=URL, api_key="lk-test", http_client=httpx.AsyncClient(transport=transport), usage_log=None, **kwargs
    )


@pytest.mark.parametrize("status", [408, 409, 429, 502, 503, 504])
def test_transient_statuses_are_retried_with_growing_jittered_backoff(status: int, sleeps: list[float]) -> None:
    script = Script(error(status), error(status), completion())
    result = client_for(script).generate("x")
    assert result.text == "hi" and result.attempts == 3 and len(script.requests) == 3
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, sdk.BadRequestError),
        (401, sdk.AuthenticationError),
        (402, sdk.InsufficientFunds),
        (403, sdk.PermissionDeniedError),
        (404, sdk.NotFoundError),
        (500, sdk.InternalServerError),
        (422, sdk.APIStatusError),
    ],
)
def test_errors_that_would_fail_again_are_not_retried(status: int, cls: type[Exception], sleeps: list[float]) -> None:
    script = Script(error(status, needed=900, balance=12))
    client = client_for(script, max_retries=5)
    with pytest.raises(cls) as caught:
        client.generate("x")
    assert type(caught.value) is cls
    assert len(script.requests) == 1 and sleeps == []
    [record] = client.usage_records
    assert (record.status, record.status_code, record.error_type) == ("error", status, cls.__name__)
    if status == 402:
        assert isinstance(caught.value, sdk.InsufficientFunds)
        assert (caught.value.needed, caught.value.balance) == (900, 12)


def test_queue_full_has_its_own_class_and_the_backoff_is_capped(sleeps: list[float]) -> None:
    script = Script(error(429, code="queue_full"))
    with pytest.raises(sdk.QueueFullError):
        client_for(script, max_retries=6).generate("x")
    assert len(script.requests) == 7
    assert sleeps[-1] <= 8.0 and sleeps[-2] >= 6.0  # 0.5 × 2⁵ = 16, capped at 8, less ≤ 25 % jitter


def test_retry_after_is_honoured_in_seconds_and_as_a_date(sleeps: list[float]) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    script = Script(
        error(503, headers={"Retry-After": "5"}),
        error(429, headers={"Retry-After": later}),
        error(503, headers={"Retry-After-Ms": "250"}),
        error(503, headers={"Retry-After": "3600"}),  # too long to wait blindly: backoff instead
        completion(),
    )
    client_for(script, max_retries=4).generate("x")
    assert sleeps[0] == 5.0 and 28 <= sleeps[1] <= 30 and sleeps[2] == 0.25
    assert 3.0 <= sleeps[3] <= 4.0


def test_connection_errors_and_timeouts_are_retried_then_raised_from_the_cause(sleeps: list[float]) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), completion())
    assert client_for(script).generate("x").attempts == 3
    down = Script(httpx.ConnectError("refused"))
    with pytest.raises(sdk.APIConnectionError) as caught:
        client_for(down, max_retries=1).generate("x")
    assert isinstance(caught.value.__cause__, httpx.ConnectError) and len(down.requests) == 2
    slow = Script(httpx.ReadTimeout("slow"))
    with pytest.raises(sdk.APITimeoutError):
        client_for(slow, max_retries=0).generate("x")
    assert len(slow.requests) == 1


def test_max_retries_per_client_and_per_call(sleeps: list[float]) -> None:
    script = Script(error(503))
    client = client_for(script, max_retries=3)
    with pytest.raises(sdk.InternalServerError):
        client.generate("x")
    assert len(script.requests) == 4
    with pytest.raises(sdk.InternalServerError):
        client.generate("x", max_retries=0)
    assert len(script.requests) == 5
    with pytest.raises(sdk.InternalServerError):
        client.info(max_retries=1)
    assert len(script.requests) == 7
    with pytest.raises(ValueError, match="max_retries"):
        client_for(script, max_retries=-1)


def test_one_idempotency_key_per_call_the_same_on_every_retry(sleeps: list[float]) -> None:
    script = Script(error(502), httpx.ReadError("dropped"), completion(), error(503), completion())
    client = client_for(script)
    client.generate("first")
    client.chat("second", idempotency_key="my-key")
    first, second = script.keys[:3], script.keys[3:]
    assert len(set(first)) == 1 and first[0] is not None and uuid.UUID(first[0]).version == 4
    assert second == ["my-key", "my-key"]
    assert [r.idempotency_key for r in client.usage_records] == [first[0], "my-key"]
    assert all(json.loads(r.content) == json.loads(script.requests[0].content) for r in script.requests[:3])


def test_timeout_per_client_and_per_call_with_not_given(sleeps: list[float]) -> None:
    script = Script(completion())
    client = client_for(script, timeout=12.0)
    client.generate("x")
    client.generate("x", timeout=3.0)
    client.generate("x", timeout=None)
    client.generate("x", timeout=sdk.NOT_GIVEN)
    seen = [r.extensions["timeout"] for r in script.requests]
    assert [t["read"] for t in seen] == [12.0, 3.0, None, 12.0]
    default = client_for(script)
    assert default.timeout == sdk.DEFAULT_TIMEOUT
    default.generate("x")
    assert script.requests[-1].extensions["timeout"]["connect"] == 5.0
    assert repr(sdk.NOT_GIVEN) == "NOT_GIVEN" and not sdk.NOT_GIVEN and sdk.NotGiven() is sdk.NOT_GIVEN


def test_the_request_carries_the_key_and_the_options(sleeps: list[float]) -> None:
    script = Script(completion())
    client = client_for(script, model="m1")
    client.generate("x", max_tokens=5, grammar="root ::= [0-9]", bid=1.25, extra_body={"user": "u1"})
    request = script.requests[0]
    assert request.url == URL + "/v1/completions" and request.headers["Authorization"] == "Bearer lk-test"
    assert request.headers["User-Agent"].startswith("llamakit-sdk/")
    body = json.loads(request.content)
    assert body == {
        "prompt": "x",
        "model": "m1",
        "max_tokens": 5,
        "grammar": "root ::= [0-9]",
        "bid": 1.25,
        "user": "u1",
    }
    with pytest.raises(ValueError, match="bid"):
        client.generate("x", bid="high")  # type: ignore[arg-type]
    assert len(script.requests) == 1
    assert "lk-test" not in repr(client)


def test_json_schema_from_a_dict_or_a_pydantic_model(sleeps: list[float]) -> None:
    from pydantic import BaseModel

    class Grade(BaseModel):
        score: int

    script = Script(completion('{"score": 4}'))
    client = client_for(script)
    client.chat("rate it", json_schema=Grade)
    client.chat("rate it", json_schema={"type": "object", "properties": {"a": {"type": "string"}}})
    formats = [json.loads(r.content)["response_format"] for r in script.requests]
    assert formats[0]["type"] == "json_schema" and formats[0]["json_schema"]["name"] == "Grade"
    assert formats[0]["json_schema"]["schema"]["properties"]["score"]["type"] == "integer"
    assert formats[1]["json_schema"]["schema"]["properties"] == {"a": {"type": "string"}}


def test_a_stream_is_retried_before_its_first_byte(sleeps: list[float]) -> None:
    script = Script(error(503), httpx.ConnectError("refused"), httpx.Response(200, content=STREAM_BODY))
    client = client_for(script)
    stream = client.stream("x")
    assert script.requests == []  # nothing is sent until the stream is iterated
    assert list(stream) == ["Hel", "lo"]
    assert stream.result.text == "Hello" and stream.result.cost_credits == 16 and stream.result.attempts == 3
    assert len(set(script.keys)) == 1
    body = json.loads(script.requests[0].content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    [record] = client.usage_records
    assert (record.stream, record.status, record.attempts, record.total_tokens) == (True, "ok", 3, 4)


def test_a_stream_is_not_retried_after_its_first_byte(sleeps: list[float]) -> None:
    def broken_body() -> Iterator[bytes]:
        yield b'data: {"id": "req-s", "choices": [{"index": 0, "text": "Hel"}]}\n\n'
        raise httpx.ReadError("connection reset")

    script = Script(lambda request: httpx.Response(200, content=broken_body()))
    client = client_for(script, max_retries=5)
    stream = client.stream("x")
    pieces: list[str] = []
    with pytest.raises(sdk.StreamInterruptedError) as caught:
        for piece in stream:
            pieces.append(piece)
    assert pieces == ["Hel"] and caught.value.text == "Hel"
    assert len(script.requests) == 1 and sleeps == []
    [record] = client.usage_records
    assert (record.status, record.error_type, record.attempts) == ("error", "StreamInterruptedError", 1)


def test_an_error_event_mid_stream_raises_with_the_text_so_far(sleeps: list[float]) -> None:
    body = b'data: {"choices": [{"index": 0, "text": "par"}]}\n\n' + sse(
        {"error": {"message": "the node failed", "type": "server_error", "code": "node_failed"}}
    )
    client = client_for(Script(httpx.Response(200, content=body)))
    stream = client.stream("x")
    with pytest.raises(sdk.StreamInterruptedError, match="the node failed") as caught:
        list(stream)
    assert caught.value.code == "node_failed" and caught.value.text == "par"


def test_failed_calls_are_recorded_once_each(sleeps: list[float]) -> None:
    client = client_for(Script(error(503), error(503), error(503)))
    with pytest.raises(sdk.InternalServerError):
        client.generate("x")
    [record] = client.usage_records
    assert (record.status, record.status_code, record.attempts) == ("error", 503, 3)
    assert record.error == "scripted 503" and record.latency is not None


def test_a_non_json_answer_is_a_response_validation_error(sleeps: list[float]) -> None:
    client = client_for(Script(httpx.Response(200, text="<html>proxy</html>")))
    with pytest.raises(sdk.APIResponseValidationError, match="proxy"):
        client.generate("x")
    with pytest.raises(sdk.APIStatusError) as caught:
        client_for(Script(httpx.Response(418, text="teapot"))).generate("x")
    assert caught.value.message == "teapot" and caught.value.status_code == 418


async def test_async_retries_honour_retry_after_and_keep_the_key(sleeps: list[float]) -> None:
    script = Script(error(429, code="queue_full", headers={"Retry-After": "2"}), httpx.ConnectError("x"), completion())
    async with async_client_for(script) as client:
        result = await client.generate("x")
        assert result.attempts == 3 and sleeps[0] == 2.0 and 0.75 <= sleeps[1] <= 1.0
        assert len(set(script.keys)) == 1
        with pytest.raises(sdk.InsufficientFunds):
            await async_client_for(Script(error(402))).chat("x")


async def test_async_stream_retry_only_before_the_first_byte(sleeps: list[float]) -> None:
    script = Script(error(502), httpx.Response(200, content=STREAM_BODY))
    async with async_client_for(script) as client:
        stream = client.stream("x")
        assert [p async for p in stream] == ["Hel", "lo"]
        assert stream.result.attempts == 2 and len(script.requests) == 2

    async def broken_body() -> Any:
        yield b'data: {"choices": [{"index": 0, "text": "Hel"}]}\n\n'
        raise httpx.ReadError("reset")

    broken = Script(lambda request: httpx.Response(200, content=broken_body()))
    async with async_client_for(broken) as client:
        with pytest.raises(sdk.StreamInterruptedError):
            async for _ in client.stream("x"):
                pass
        assert len(broken.requests) == 1


def test_the_backoff_policy_itself() -> None:
    policy = sdk.RetryPolicy()
    for attempt, top in enumerate([0.5, 1, 2, 4, 8, 8, 8]):
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(0.75 * top <= d <= top for d in delays)
        assert len(set(delays)) > 1, "jittered"
    assert policy.delay(0, retry_after=7) == 7
    assert policy.delay(0, retry_after=61) <= 0.5


def test_a_stream_is_timed_from_when_it_is_first_iterated(sleeps: list[float]) -> None:
    client = client_for(Script(httpx.Response(200, content=STREAM_BODY)))
    stream = client.stream("x")
    time.sleep(1.0)
    list(stream)
    assert stream.result.latency is not None and stream.result.latency < 1.0
    assert client.usage_records[0].time > datetime.now(UTC) - timedelta(seconds=1.0)
    with pytest.raises(ValueError, match="max_retries"):
        client.generate("x", max_retries=-1)
    assert len(client.usage_records) == 1  # a wrong argument is not a call
