"""How much generation speed the llamakit node costs on top of llama.cpp itself.

A node sells tokens, so every token per second it loses between llama.cpp and the client is lost revenue.
This script generates the same greedy completion (same model, prompt, `max_tokens`, threads and context size)
with four contenders and reports completion tokens per wall second of the whole request, prompt included:

* ``bare``: a decode loop on llama-cpp-python's low-level ctypes API with a greedy sampler and nothing else
  per token; llama.cpp's own speed, the limit.
* ``llama``: ``Llama.create_completion`` called directly in this process; what llama-cpp-python costs.
* ``node``: ``POST /v1/completions`` to a node started as a subprocess (``python -m llamakit.node``, as it is
  deployed, so the client does not share a GIL with the server), timed by the HTTP client.
* ``node-stream``: the same request with ``stream: true``, reading every SSE chunk until ``[DONE]``.

The contenders run one after another, never at the same time (the node idles while the in-process ones
generate). After one warm-up run each, every round runs each contender once, in an order that rotates per
round, and the median per contender is reported: the CPU may be shared with other work now and then, and
interleaving spreads such noise over all contenders instead of penalising whichever ran during it.

Fairness: ``Llama.generate`` (used by both ``llama`` and the node) keeps the KV cache of a prompt it has seen
and re-decodes only its last token, so ``bare`` does the same after its warm-up; the work per request is then
identical and the only differences are Python, HTTP and JSON. ``bare`` never stops at an end-of-generation
token, the others do; the default prompt keeps counting well past 128 tokens, and the script warns if the
contenders' completion token counts or texts differ.

Run: ``.venv/bin/python bench/node_throughput.py [--rounds 5] [--max-tokens 128] [--threads 2]``; results go
to stdout and to ``bench/results/node_throughput.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
import llama_cpp
from llama_cpp import Llama

from llamakit.catalog import DEFAULT_MODEL, resolve_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "node_throughput.json"
DEFAULT_PROMPT = "Count from one to one thousand: 1, 2, 3, 4, 5, 6, 7,"
NODE_READY_TIMEOUT = 180.0
REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class Config:
    model: str
    model_path: str
    prompt: str
    max_tokens: int
    threads: int
    n_ctx: int
    rounds: int
    pause: float


@dataclass(frozen=True)
class Sample:
    """One generation as its caller saw it: tokens counted by the contender, seconds by the wall clock."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float
    text: str

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds


Runner = Callable[[], Sample]


@dataclass
class Tally:
    name: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [s.tokens_per_second for s in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


# --- contenders -------------------------------------------------------------------------------------------


class BareLoop:
    """llama.cpp's own decode loop through the ctypes API: prompt batch, then sample → decode one token."""

    def __init__(self, config: Config) -> None:
        # Silence llama.cpp's load log, as Llama(verbose=False) does.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {config.model_path}")
        self.model = model
        # The same context as `Llama(n_ctx, n_threads, n_threads_batch)` builds with its defaults.
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = config.n_ctx
        ctx_params.n_batch = 512
        ctx_params.n_ubatch = 512
        ctx_params.n_threads = config.threads
        ctx_params.n_threads_batch = config.threads
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model, ctx_params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())
        self.prompt = self._tokenize(config.prompt)
        self.max_tokens = config.max_tokens
        self.prompt_cached = False

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, True)
        if n < 0:
            raise RuntimeError(f"tokenizing the prompt failed ({n})")
        return list(buffer[:n])

    def _detokenize(self, tokens: list[int]) -> str:
        piece = ctypes.create_string_buffer(256)
        out = bytearray()
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, piece, len(piece), 0, False)
            out += piece.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def run(self) -> Sample:
        # Keep the prompt's KV cache but its last token, as Llama.generate does for a prompt it has seen.
        keep = len(self.prompt) - 1 if self.prompt_cached else 0
        todo = self.prompt[keep:]
        prompt = (llama_cpp.llama_token * len(todo))(*todo)
        one = (llama_cpp.llama_token * 1)()
        out = [0] * self.max_tokens
        ctx, sampler, decode, sample, get_one = (
            self.ctx,
            self.sampler,
            llama_cpp.llama_decode,
            llama_cpp.llama_sampler_sample,
            llama_cpp.llama_batch_get_one,
        )
        last = self.max_tokens - 1

        started = time.perf_counter()
        if keep:
            llama_cpp.llama_memory_seq_rm(self.memory, -1, keep, -1)
        else:
            llama_cpp.llama_memory_clear(self.memory, True)
        llama_cpp.llama_sampler_reset(sampler)
        if decode(ctx, get_one(prompt, len(todo))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        for i in range(self.max_tokens):  # every token up to max_tokens, end-of-generation or not
            token = sample(sampler, ctx, -1)
            out[i] = token
            if i == last:  # like Llama.generate: the last token is returned, not decoded
                break
            one[0] = token
            if decode(ctx, get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
        seconds = time.perf_counter() - started

        self.prompt_cached = True
        eog = next((i for i, t in enumerate(out) if llama_cpp.llama_vocab_is_eog(self.vocab, t)), None)
        text = self._detokenize(out if eog is None else out[:eog])
        return Sample(len(self.prompt), self.max_tokens, seconds, text)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class DirectLlama:
    """llama-cpp-python's high-level `Llama`, called as an application would, in this process."""

    def __init__(self, config: Config) -> None:
        self.llama = Llama(
            model_path=config.model_path,
            n_ctx=config.n_ctx,
            n_threads=config.threads,
            n_threads_batch=config.threads,
            verbose=False,
        )
        self.config = config

    def run(self) -> Sample:
        started = time.perf_counter()
        result: Any = self.llama.create_completion(
            self.config.prompt, max_tokens=self.config.max_tokens, temperature=0.0
        )
        seconds = time.perf_counter() - started
        usage = result["usage"]
        text = result["choices"][0]["text"]
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], seconds, text)

    def close(self) -> None:
        self.llama.close()


