"""The per-token cost of a stream's running counts (`llamakit/wire/node.py`), this tree against another version, in
one process: what a node spends writing a token chunk with its counts (`with_counts` and the JSON), and what a
router spends finding them without parsing the chunk (`upstream.token_chunk`: `split_counts` and what it builds).

The other version is a directory that holds a `llamakit` package (`git archive main llamakit | tar -x -C
/tmp/main` makes one); only its `wire/node.py` is loaded. Each figure is the best of 9 runs of 200,000 calls,
in nanoseconds per call, with its ratio to the other version's; the chunk is a chat chunk as a node writes it.

Run: ``.venv/bin/python bench/token_counts.py /tmp/main``
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from llamakit import jsontext
from llamakit.wire import node as current

CALLS = 200_000
PREFIX = b'{"id":"req-0192837465abcdef0123456789abcdef",'


def chunk() -> dict[str, Any]:
    return {
        "id": "req-0192837465abcdef0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "smollm2-135m-instruct",
        "choices": [{"index": 0, "delta": {"content": " river"}, "logprobs": None, "finish_reason": None}],
        "usage": None,
    }


def load(directory: Path) -> ModuleType:
    """`directory`'s llamakit/wire/node.py as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_wire_node", directory / "llamakit" / "wire" / "node.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they build the class
    spec.loader.exec_module(module)
    return module


def found(wire: ModuleType) -> Callable[[bytes], object]:
    """The router's per-token work with `wire`: `upstream.token_chunk` as it reads a chunk, whatever it returns."""

    def token_chunk(payload: bytes) -> object:
        if not payload.startswith(PREFIX):
            return None
        return wire.split_counts(payload)

    return token_chunk


def nanoseconds(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=9)) / CALLS * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="a directory holding the other version's llamakit package")
    args = parser.parse_args()
    base = load(args.baseline)
    fields = base.TokenCounts.__annotations__  # the baseline's counts: with cached_tokens or without
    counts = (412, 37, 380) if "cached_tokens" in fields else (412, 37)
    written_before = jsontext.dumps(base.with_counts(chunk(), base.TokenCounts(*counts)))
    written_now = jsontext.dumps(current.with_counts(chunk(), current.TokenCounts(412, 37, 380)))
    rows = [
        (
            "node: with_counts + JSON",
            nanoseconds(lambda: jsontext.dumps(base.with_counts(chunk(), base.TokenCounts(*counts)))),
            nanoseconds(lambda: jsontext.dumps(current.with_counts(chunk(), current.TokenCounts(412, 37, 380)))),
        ),
        (
            "router: its own node's chunk",
            nanoseconds(lambda: found(base)(written_before)),
            nanoseconds(lambda: found(current)(written_now)),
        ),
        (
            "router: the baseline node's chunk",
            nanoseconds(lambda: found(base)(written_before)),
            nanoseconds(lambda: found(current)(written_before)),
        ),
    ]
    print(f"{'':36s} {'baseline':>10s} {'this tree':>10s} {'ratio':>7s}")
    for name, before, now in rows:
        print(f"{name:36s} {before:8.0f}ns {now:8.0f}ns {now / before:7.2f}")


if __name__ == "__main__":
    main()
