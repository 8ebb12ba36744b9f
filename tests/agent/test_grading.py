"""The agent's decisions on the labelled set, through a real router with the real models (temperature 0).

llama.cpp's floats differ between CPUs, which can flip a window whose labels are near a tie: the thresholds
leave about ten points of margin under what `bench/sentiment.py` measured (docs/agent.md).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llamakit.agent import SentimentGrader, decide, default_method, load_labelled
from llamakit.sdk import Client
from tests.agent.conftest import LABELLED, GradingHerd

pytestmark = pytest.mark.model

# model: (least share of positive windows bought, least share of the others skipped, least polar accuracy);
# measured: gemma 98 %, 97 %, 89 %; smollm2 84 %, 91 %, 92 %.
AIMS = {
    "gemma-3-270m": (0.85, 0.85, 0.8),
    "smollm2-135m-instruct": (0.7, 0.8, 0.8),
}


@pytest.mark.parametrize("model", sorted(AIMS))
def test_the_agent_buys_the_positive_windows_and_skips_the_others(grading_herd: GradingHerd, model: str) -> None:
    if model not in grading_herd.models:
        pytest.skip(f"{model} is not installed")
    windows = load_labelled(LABELLED)
    assert len(windows) >= 120 and {w.label for w in windows} == {"positive", "neutral", "negative"}
    key = grading_herd.account(f"grading-{model}", 5_000_000)
    with Client(url=grading_herd.url, api_key=key, usage_log=None, timeout=120) as client:
        grader = SentimentGrader(client, method=default_method(model), model=model)
        with ThreadPoolExecutor(2) as pool:
            grades = list(pool.map(lambda w: grader.grade(w.messages), windows))
    decisions = [(w.label, decide(g)) for w, g in zip(windows, grades, strict=True)]
    assert all(action != "error" for _, action in decisions), "every reply is one of the labels"
    positive = [action for label, action in decisions if label == "positive"]
    others = [action for label, action in decisions if label != "positive"]
    bought, skipped = positive.count("buy") / len(positive), others.count("skip") / len(others)
    polar = [w.label == g.sentiment for w, g in zip(windows, grades, strict=True) if w.label != "neutral"]
    least_bought, least_skipped, least_polar = AIMS[model]
    assert bought >= least_bought, f"{model} bought {bought:.0%} of the positive windows"
    assert skipped >= least_skipped, f"{model} skipped {skipped:.0%} of the neutral and negative windows"
    assert sum(polar) / len(polar) >= least_polar
    assert all(g.cost > 0 for g in grades)


def test_the_readme_rating_example_grades_sensibly(grading_herd: GradingHerd) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    body = json.loads(re.search(r"/v1/completions .*?-d '(\{.*?\})'", readme, re.S).group(1))  # type: ignore[union-attr]
    assert body["prompt"].endswith("\nI love it:")
    # At the default temperature (1, as OpenAI's) the grade is sampled: " bad" came out of the first example
    # about one time in eight. Greedy is what the example promises.
    assert body["temperature"] == 0
    key = grading_herd.account("readme", 100_000)
    with httpx.Client(base_url=grading_herd.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        for model in grading_herd.models:
            for text, grade in (("I love it", " good"), ("Terrible, I hate it.", " bad")):
                prompt = body["prompt"].removesuffix("I love it:") + text + ":"
                answer = client.post("/v1/completions", json={**body, "prompt": prompt, "model": model}).json()
                assert answer["choices"][0]["text"] == grade, (model, text, answer)
