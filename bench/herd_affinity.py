"""What prompt-cache affinity saves a herd: multi-turn conversations through a router with it on and off.

A node decodes only what follows the longest prefix a new prompt shares with one of its slots, so a
conversation's next turn is cheap on the node that served its last turn and costly anywhere else. This
script starts two real nodes (the default model, ``--threads`` each, ``--slots`` each) and two routers in
front of both: one with ``--affinity on`` (the default) and one with ``--affinity off``. Each round runs the
same workload through each router in turn (the order alternates): ``--conversations`` conversations at once,
each ``--turns`` turns long with a pause of up to ``--think`` seconds before each turn (the same pauses
through both routers), each with a system prompt of its own (``--system-words`` words, unique per
conversation and round, so no run finds another's prompts in a cache), a short question per turn, and
``--max-tokens`` tokens of answer at temperature 0. Reported per router, medians over rounds: the wall time of
the workload, the mean latency of a follow-up turn (turns after the first), and the share of prompt tokens
the nodes found in their caches (``usage.prompt_tokens_details.cached_tokens``).

A slot keeps only its last request; the nodes' RAM cache (``--cache-ram``) keeps the histories of overwritten
slots. The default workload fits the herd's slots (4 conversations, 2 nodes × 2 slots); ``--conversations 6``
does not, and then the RAM cache is what finds the histories.

Run: ``.venv/bin/python bench/herd_affinity.py [--rounds 3] [--conversations 4] [--turns 4]``; results go
to stdout and to ``bench/results/herd_affinity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _processes import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "bench" / "results" / "herd_affinity.json"
ADMIN_KEY = "bench-admin-" + secrets.token_hex(8)
HERD_TOKEN = "bench-herd-" + secrets.token_hex(8)
QUESTIONS = [
    "What is the capital of France?",
    "And what river runs through it?",
    "Name a famous museum there.",
    "What is a well-known dish from that country?",
    "Which mountain range lies on its southern border?",
    "What language do people speak there?",
]
WORDS = "river mountain valley forest city harbour island desert plain lake coast bridge tower market".split()  # noqa: SIM905


@contextmanager
def _process(command: list[str], log_name: str, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(logs / log_name, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            yield process
        finally:
            stop(process)


def _wait(url: str, ready: Any, what: str, process: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            if ready(httpx.get(url, timeout=2).json()):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready after {timeout:g}s")


@dataclass
class Run:
    router: str
    seconds: float
    follow_up_ms: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def system_prompt(tag: str, words: int) -> str:
    body = " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(words))
    return f"Conversation {tag}. You are a geography guide; keep answers short. Notes: {body}."


async def conversation(
    client: httpx.AsyncClient,
    tag: str,
    seed: int,
    args: argparse.Namespace,
    follow_ups: list[float],
    counts: list[int],
) -> None:
    messages = [{"role": "system", "content": system_prompt(tag, args.system_words)}]
    think = random.Random(seed)  # the same pauses through both routers
    for turn in range(args.turns):
        await asyncio.sleep(think.uniform(0, args.think))  # a person reading the last answer
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 0}
        started = time.perf_counter()
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        if turn > 0:
            follow_ups.append(time.perf_counter() - started)
        answer = response.json()
        usage = answer["usage"]
        counts[0] += usage["prompt_tokens"]
        counts[1] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})


async def workload(url: str, api_key: str, name: str, round_no: int, args: argparse.Namespace) -> Run:
    follow_ups: list[float] = []
    counts = [0, 0]
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(
            *(
                conversation(client, f"{name}-{round_no}-{i}", round_no * 1000 + i, args, follow_ups, counts)
                for i in range(args.conversations)
            )
        )
        seconds = time.perf_counter() - started
    return Run(name, seconds, statistics.mean(follow_ups) * 1000, counts[0], counts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=4, help="at once (the herd has 2 × --slots slots)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=300, help="words in each conversation's system prompt")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--think", type=float, default=2.0, help="most seconds a user pauses before each turn")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per node (2 nodes)")
    parser.add_argument("--slots", type=int, default=2, help="slots per node")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    started = time.perf_counter()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        logs = Path(tmp)
        nodes = []
        for name in ("node-a", "node-b"):
            port = free_port()
            command = [
                python, "-m", "llamakit.node", "--port", str(port), "--threads", str(args.threads),
                "--slots", str(args.slots), "--ctx-size", "2048", "--herd-token", HERD_TOKEN, "--name", name,
            ]  # fmt: skip
            process = stack.enter_context(_process(command, f"{name}.log", logs))
            nodes.append((f"http://127.0.0.1:{port}", process))
        for url, process in nodes:
            _wait(f"{url}/health", lambda h: h.get("status") == "ready", url, process)
        routers: dict[str, tuple[str, str]] = {}
        for name, affinity in (("affinity-on", "on"), ("affinity-off", "off")):
            port = free_port()
            command = [
                python, "-m", "llamakit.router", "--port", str(port), "--db", str(logs / f"{name}.db"),
                "--admin-key", ADMIN_KEY, "--herd-token", HERD_TOKEN, "--affinity", affinity,
                *(arg for url, _ in nodes for arg in ("--node", url)),
            ]  # fmt: skip
            process = stack.enter_context(_process(command, f"{name}.log", logs))
            url = f"http://127.0.0.1:{port}"
            _wait(f"{url}/health", lambda h: h.get("ready") == 2, name, process)
            created = httpx.post(
                f"{url}/admin/accounts",
                json={"name": "bench", "deposit": 10**12},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            created.raise_for_status()
            routers[name] = (url, created.json()["api_key"])
        print(
            f"2 nodes ({args.slots} slots, {args.threads} thread(s) each, {os.cpu_count()} CPUs); "
            f"{args.conversations} conversations × {args.turns} turns, system prompts of {args.system_words} words",
            flush=True,
        )
        runs: list[Run] = []
        names = list(routers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                url, key = routers[name]
                run = asyncio.run(workload(url, key, name, r, args))
                runs.append(run)
                print(
                    f"  round {r + 1}/{args.rounds}  {name:<13} {run.seconds:6.1f} s  follow-up "
                    f"{run.follow_up_ms:7.0f} ms  cached {run.cached_share:6.1%} of {run.prompt_tokens} prompt tokens",
                    flush=True,
                )
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [run for run in runs if run.router == name]
        summary[name] = {
            "seconds": statistics.median(run.seconds for run in mine),
            "follow_up_ms": statistics.median(run.follow_up_ms for run in mine),
            "cached_share": statistics.median(run.cached_share for run in mine),
        }
    on, off = summary["affinity-on"], summary["affinity-off"]
    print()
    for name, row in summary.items():
        print(
            f"{name:<13} workload {row['seconds']:6.1f} s   follow-up turn {row['follow_up_ms']:7.0f} ms   "
            f"prompt tokens from cache {row['cached_share']:6.1%}"
        )
    print(
        f"\naffinity on / off: workload time {on['seconds'] / off['seconds']:.2f}, "
        f"follow-up latency {on['follow_up_ms'] / off['follow_up_ms']:.2f}"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "summary": summary,
                "runs": [asdict(run) | {"cached_share": run.cached_share} for run in runs],
                "seconds": time.perf_counter() - started,
            },
            indent=2,
        )
    )
    print(f"wrote {args.output} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
