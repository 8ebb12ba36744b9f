"""Sentiment grades of a chat window, bought from the herd: the prompts, grammars and votes that make them.

A `Method` turns a window of chat messages into one or more paid requests whose replies a grammar limits to
a few label words, and reads a `Sentiment` (positive, neutral or negative) off them. The methods here were
measured against a labelled set of trading-room windows by `bench/sentiment.py`; `METHODS` lists them all,
and `default_method(model)` names the one that graded best for a model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llamakit.agent.world import Message, Mood
from llamakit.sdk import Client, GenerateOptions

__all__ = [
    "METHODS",
    "PREFERRED_MODELS",
    "SENTIMENTS",
    "Grade",
    "Method",
    "Sentiment",
    "SentimentGrader",
    "default_method",
    "label_of",
]

Sentiment = Mood
SENTIMENTS: tuple[Sentiment, ...] = ("positive", "neutral", "negative")
Prompt = list[dict[str, str]] | str  # chat messages for /v1/chat/completions, or a text for /v1/completions


@dataclass(frozen=True)
class Method:
    """One way to ask a model for a window's sentiment.

    `build` makes the request's prompt from the window (a list of chat messages, or a text for a raw
    completion); `grammar` (GBNF) limits the reply to the keys of `labels`, which map a reply (stripped) to a
    sentiment. `votes` requests are made per grade, at `temperature` with seeds 1…votes (one request at
    temperature 0 when votes is 1), and the most frequent sentiment wins. With `confirm`, a window graded
    positive is graded again by that method and stays positive only if it says positive too (else neutral).
    """

    name: str
    summary: str
    build: Callable[[Sequence[Message]], Prompt]
    grammar: str
    labels: Mapping[str, Sentiment]
    max_tokens: int = 4
    votes: int = 1
    temperature: float = 0.0
    confirm: Method | None = None


@dataclass(frozen=True)
class Grade:
    """The sentiment of one window and what it cost.

    `sentiment` is None when no reply could be read. `score` runs from -1.0 (every vote negative) to +1.0
    (every vote positive): positive votes minus negative votes, over all votes. `cost` is in credits (the
    sum of `usage.cost_credits` over the requests); `replies` are the raw reply texts, one per request.
    """

    sentiment: Sentiment | None
    score: float
    votes: tuple[Sentiment | None, ...]
    cost: int
    replies: tuple[str, ...]
    request_ids: tuple[str, ...] = field(default=())


def label_of(method: Method, reply: str) -> Sentiment | None:
    """The sentiment a reply names under `method`, or None when the reply is not one of its labels."""
    return method.labels.get(reply.strip().lower())


_CAUTIOUS_FIRST: tuple[Sentiment, ...] = ("neutral", "negative", "positive")


def _tally(votes: Sequence[Sentiment | None]) -> tuple[Sentiment | None, float]:
    counted = Counter(v for v in votes if v is not None)
    if not counted:
        return None, 0.0
    best = max(counted.values())
    # A tie goes to the most cautious of the tied sentiments: neutral, then negative, then positive.
    sentiment = next(s for s in _CAUTIOUS_FIRST if counted[s] == best)
    return sentiment, (counted["positive"] - counted["negative"]) / len(votes)


class SentimentGrader:
    """Grades windows through a llamakit `Client` with one `Method` on one model (None: the router's default).

    `grade` raises what the client raises (`llamakit.sdk.LlamakitError` and its subclasses, such as
    `InsufficientFunds`); a reply outside the method's labels is a vote of None, not an error.
    """

    def __init__(
        self, client: Client, *, method: Method, model: str | None = None, bid: float | Literal["auto"] = 1.0
    ) -> None:
        self.client = client
        self.method = method
        self.model = model
        self.bid = bid

    def grade(self, window: Sequence[Message]) -> Grade:
        """Grade one window (messages oldest first); one request per vote, plus one to confirm a positive."""
        grade = self._ask(self.method, window)
        confirm = self.method.confirm
        if confirm is not None and grade.sentiment == "positive":
            second = self._ask(confirm, window)
            sentiment: Sentiment | None = "positive" if second.sentiment == "positive" else "neutral"
            grade = Grade(
                sentiment,
                1.0 if sentiment == "positive" else 0.0,
                grade.votes + second.votes,
                grade.cost + second.cost,
                grade.replies + second.replies,
                grade.request_ids + second.request_ids,
            )
        return grade

    def _ask(self, method: Method, window: Sequence[Message]) -> Grade:
        prompt = method.build(window)
        votes: list[Sentiment | None] = []
        replies: list[str] = []
        ids: list[str] = []
        cost = 0
        for vote in range(method.votes):
            options: GenerateOptions = {
                "grammar": method.grammar, "max_tokens": method.max_tokens, "bid": self.bid, "model": self.model,
            }  # fmt: skip
            if method.votes == 1:
                options["temperature"] = 0.0
            else:
                options["temperature"], options["seed"] = method.temperature, vote + 1
            if isinstance(prompt, str):
                result = self.client.generate(prompt, **options)
            else:
                result = self.client.chat(prompt, **options)
            cost += result.cost_credits or 0
            replies.append(result.text)
            if result.request_id:
                ids.append(result.request_id)
            votes.append(label_of(method, result.text))
        sentiment, score = _tally(votes)
        return Grade(sentiment, score, tuple(votes), cost, tuple(replies), tuple(ids))


# -- the prompts -----------------------------------------------------------------------------------------

# Few-shot examples, written apart from the labelled set the methods are measured on. Their mix matters to
# models this small: more neutral examples than these and both models call most polar windows neutral.
EXAMPLES: tuple[tuple[Sentiment, tuple[str, ...]], ...] = (
    ("positive", ("kai: just doubled my position, this chart is gorgeous", "lu: same here, best run in months")),
    ("negative", ("kai: sold everything at a big loss, this is awful", "lu: panic everywhere, it keeps crashing")),
    ("neutral", ("kai: when is the next dev update?", "lu: friday I think, check the pinned post")),
    ("negative", ("mo: the exchange got hacked, funds are gone", "ri: terrible, I'm getting out now")),
    ("positive", ("mo: great news, we got listed and the price jumped", "ri: love it, buying more")),
    ("neutral", ("mo: I'm having lunch, back in an hour", "ri: ok, the call is at 4 anyway")),
    ("neutral", ("zo: the docs moved to a new site", "pat: ok, I'll update my bookmark")),
    ("positive", ("zo: up 20% today, what a rally", "pat: amazing, so happy I held")),
    ("negative", ("zo: down 30% this week, I feel sick", "pat: brutal, I'm selling")),
    ("neutral", ("zo: what's the ticker on the other exchange?", "pat: same as here")),
)
# For the second look at a window graded positive: friendly small talk is not a reason to buy.
CONFIRM_EXAMPLES = (
    *EXAMPLES,
    ("neutral", ("kai: good morning everyone!", "lu: morning, have a nice day")),
    ("positive", ("mo: we broke the all time high, incredible", "ri: best trade I ever made")),
    ("neutral", ("mo: thanks for the help with my wallet", "ri: no problem, any time")),
    ("negative", ("kai: the token dumped again, I lost a lot", "lu: awful, this keeps getting worse")),
)

# Words the models know for the three sentiments: "positive"/"negative"/"neutral" graded worse in trials.
WORDS: dict[Sentiment, str] = {"positive": "good", "negative": "bad", "neutral": "none"}
WORD_LABELS: dict[str, Sentiment] = {word: sentiment for sentiment, word in WORDS.items()}
CHAT_GRAMMAR = "root ::= " + " | ".join(f'"{w}"' for w in WORDS.values())
TEXT_GRAMMAR = "root ::= " + " | ".join(f'" {w}"' for w in WORDS.values())  # after "Sentiment:" comes a space
SYSTEM = (
    "You read a group chat about a traded token and give its sentiment in one word: good (people are happy, "
    "buying, prices rising), bad (people are unhappy, selling, losing money, prices falling) or none "
    "(questions, logistics, small talk, no opinion)."
)


def _transcript(window: Sequence[Message]) -> str:
    return "\n".join(f"{m.author}: {m.text}" for m in window)


def _digits(window: Sequence[Message]) -> Prompt:
    system = (
        "You grade the sentiment of a group chat about a traded token. "
        "Answer with a single digit: 1 very negative, 2 negative, 3 neutral, 4 positive, 5 very positive."
    )
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Chat:\n{_transcript(window)}\n\nSentiment grade (1-5):"},
    ]


def _zero_shot(window: Sequence[Message]) -> Prompt:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Chat:\n{_transcript(window)}\n\nSentiment (good, bad or none):"},
    ]


def _few_shot_chat(window: Sequence[Message]) -> Prompt:
    messages = [{"role": "system", "content": SYSTEM}]
    for label, lines in EXAMPLES:
        messages.append({"role": "user", "content": "Chat:\n" + "\n".join(lines) + "\nSentiment:"})
        messages.append({"role": "assistant", "content": WORDS[label]})
    messages.append({"role": "user", "content": f"Chat:\n{_transcript(window)}\nSentiment:"})
    return messages


def _text(examples: Sequence[tuple[Sentiment, Sequence[str]]]) -> Callable[[Sequence[Message]], Prompt]:
    shots = "".join("Chat:\n" + "\n".join(lines) + f"\nSentiment: {WORDS[label]}\n\n" for label, lines in examples)

    def build(window: Sequence[Message]) -> Prompt:
        return f"{shots}Chat:\n{_transcript(window)}\nSentiment:"

    return build


_FEW_SHOT_TEXT = _text(EXAMPLES)
DIGIT_LABELS: dict[str, Sentiment] = {
    "1": "negative",
    "2": "negative",
    "3": "neutral",
    "4": "positive",
    "5": "positive",
}
_CONFIRM = Method("confirm", "the second look of few-shot-confirm", _text(CONFIRM_EXAMPLES), TEXT_GRAMMAR, WORD_LABELS)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "digits",
            "the first agent's prompt: a 1-5 grade forced by a grammar (1-2 negative, 3 neutral, 4-5 positive)",
            _digits,
            "root ::= [1-5]",
            DIGIT_LABELS,
            max_tokens=2,
        ),
        Method(
            "zero-shot",
            "instructions in the chat template, a grammar choosing among good, bad and none",
            _zero_shot,
            CHAT_GRAMMAR,
            WORD_LABELS,
        ),
        Method(
            "few-shot-chat",
            "ten labelled example chats as earlier turns in the chat template, then the window",
            _few_shot_chat,
            CHAT_GRAMMAR,
            WORD_LABELS,
        ),
        Method(
            "few-shot-text",
            "the same ten examples as a raw text completion (no chat template) ending in 'Sentiment:'",
            _FEW_SHOT_TEXT,
            TEXT_GRAMMAR,
            WORD_LABELS,
        ),
        Method(
            "few-shot-vote",
            "few-shot-text sampled five times at temperature 1 (seeds 1-5); the majority wins",
            _FEW_SHOT_TEXT,
            TEXT_GRAMMAR,
            WORD_LABELS,
            votes=5,
            temperature=1.0,
        ),
        Method(
            "few-shot-confirm",
            "few-shot-text; a window graded good gets a second look with examples of friendly small talk",
            _FEW_SHOT_TEXT,
            TEXT_GRAMMAR,
            WORD_LABELS,
            confirm=_CONFIRM,
        ),
    )
}

# The agent grades with the first of these models that the herd serves, with the method measured best for it
# (bench/sentiment.py; docs/agent.md).
PREFERRED_MODELS: tuple[str, ...] = ("gemma-3-270m", "smollm2-135m-instruct")
_BEST: dict[str, str] = {"gemma-3-270m": "few-shot-text", "smollm2-135m-instruct": "few-shot-confirm"}


def default_method(model: str | None) -> Method:
    """The method measured best for `model` (few-shot-text for a model that was not measured)."""
    return METHODS[_BEST.get(model or "", "few-shot-text")]
