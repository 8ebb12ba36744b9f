"""llamakit.jsontext: orjson's speed where it agrees with the standard library, the standard library where not."""

from __future__ import annotations

import json
import math

import pytest

from llamakit import jsontext


@pytest.mark.parametrize(
    "value",
    [
        {"id": "req-1", "usage": {"prompt_tokens": 3, "cost": 3.3e-05, "cost_credits": 33}},
        {"text": "héllo \u2028 \U0001f999", "logprob": -1.25e-300, "none": None, "list": [True, False, 0]},
        [2**63 - 1, -(2**63)],
    ],
)
def test_what_it_writes_reads_back_as_the_same_value_in_either_library(value: object) -> None:
    text = jsontext.dumps(value)
    assert json.loads(text) == value
    assert jsontext.loads(text) == value


def test_what_orjson_refuses_to_write_is_written_by_json() -> None:
    assert json.loads(jsontext.dumps({"big": 2**70})) == {"big": 2**70}
    assert jsontext.dumps({1: "a"}) == b'{"1":"a"}'
    with pytest.raises(TypeError):
        jsontext.dumps({"x": object()})


def test_json_has_no_spelling_for_nan_so_it_is_written_as_null() -> None:
    assert jsontext.dumps({"x": math.nan, "y": -math.inf}) == b'{"x":null,"y":null}'


def test_it_reads_what_json_reads_and_refuses_what_json_refuses() -> None:
    assert math.isnan(jsontext.loads(b'{"x": NaN}')["x"])
    assert jsontext.loads(b'{"x": -Infinity}')["x"] == -math.inf
    with pytest.raises(ValueError):
        jsontext.loads(b'{"x": ')
    with pytest.raises(ValueError):
        jsontext.loads(b"\xff")


def test_a_lone_surrogate_and_deep_nesting_are_written_by_json() -> None:
    assert jsontext.dumps({"prompt": "Hi \ud800"}) == b'{"prompt":"Hi \\ud800"}'
    deep: list[object] = []
    for _ in range(300):  # past orjson's 254 levels
        deep = [deep]
    assert json.loads(jsontext.dumps(deep)) == deep
