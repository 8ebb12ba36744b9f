"""The agent's decisions and the grader's votes, against a scripted router (no model, no network)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import count

import httpx
import pytest

from llamakit.agent import (
    METHODS,
    Grade,
    PaperMarket,
    ReplayWorld,
    SentimentAgent,
    SentimentGrader,
    choose_model,
    decide,
    default_method,
)
from llamakit.agent.world import Message
from tests.agent.test_world_and_market import at

URL = "http://router.test"
Reply = Callable[[str, dict[str, object]], str]  # (the window's last message, the body) → the reply text


def scripted(reply: Reply, *, models: tuple[str, ...] = ("smollm2-135m-instruct",)) -> tuple[httpx.Client, list]:
    """An httpx client whose router answers every completion with `reply`, each at a cost of 7 credits."""
    bodies: list[dict[str, object]] = []
    ids = count(1)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
        if request.url.path == "/v1/events":
            return httpx.Response(200, json={"id": next(ids)})
        body = json.loads(request.content)
        bodies.append(body)
        prompt = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]  # type: ignore[index]
        last = str(prompt).rsplit("Chat:\n", 1)[-1].splitlines()[-2]
        text = reply(last, body)
        choice = {"text": text} if "prompt" in body else {"message": {"role": "assistant", "content": text}}
        usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11, "cost": 7e-06, "cost_credits": 7}
        return httpx.Response(
            200, json={"id": f"req-{next(ids)}", "choices": [{**choice, "finish_reason": "stop"}], "usage": usage}
        )

    return httpx.Client(transport=httpx.MockTransport(handler)), bodies


def by_keyword(last: str, body: dict[str, object]) -> str:
    """Good news is good, bad news is bad, anything else is none (with a space, as after 'Sentiment:')."""
    word = "good" if "great" in last else "bad" if "awful" in last else "none"
    return f" {word}" if "prompt" in body else word


@pytest.fixture
def client_for() -> Iterator[Callable[..., object]]:
    from llamakit.sdk import Client

    made: list[tuple[Client, httpx.Client]] = []

    def make(reply: Reply, **kwargs: object) -> tuple[Client, list[dict[str, object]]]:
        http, bodies = scripted(reply, **kwargs)  # type: ignore[arg-type]
        client = Client(url=URL, api_key="lk-test", usage_log=None, http_client=http, max_retries=0)
        made.append((client, http))
        return client, bodies

    yield make
    for client, http in made:
        client.close()
        http.close()


def window(*texts: str) -> list[Message]:
    return [Message("ana", text, at(i)) for i, text in enumerate(texts)]


def test_decide_buys_only_a_positive_grade_with_enough_score() -> None:
    def grade(sentiment: str | None, score: float) -> Grade:
        return Grade(sentiment, score, (), 0, ())  # type: ignore[arg-type]

    assert decide(grade("positive", 1.0)) == "buy"
    assert decide(grade("positive", 0.2)) == "skip"  # 3 positive votes, 2 negative: not clear enough
    assert decide(grade("positive", 0.2), buy_above=0.2) == "buy"
    assert decide(grade("neutral", 0.0)) == "skip"
    assert decide(grade("negative", -1.0)) == "skip"
    assert decide(grade(None, 0.0)) == "error"


def test_one_request_at_temperature_zero_reads_the_label(client_for: Callable[..., object]) -> None:
    client, bodies = client_for(by_keyword)  # type: ignore[operator]
    grader = SentimentGrader(client, method=METHODS["few-shot-text"], model="m")  # type: ignore[arg-type]
    grade = grader.grade(window("hello", "great quarter"))
    assert (grade.sentiment, grade.score, grade.cost, grade.replies) == ("positive", 1.0, 7, (" good",))
    (body,) = bodies
    assert body["temperature"] == 0.0 and body["model"] == "m" and "seed" not in body
    assert body["grammar"] == 'root ::= " good" | " bad" | " none"'
    assert str(body["prompt"]).endswith("Chat:\nana: hello\nana: great quarter\nSentiment:")
    assert grader.grade(window("awful day")).sentiment == "negative"
    assert grader.grade(window("lunch?")).sentiment == "neutral"


def test_votes_are_seeded_samples_and_the_majority_wins(client_for: Callable[..., object]) -> None:
    replies = iter([" good", " good", " bad", " good", " none", " bad", " bad", " none", " none", " good"])
    client, bodies = client_for(lambda last, body: next(replies))  # type: ignore[operator]
    grader = SentimentGrader(client, method=METHODS["few-shot-vote"])  # type: ignore[arg-type]
    first = grader.grade(window("x"))
    assert first.sentiment == "positive" and first.score == pytest.approx((3 - 1) / 5) and first.cost == 35
    assert [(b["temperature"], b["seed"]) for b in bodies[:5]] == [(1.0, s) for s in range(1, 6)]
    second = grader.grade(window("y"))  # bad 2, none 2, good 1: a tie goes to the cautious side
    assert second.sentiment == "neutral" and second.score == pytest.approx((1 - 2) / 5)
    assert decide(first) == "skip"  # a positive majority of 3 against 1 negative is not clear enough


def test_confirm_asks_again_only_for_a_positive_grade(client_for: Callable[..., object]) -> None:
    def reply(last: str, body: dict[str, object]) -> str:
        second_look = "thanks for the help with my wallet" in str(body["prompt"])
        if "hello friends" in last:  # friendly small talk: good at first sight, none at the second look
            return " none" if second_look else " good"
        return by_keyword(last, body)

    client, bodies = client_for(reply)  # type: ignore[operator]
    grader = SentimentGrader(client, method=METHODS["few-shot-confirm"])  # type: ignore[arg-type]
    assert grader.grade(window("great news")).sentiment == "positive" and len(bodies) == 2
    small_talk = grader.grade(window("hello friends"))
    assert (small_talk.sentiment, small_talk.score, small_talk.cost, len(bodies)) == ("neutral", 0.0, 14, 4)
    assert grader.grade(window("awful")).sentiment == "negative" and len(bodies) == 5


def test_an_unusable_reply_is_a_grade_without_sentiment(client_for: Callable[..., object]) -> None:
    client, _ = client_for(lambda last, body: "banana")  # type: ignore[operator]
    grade = SentimentGrader(client, method=METHODS["zero-shot"]).grade(window("x"))  # type: ignore[arg-type]
    assert grade.sentiment is None and grade.votes == (None,) and grade.cost == 7 and decide(grade) == "error"


def test_the_agent_picks_the_best_served_model_and_its_method(client_for: Callable[..., object]) -> None:
    both, _ = client_for(by_keyword, models=("smollm2-135m-instruct", "gemma-3-270m"))  # type: ignore[operator]
    assert choose_model(both) == "gemma-3-270m"  # type: ignore[arg-type]
    one, _ = client_for(by_keyword, models=("smollm2-135m-instruct",))  # type: ignore[operator]
    assert choose_model(one) == "smollm2-135m-instruct"  # type: ignore[arg-type]
    other, _ = client_for(by_keyword, models=("my-model",))  # type: ignore[operator]
    assert choose_model(other) is None  # type: ignore[arg-type]
    assert default_method("gemma-3-270m").name == "few-shot-text"
    assert default_method("smollm2-135m-instruct").name == "few-shot-confirm"
    assert default_method(None).name == "few-shot-text"


def test_the_agent_buys_on_good_news_skips_the_rest_and_stops_at_the_end_of_a_log(
    client_for: Callable[..., object],
) -> None:
    texts = ["great launch", "lunch?", "awful crash", "great numbers", "banana"]
    messages = [Message("ana", text, at(i), price=100.0 + i) for i, text in enumerate(texts)]
    world = ReplayWorld(messages)
    market = PaperMarket(world.price, cash=1_000.0, fee_rate=0.0)

    def reply(last: str, body: dict[str, object]) -> str:
        return "banana" if "banana" in last else by_keyword(last, body)

    client, bodies = client_for(reply, models=("gemma-3-270m",))  # type: ignore[operator]
    agent = SentimentAgent(client, world, market, history=1, trade_size=100.0)  # type: ignore[arg-type]
    outcomes = agent.run(None)
    assert world.exhausted and len(outcomes) == 5
    assert [o.action for o in outcomes] == ["buy", "skip", "skip", "buy", "error"]
    assert [o.sentiment for o in outcomes] == ["positive", "neutral", "negative", "positive", None]
    assert outcomes[-1].error == "unusable reply 'banana'"
    assert agent.model == "gemma-3-270m" and agent.method is not None and agent.method.name == "few-shot-text"
    assert {b["model"] for b in bodies} == {"gemma-3-270m"}
    assert [round(o.price) for o in outcomes] == [100, 101, 102, 103, 104]
    assert market.position == pytest.approx(100 / 100 + 100 / 103)
    assert outcomes[-1].pnl == pytest.approx(market.position * 104 - 200)
    assert agent.spent == 5 * 7 and agent.counts == {"buy": 2, "skip": 2, "error": 1, "requests": 5}
    frame = agent.frame()
    assert list(frame["action"]) == [o.action for o in outcomes]


def test_a_reply_is_read_whatever_its_case_and_spaces(client_for: Callable[..., object]) -> None:
    client, _ = client_for(lambda last, body: " GOOD \n")  # type: ignore[operator]
    method = replace(METHODS["few-shot-text"], name="shouting")
    assert SentimentGrader(client, method=method).grade(window("x")).sentiment == "positive"  # type: ignore[arg-type]


def test_the_dashboard_counts_an_agents_outcomes_as_its_requests() -> None:
    from llamakit.tui._stats import AgentStats

    reported = AgentStats.from_json("demo-agent", {"counts": {"buy": 4, "skip": 6, "error": 1}, "pnl": 3.5})
    assert (reported.requests, reported.buys, reported.skips, reported.errors) == (11, 4, 6, 1)
    counted = AgentStats.from_json("bot", {"counts": {"request": 12, "buy": 2, "skip": 9, "error": 1}})
    assert counted.requests == 12


def test_the_package_exports_a_sorted_public_surface() -> None:
    import llamakit.agent

    names = llamakit.agent.__all__  # constants, then classes, then functions, as ruff sorts them
    assert names == sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    assert all(hasattr(llamakit.agent, name) for name in names)
