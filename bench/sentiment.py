"""How right the agent's sentiment grades are: every grading method on every model, on a labelled set.

The labelled set (``tests/agent/data/sentiment.jsonl``) holds short trading-room chat windows, each clearly
positive, clearly negative or neutral. This script grades every window through a router (real nodes, real
models, temperature 0 or seeded samples) with each method of ``llamakit.agent.grader.METHODS`` and each
model the herd serves, and prints per method × model: the accuracy on the polar windows (positive and
negative: the aim is ≥ 85 %), on all windows, the share of buy decisions that were right (precision of
"positive"), the confusion matrix (rows: the label, columns: the grade), and the cost per grade in credits
(the sum of ``usage.cost_credits``), with the seconds per grade. ``few-shot-logprobs`` is not one of the agent's
methods yet: it reads the probabilities of the label words from the router's logprobs (which the SDK does
not carry), and grades positive from a threshold on P(good), printed for several thresholds.

By default it starts its own herd (``llamakit up --headless`` with every installed model, one node each, in
a temporary state directory) and stops it at the end; ``--router URL --api-key KEY`` uses a running one.

Run: ``.venv/bin/python bench/sentiment.py [--methods few-shot-text,few-shot-logprobs] [--models gemma-3-270m]
[--limit 30]``;
results go to stdout and to ``bench/results/sentiment.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _processes import free_port

from llamakit.agent.grader import METHODS, SENTIMENTS, Method, Sentiment, SentimentGrader
from llamakit.agent.labelled import LabelledWindow, load_labelled
from llamakit.sdk import Client

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "bench" / "results" / "sentiment.json"
LABELLED = ROOT / "tests" / "agent" / "data" / "sentiment.jsonl"
LOGPROB_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)  # P(good) at which few-shot-logprobs grades a window positive


@dataclass
class Result:
    method: str
    model: str
    polar_accuracy: float  # right on positive and negative windows, 0-1
    accuracy: float  # right on all windows, 0-1
    buy_precision: float | None  # of the windows graded positive, the share labelled positive
    confusion: dict[str, dict[str, int]]  # label → grade ("none": unreadable) → windows
    cost_per_grade: float  # credits
    seconds_per_grade: float  # wall time over the run / windows, at the given concurrency
    windows: int


def evaluate(client: Client, method: Method, model: str, windows: list[LabelledWindow], concurrency: int) -> Result:
    grader = SentimentGrader(client, method=method, model=model)
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        grades = list(pool.map(lambda w: grader.grade(w.messages), windows))
    elapsed = time.monotonic() - started
    return score(method.name, model, windows, [g.sentiment for g in grades], [g.cost for g in grades], elapsed)


def score(
    method: str,
    model: str,
    windows: list[LabelledWindow],
    sentiments: list[Sentiment | None],
    costs: list[int],
    elapsed: float,
) -> Result:
    pairs = list(zip(windows, sentiments, strict=True))
    confusion = {label: dict.fromkeys([*SENTIMENTS, "none"], 0) for label in SENTIMENTS}
    for window, sentiment in pairs:
        confusion[window.label][sentiment or "none"] += 1
    polar = [(w, s) for w, s in pairs if w.label != "neutral"]
    graded_positive = [w for w, s in pairs if s == "positive"]
    return Result(
        method=method,
        model=model,
        polar_accuracy=sum(w.label == s for w, s in polar) / max(1, len(polar)),
        accuracy=sum(w.label == s for w, s in pairs) / len(windows),
        buy_precision=(
            sum(w.label == "positive" for w in graded_positive) / len(graded_positive) if graded_positive else None
        ),
        confusion=confusion,
        cost_per_grade=sum(costs) / len(costs),
        seconds_per_grade=elapsed / len(windows),
        windows=len(windows),
    )


def evaluate_logprobs(
    url: str, api_key: str, model: str, windows: list[LabelledWindow], concurrency: int
) -> list[Result]:
    """few-shot-text's prompt, one token with its top 20 logprobs: the three label words' probabilities.

    The SDK does not carry logprobs yet, so this calls the router's `/v1/completions` directly. Graded
    positive when P(good) reaches a threshold (among the three words), else the likelier of bad and none;
    one result per threshold, from the same requests.
    """
    words = {"positive": " good", "negative": " bad", "neutral": " none"}
    prompt = METHODS["few-shot-text"].build

    def probabilities(window: LabelledWindow, http: httpx.Client) -> tuple[dict[str, float], int]:
        body = {"model": model, "prompt": prompt(window.messages), "max_tokens": 1, "temperature": 0, "logprobs": 20}
        answer = http.post("/v1/completions", json=body).raise_for_status().json()
        top: dict[str, float] = answer["choices"][0]["logprobs"]["top_logprobs"][0]
        floor = min(top.values())  # a word outside the top 20 is at most as likely as the 20th
        logprob = {s: top.get(word, floor) for s, word in words.items()}
        total = sum(math.exp(v) for v in logprob.values())
        return {s: math.exp(v) / total for s, v in logprob.items()}, int(answer["usage"]["cost"])

    started = time.monotonic()
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        measured = list(pool.map(lambda w: probabilities(w, http), windows))
    elapsed = time.monotonic() - started
    results = []
    for threshold in LOGPROB_THRESHOLDS:
        sentiments: list[Sentiment | None] = [
            "positive" if p["positive"] >= threshold else ("negative" if p["negative"] > p["neutral"] else "neutral")
            for p, _ in measured
        ]
        name = f"few-shot-logprobs {threshold:.1f}"
        results.append(score(name, model, windows, sentiments, [c for _, c in measured], elapsed))
    return results


def show(result: Result) -> None:
    precision = "–" if result.buy_precision is None else f"{result.buy_precision:.0%}"
    print(
        f"\n{result.method} × {result.model}: polar {result.polar_accuracy:.1%}, all {result.accuracy:.1%}, "
        f"buys right {precision}, {result.cost_per_grade:.0f} credits and {result.seconds_per_grade:.2f} s a grade"
    )
    print(f"  {'label → grade':<14}" + "".join(f"{c:>10}" for c in [*SENTIMENTS, "none"]))
    for label, row in result.confusion.items():
        print(f"  {label:<14}" + "".join(f"{row[c]:>10}" for c in [*SENTIMENTS, "none"]))


def summary_table(results: list[Result]) -> None:
    print("\n| method | model | polar (pos+neg) | all | buys right | credits / grade | s / grade |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        precision = "–" if r.buy_precision is None else f"{r.buy_precision:.0%}"
        print(
            f"| {r.method} | {r.model} | {r.polar_accuracy:.1%} | {r.accuracy:.1%} | {precision} | "
            f"{r.cost_per_grade:.0f} | {r.seconds_per_grade:.2f} |"
        )


def start_herd(state_dir: Path, threads: int | None) -> tuple[Any, str, str]:
    from llamakit.cli.up import Launcher, UpOptions

    launcher = Launcher(UpOptions(state_dir=state_dir, port=free_port(), threads=threads, profile=state_dir / "p.json"))
    try:
        profile = launcher.start()
    except BaseException:
        launcher.stop()
        raise
    assert profile.api_key is not None
    return launcher, profile.url, profile.api_key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", help="a running router's URL (default: start a herd here)")
    parser.add_argument("--api-key", help="an API key of a funded account on --router")
    parser.add_argument(
        "--methods",
        default=",".join([*METHODS, "few-shot-logprobs"]),
        help="comma-separated method names (few-shot-logprobs: logprob scoring, direct HTTP)",
    )
    parser.add_argument("--models", default="", help="comma-separated models (default: every model served)")
    parser.add_argument("--limit", type=int, default=0, help="grade only the first N windows of each label")
    parser.add_argument("--concurrency", type=int, default=2, help="grades in flight at once")
    parser.add_argument("--threads", type=int, default=None, help="threads per node of the herd started here")
    parser.add_argument("--data", type=Path, default=LABELLED, help="the labelled set (JSONL)")
    args = parser.parse_args()
    names = [name for name in args.methods.split(",") if name]
    methods = [METHODS[name] for name in names if name != "few-shot-logprobs"]
    windows = load_labelled(args.data)
    if args.limit:
        windows = [w for label in SENTIMENTS for w in [w for w in windows if w.label == label][: args.limit]]
    launcher = None
    with tempfile.TemporaryDirectory(prefix="llamakit-sentiment-") as tmp:
        try:
            if args.router:
                url, key = args.router, args.api_key
            else:
                print("starting a herd with every installed model …", file=sys.stderr)
                launcher, url, key = start_herd(Path(tmp), args.threads)
            with Client(url=url, api_key=key, usage_log=None, timeout=120) as client:
                models = [m for m in args.models.split(",") if m] or sorted(m.id for m in client.models())
                print(f"{len(windows)} windows ({dict(Counter(w.label for w in windows))}), models {models}")
                results = []
                for model in models:
                    for method in methods:
                        result = evaluate(client, method, model, windows, args.concurrency)
                        show(result)
                        results.append(result)
                    if "few-shot-logprobs" in names:
                        assert key is not None
                        for result in evaluate_logprobs(url, key, model, windows, args.concurrency):
                            show(result)
                            results.append(result)
        finally:
            if launcher is not None:
                launcher.stop()
    summary_table(results)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(
        json.dumps(
            {"when": datetime.now(UTC).isoformat(), "windows": len(windows), "results": [asdict(r) for r in results]},
            indent=2,
        )
    )
    print(f"\nwritten to {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