class NodeClient:
    """`POST /v1/completions` to a running node, whole or streamed, timed from request to last byte."""

    def __init__(self, client: httpx.Client, config: Config, *, stream: bool) -> None:
        self.client = client
        self.stream = stream
        self.body: dict[str, Any] = {
            "prompt": config.prompt,
            "max_tokens": config.max_tokens,
            "temperature": 0,
            "seed": 0,
            "stream": stream,
        }
        if stream:
            self.body["stream_options"] = {"include_usage": True}

    def run(self) -> Sample:
        return self._run_stream() if self.stream else self._run_whole()

    def _run_whole(self) -> Sample:
        started = time.perf_counter()
        response = self.client.post("/v1/completions", json=self.body)
        response.raise_for_status()
        body = response.json()
        seconds = time.perf_counter() - started
        usage = body["usage"]
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], seconds, body["choices"][0]["text"])

    def _run_stream(self) -> Sample:
        pieces: list[str] = []
        usage: dict[str, int] | None = None
        started = time.perf_counter()
        with self.client.stream("POST", "/v1/completions", json=self.body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"the node failed mid-stream: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    if choice.get("text"):
                        pieces.append(choice["text"])
        seconds = time.perf_counter() - started
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], seconds, "".join(pieces))


# --- the node subprocess ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            health = client.get("/health").json()
        except httpx.TransportError:
            health = {"status": "starting"}
        if health["status"] == "ready":
            return
        if health["status"] == "error":
            break
        time.sleep(0.1)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    raise RuntimeError(f"the node did not become ready (exit code {process.poll()}); its log ends:\n{tail}")


@contextmanager
def running_node(config: Config) -> Iterator[httpx.Client]:
    """A node in its own process (slots=1, same threads and context), and a client that carries its token."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    command = [
        sys.executable, "-m", "llamakit.node",
        "--model", config.model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--slots", "1",
        "--threads", str(config.threads),
        "--ctx-size", str(config.n_ctx),
        "--herd-token", token,
        "--name", "bench-node",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=REQUEST_TIMEOUT,
            ) as client:
                _wait_ready(client, process, log)
                yield client
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the benchmark ----------------------------------------------------------------------------------------


def measure(runners: dict[str, Runner], config: Config) -> tuple[dict[str, Tally], dict[str, Sample]]:
    """One warm-up run each, then `rounds` rounds of one run each, the order rotating by one per round."""
    names = list(runners)
    warmup: dict[str, Sample] = {}
    for name in names:
        warmup[name] = runners[name]()
        print(f"  warm-up  {name:<12} {warmup[name].tokens_per_second:8.1f} tok/s", flush=True)
        time.sleep(config.pause)
    tallies = {name: Tally(name) for name in names}
    for r in range(config.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        line = []
        for name in order:
            sample = runners[name]()
            tallies[name].samples.append(sample)
            line.append(f"{name} {sample.tokens_per_second:.1f}")
            time.sleep(config.pause)  # let the last contender's worker threads go idle
        print(f"  round {r + 1}/{config.rounds}  " + "  ".join(line), flush=True)
    return tallies, warmup


def consistency_warnings(tallies: dict[str, Tally], warmup: dict[str, Sample], max_tokens: int) -> list[str]:
    """The comparison is fair only if every contender generated the same tokens from the same prompt."""
    warnings: list[str] = []
    everything = {name: [warmup[name], *tally.samples] for name, tally in tallies.items()}
    counts = {name: sorted({s.completion_tokens for s in samples}) for name, samples in everything.items()}
    if any(c != [max_tokens] for c in counts.values()):
        warnings.append(f"completion token counts differ from max_tokens={max_tokens}: {counts}")
    prompts = {name: sorted({s.prompt_tokens for s in samples}) for name, samples in everything.items()}
    if len({tuple(p) for p in prompts.values()}) != 1:
        warnings.append(f"prompt token counts differ: {prompts}")
    texts = {name: {s.text for s in samples} for name, samples in everything.items()}
    reference = texts["llama"]
    for name, seen in texts.items():
        if seen != reference:
            warnings.append(f"{name}'s text differs from llama's: {sorted(seen)!r} vs {sorted(reference)!r}")
    return warnings


def paired_ratio(tallies: dict[str, Tally], a: str, b: str) -> float:
    """The median over rounds of a's speed over b's in that round: less sensitive to drifts in load."""
    pairs = zip(tallies[a].samples, tallies[b].samples, strict=True)
    return statistics.median(x.tokens_per_second / y.tokens_per_second for x, y in pairs)


def report(tallies: dict[str, Tally], warnings: list[str]) -> dict[str, float]:
    llama, bare = tallies["llama"].median, tallies["bare"].median
    print()
    print(f"{'contender':<12} {'median tok/s':>12} {'min-max tok/s':>15} {'/ llama':>8} {'/ bare':>8}")
    for tally in tallies.values():
        spread = f"{min(tally.rates):.1f}-{max(tally.rates):.1f}"
        ratios = f"{tally.median / llama:>8.3f} {tally.median / bare:>8.3f}"
        print(f"{tally.name:<12} {tally.median:>12.1f} {spread:>15} {ratios}")
    node, stream = tallies["node"].median, tallies["node-stream"].median
    headline = {
        "node_over_llama": node / llama,
        "node_over_bare": node / bare,
        "node_stream_over_llama": stream / llama,
        "node_stream_over_bare": stream / bare,
        "llama_over_bare": llama / bare,
        "paired_node_over_llama": paired_ratio(tallies, "node", "llama"),
        "paired_node_over_bare": paired_ratio(tallies, "node", "bare"),
        "paired_node_stream_over_llama": paired_ratio(tallies, "node-stream", "llama"),
    }
    print()
    print(f"node / llama = {headline['node_over_llama']:.3f} (aim ≥ 0.95)")
    print(f"node / bare = {headline['node_over_bare']:.3f} (distance from llama.cpp's own speed)")
    print(f"node-stream / llama = {headline['node_stream_over_llama']:.3f}")
    print(
        "per-round paired medians: "
        f"node / llama = {headline['paired_node_over_llama']:.3f}, "
        f"node / bare = {headline['paired_node_over_bare']:.3f}, "
        f"node-stream / llama = {headline['paired_node_stream_over_llama']:.3f}"
    )
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    return headline


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after the warm-up (default 5)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, for all (default 2)")
    parser.add_argument("--ctx-size", type=int, default=1024, help="context size in tokens (default 1024)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or .gguf path")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="a prompt that runs past max-tokens")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of idle between runs (default 0.2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    if args.rounds < 1 or args.max_tokens < 1 or args.threads < 1:
        parser.error("--rounds, --max-tokens and --threads must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    resolved = resolve_model(args.model)
    config = Config(
        model=resolved.name,
        model_path=str(resolved.path),
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        threads=args.threads,
        n_ctx=args.ctx_size,
        rounds=args.rounds,
        pause=args.pause,
    )
    print(
        f"{config.model} ({Path(config.model_path).name}), max_tokens={config.max_tokens}, "
        f"threads={config.threads}, n_ctx={config.n_ctx}, rounds={config.rounds}, "
        f"llama-cpp-python {llama_cpp.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    started = time.perf_counter()
    with running_node(config) as client:
        bare, direct = BareLoop(config), DirectLlama(config)
        try:
            runners: dict[str, Runner] = {
                "bare": bare.run,
                "llama": direct.run,
                "node": NodeClient(client, config, stream=False).run,
                "node-stream": NodeClient(client, config, stream=True).run,
            }
            tallies, warmup = measure(runners, config)
        finally:
            direct.close()
            bare.close()
    warnings = consistency_warnings(tallies, warmup, config.max_tokens)
    headline = report(tallies, warnings)

    results = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": asdict(config),
        "environment": {
            "llama_cpp_python": llama_cpp.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "contenders": {
            name: {
                "median_tokens_per_second": tally.median,
                "ratio_to_llama": tally.median / tallies["llama"].median,
                "ratio_to_bare": tally.median / tallies["bare"].median,
                "tokens_per_second": tally.rates,
                "completion_tokens": [s.completion_tokens for s in tally.samples],
                "prompt_tokens": [s.prompt_tokens for s in tally.samples],
                "seconds": [s.seconds for s in tally.samples],
                "warmup_tokens_per_second": warmup[name].tokens_per_second,
            }
            for name, tally in tallies.items()
        },
        "headline": headline,
        "warnings": warnings,
        "total_seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output} ({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
