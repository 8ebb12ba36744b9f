"""How fast a llamakit node generates compared with llama.cpp's own server and with llama-cpp-python, alone
and under concurrent load.

A node sells tokens, so every token per second it loses between llama.cpp and the client is lost revenue.
Two measurements, chosen with ``--mode``; both generate the same greedy completion (same model, prompt,
``max_tokens``, threads and context size) and count completion tokens per wall second, prompt included.

``--mode concurrency`` (the default) measures how a node serves several streams at once, per engine:

* ``bare``: a decode loop on llama-cpp-python's low-level ctypes API with a greedy sampler and nothing else
  per token, one stream: the limit for one stream driven from Python.
* ``bare-8``: the same loop decoding 8 sequences together, one ``llama_batch`` per step (the 8 prompts' last
  tokens in the first batch, then one token of each sequence per step), in a context laid out as the batched
  engine lays out its own (a cache of ``n_ctx`` cells per sequence, ``kv_unified`` off); the hardware limit for 8
  streams. Its sequences are in ascending id order 0…7 in every batch, which llama.cpp needs to decode them
  in one ubatch when the cache is split per sequence (``split_equal`` takes only consecutive increasing ids;
  any other order is decoded in several ubatches, each nearly a whole forward pass). ``--bare-batches``
  chooses the sizes; ``bare-1`` is this loop at one sequence.
* ``llama``: ``Llama.create_completion`` in this process, one stream; the reference of the first benchmark.
* ``simple-N`` and ``batched-N``: N concurrent streaming requests (``stream: true`` with
  ``stream_options.include_usage``, every SSE chunk read) to a node started as a subprocess with
  ``--engine simple`` or ``--engine batched`` and ``--slots 8``; the figure is the aggregate: the completion
  tokens of all N streams over the wall time from the first request sent to the last stream finished.
* ``server-N``, with ``--llama-server PATH``: the same requests to llama.cpp's own ``llama-server`` (built by
  ``bench/build_llama_server.py`` from the llama.cpp that llama-cpp-python vendors, with the node's compile
  flags), started with the same model file, threads, slots and context per slot (``-t -tb -np``, ``-c`` = slots
  × context) and its own defaults otherwise (flash attention ``auto``, its prompt cache): the real anchor.
  The report gives node / llama-server at every concurrency.
* with ``--whole``, ``batched-N-whole``, ``server-N-whole`` …: the same, unstreamed (``stream: false``).

The nodes run with ``--flash-attn`` (default ``auto``, as llama-server); ``bare``, ``bare-N`` and ``llama`` use
the same flash attention, so that every contender runs the same kernels.

``--mode overhead`` is the first benchmark, one stream each: ``bare``, ``llama``, ``node`` (``POST
/v1/completions`` to a ``--slots 1`` node of ``--engine``) and ``node-stream`` (the same, streamed).

Only one contender runs at a time (the nodes idle while another contender generates; an idle node costs no
CPU). After a warm-up run (in concurrency mode: each in-process loop, and each node once at its widest load),
every round runs each contender once, in an order that rotates per round, and the median per contender is
reported: the CPU may be shared with other work now and then, and interleaving spreads such noise over all
contenders instead of penalising whichever ran during it.

In concurrency mode the script also reads /proc: the CPU time of the generating process (tokens per CPU
second, and how many cores it kept busy) and the CPU time every other process on the machine used meanwhile.
With as many llama.cpp threads as cores, another process that takes a core stalls every barrier of the
decode. Others' work comes in bursts, so each run first waits up to ``--settle`` seconds for a quarter of a
second in which others used at most ``--max-other-cores``; a run during which they used more is done again
(``--retries``) and the least disturbed attempt kept, marked ``~`` when retried and ``!`` when still
disturbed; both stop ``--retry-budget`` seconds after the start. Medians and paired ratios leave out
disturbed runs when undisturbed ones remain.

Fairness: every contender keeps the KV cache of a prompt it has seen and re-decodes only its last token:
``Llama.generate`` (``llama`` and the simple engine) and the batched engine's slots do, so ``bare`` and
``bare-N`` do the same after their warm-up. The figures are those of a repeated prompt (or of a chat whose
history a slot already holds). ``--cold`` gives every request a prompt no contender holds in its cache (the
prompt after one of 16 words, in turn), so every contender decodes every prompt whole. ``bare``
never stops at an end-of-generation token, the others do; the default prompt keeps counting well past 128
tokens, and the script warns if the contenders' completion token counts or texts differ.

Run: ``.venv/bin/python bench/node_throughput.py [--rounds 3] [--max-tokens 64] [--concurrency 1,2,4,8]`` or
``… --mode overhead [--rounds 5] [--max-tokens 128]``; against llama-server::

    .venv/bin/python bench/node_throughput.py --llama-server "$(.venv/bin/python bench/build_llama_server.py)" \
        --engines batched --concurrency 1,4,8 --whole --no-llama --no-bare-batches [--cold]

Results go to stdout and to ``bench/results/node_concurrency.json`` (concurrency) or
``bench/results/node_throughput.json`` (overhead).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import logging
import os
import platform
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

import httpx
import llama_cpp
from _processes import free_port, stop
from llama_cpp import Llama

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node.engine import shared_prefix

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_OUTPUT = {"concurrency": RESULTS / "node_concurrency.json", "overhead": RESULTS / "node_throughput.json"}
DEFAULT_ROUNDS = {"concurrency": 3, "overhead": 5}
DEFAULT_MAX_TOKENS = {"concurrency": 64, "overhead": 128}
DEFAULT_PROMPT = "Count from one to one thousand: 1, 2, 3, 4, 5, 6, 7,"
ENGINES = ("batched", "simple")
SERVER = "server"  # llama.cpp's llama-server, as a contender's engine
FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
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
    mode: str = "concurrency"
    engines: tuple[str, ...] = ENGINES
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    slots: int = 8
    bare_batches: tuple[int, ...] = (1, 8)
    llama: bool = True
    max_other_cores: float = 0.25
    retries: int = 1
    retry_budget: float = 150.0
    settle: float = 3.0
    cold: bool = False
    flash_attn: str = "auto"
    gpu_layers: str | None = None  # None: each contender's default (0 on a CPU-only llama.cpp)
    llama_server: str | None = None
    llama_server_args: tuple[str, ...] = ()
    node_args: tuple[str, ...] = ()
    whole: bool = False


@dataclass(frozen=True)
class Sample:
    """One generation as its caller saw it: tokens counted by the contender, seconds by the wall clock."""

    prompt_tokens: int
    completion_tokens: int
    seconds: float
    text: str
    first_token: float | None = None  # seconds from the request to its first piece of text, when streamed

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def disturbed(self) -> bool:
        return False  # one stream of a load, or overhead mode: no accounting of other processes


@dataclass(frozen=True)
class Load:
    """Streams served at once: each as its client saw it, and the wall time from the first request sent to the
    last stream finished."""

    streams: tuple[Sample, ...]
    seconds: float
    cpu_seconds: float | None = None  # CPU time of the generating process (all its threads) meanwhile
    other_cores: float | None = None  # CPU seconds per wall second used meanwhile by processes not ours
    attempts: int = 1
    disturbed: bool = False  # other processes used more than allowed in every attempt

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def tokens_per_second(self) -> float:
        """The aggregate: every stream's completion tokens over the wall time of the whole."""
        return self.completion_tokens / self.seconds

    @staticmethod
    def single(run: Callable[[], Sample]) -> Callable[[], Load]:
        def load() -> Load:
            sample = run()
            return Load((sample,), sample.seconds)

        return load


class Rated(Protocol):
    @property
    def tokens_per_second(self) -> float: ...

    @property
    def disturbed(self) -> bool: ...


R = TypeVar("R", bound=Rated)
Runner = Callable[[], Sample]


@dataclass
class Tally(Generic[R]):
    name: str
    samples: list[R] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [s.tokens_per_second for s in self.samples]

    @property
    def clean(self) -> list[R]:
        """The samples not disturbed by other processes."""
        return [s for s in self.samples if not s.disturbed]

    @property
    def kept(self) -> list[R]:
        """The samples figures are taken from: the clean ones, or all when none is."""
        return self.clean or self.samples

    @property
    def median(self) -> float:
        return statistics.median(s.tokens_per_second for s in self.kept)


# Words put before the prompt with --cold, one per request in turn: each makes a prompt that shares nothing
# but its first token with the one before it, so no contender finds it in a cache.
COLD_OPENERS = (
    "Now", "Please", "Next", "Quickly", "Carefully", "Slowly", "Again", "Today",
    "Here", "So", "Well", "Then", "Also", "First", "Finally", "Once more",
)  # fmt: skip


class Prompts:
    """The prompt of each run of one contender: always the same (warm: every contender reuses its cache), or
    with --cold one never sent before in the run, to any contender (an opener and a number counted across all
    of them), so that no two requests share more than their first token or two. Prompts that came back (16
    openers; then one count per contender, so the whole-answer contender resent the streamed one's prompts)
    were served from llama-server's prompt cache in RAM (`--cache-ram`), which is not cold."""

    _count = itertools.count()  # shared by every contender: next() is called from many client threads

    def __init__(self, config: Config) -> None:
        self.prompt = config.prompt
        self.cold = config.cold

    def next(self) -> str:
        n = next(Prompts._count)  # atomic under the GIL (itertools.count is implemented in C)
        if not self.cold:
            return self.prompt
        return f"{COLD_OPENERS[n % len(COLD_OPENERS)]} ({n}): {self.prompt}"

    def longest(self) -> str:
        """A prompt at least as long as any `next()` gives (a run makes fewer than a million)."""
        return f"{max(COLD_OPENERS, key=len)} (999999): {self.prompt}" if self.cold else self.prompt


# --- contenders -------------------------------------------------------------------------------------------


def gpu_layers(config: Config) -> int:
    """--gpu-layers for the in-process contenders (llama.cpp's n_gpu_layers: -1 is all)."""
    if config.gpu_layers is None:
        return 0
    return -1 if config.gpu_layers == "all" else int(config.gpu_layers)


class BareModel:
    """The model through llama-cpp-python's ctypes API, and the context parameters `Llama` uses by default."""

    def __init__(self, config: Config) -> None:
        # Silence llama.cpp's load log, as Llama(verbose=False) does.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers(config)
        model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), model_params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {config.model_path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.config = config

    def context(self, *, n_seq: int = 1, n_batch: int = 512) -> llama_cpp.llama_context_p:
        """The same context as `Llama(n_ctx, n_threads, n_threads_batch)` builds with its defaults; with
        `n_seq` > 1, the batched engine's: `n_ctx` cells per sequence, a cache split per sequence."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.config.n_ctx * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = self.config.threads
        params.n_threads_batch = self.config.threads
        params.flash_attn_type = FLASH_ATTN_TYPES[self.config.flash_attn]
        if n_seq > 1:
            params.n_seq_max = n_seq
            params.kv_unified = False
            params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        context: llama_cpp.llama_context_p = ctx
        return context

    def greedy(self) -> llama_cpp.llama_sampler_p:
        sampler: llama_cpp.llama_sampler_p = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
        return sampler

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, True)
        if n < 0:
            raise RuntimeError(f"tokenizing the prompt failed ({n})")
        return list(buffer[:n])

    def text(self, tokens: list[int]) -> str:
        """The text of generated tokens up to the first end-of-generation token, as the others return it."""
        eog = next((i for i, t in enumerate(tokens) if llama_cpp.llama_vocab_is_eog(self.vocab, t)), None)
        piece = ctypes.create_string_buffer(256)
        out = bytearray()
        for token in tokens if eog is None else tokens[:eog]:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, piece, len(piece), 0, False)
            out += piece.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)


class BareLoop:
    """llama.cpp's own decode loop through the ctypes API: prompt batch, then sample → decode one token."""

    def __init__(self, bare: BareModel) -> None:
        self.bare = bare
        self.ctx = bare.context()
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.sampler = bare.greedy()
        self.prompts = Prompts(bare.config)
        self.max_tokens = bare.config.max_tokens
        self.cached: list[int] = []  # the prompt whose cells the context holds

    def run(self) -> Sample:
        # Keep the cells of the prefix shared with the last prompt, but the prompt's last token, as
        # Llama.generate does.
        tokens = self.bare.tokenize(self.prompts.next())
        keep = min(shared_prefix(self.cached, tokens), len(tokens) - 1)
        todo = tokens[keep:]
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

        self.cached = tokens
        return Sample(len(tokens), self.max_tokens, seconds, self.bare.text(out))

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        llama_cpp.llama_free(self.ctx)


class BareBatch:
    """`n_seq` sequences decoded together, one `llama_batch` per step: the hardware limit for `n_seq` streams.

    The first batch holds every prompt whole the first time, and only the prompts' last tokens after that (each
    sequence keeps its prompt's cells, as a batched engine's slot does); each step after it holds one token
    per sequence, and each sequence has its own greedy sampler.
    """

    def __init__(self, bare: BareModel, n_seq: int) -> None:
        self.bare = bare
        self.n_seq = n_seq
        self.prompts = Prompts(bare.config)
        self.max_tokens = bare.config.max_tokens
        n_batch = max(512, n_seq * len(bare.tokenize(self.prompts.longest())))
        self.ctx = bare.context(n_seq=n_seq, n_batch=n_batch)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.samplers = [bare.greedy() for _ in range(n_seq)]
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]  # per sequence, the prompt its cells hold

    def _put(self, n: int, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        batch = self.batch
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def run(self) -> Load:
        ctx, batch, samplers, n_seq = self.ctx, self.batch, self.samplers, self.n_seq
        prompts = [self.bare.tokenize(self.prompts.next()) for _ in range(n_seq)]
        decode, sample, put = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample, self._put
        out = [[0] * self.max_tokens for _ in range(n_seq)]
        last = self.max_tokens - 1

        # Each sequence keeps the cells of the prefix its prompt shares with its last one, but the prompt's last
        # token, as the batched engine's slots keep theirs (and Llama.generate, and `bare`).
        keeps = [min(shared_prefix(self.cached[seq], prompts[seq]), len(prompts[seq]) - 1) for seq in range(n_seq)]
        started = time.perf_counter()
        for seq in range(n_seq):
            llama_cpp.llama_memory_seq_rm(self.memory, seq, keeps[seq], -1)
        for sampler in samplers:
            llama_cpp.llama_sampler_reset(sampler)
        n = 0
        logits_at = []
        for seq, prompt in enumerate(prompts):
            for pos in range(keeps[seq], len(prompt)):
                n = put(n, prompt[pos], pos, seq, logits=pos == len(prompt) - 1)
            logits_at.append(n - 1)
        batch.n_tokens = n
        if decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        for i in range(self.max_tokens):  # every token up to max_tokens, end-of-generation or not
            n = 0
            for seq in range(n_seq):
                token = sample(samplers[seq], ctx, logits_at[seq])
                out[seq][i] = token
                n = put(n, token, len(prompts[seq]) + i, seq, logits=True)
            if i == last:  # the last tokens are returned, not decoded
                break
            batch.n_tokens = n
            if decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits_at = list(range(n_seq))
        seconds = time.perf_counter() - started

        self.cached = prompts
        streams = tuple(
            Sample(len(prompt), self.max_tokens, seconds, self.bare.text(tokens))
            for prompt, tokens in zip(prompts, out, strict=True)
        )
        return Load(streams, seconds)

    def close(self) -> None:
        for sampler in self.samplers:
            llama_cpp.llama_sampler_free(sampler)
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


class DirectLlama:
    """llama-cpp-python's high-level `Llama`, called as an application would, in this process."""

    def __init__(self, config: Config) -> None:
        self.llama = Llama(
            model_path=config.model_path,
            n_ctx=config.n_ctx,
            n_threads=config.threads,
            n_threads_batch=config.threads,
            flash_attn=config.flash_attn != "off",  # Llama knows on and off; auto is on for every CPU
            n_gpu_layers=gpu_layers(config),
            verbose=False,
        )
        self.config = config
        self.prompts = Prompts(config)

    def run(self) -> Sample:
        started = time.perf_counter()
        result: Any = self.llama.create_completion(
            self.prompts.next(), max_tokens=self.config.max_tokens, temperature=0.0
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
        self.prompts = Prompts(config)
        self.body: dict[str, Any] = {
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
        response = self.client.post("/v1/completions", json={**self.body, "prompt": self.prompts.next()})
        response.raise_for_status()
        body = response.json()
        seconds = time.perf_counter() - started
        usage = body["usage"]
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], seconds, body["choices"][0]["text"])

    def _run_stream(self) -> Sample:
        pieces: list[str] = []
        usage: dict[str, int] | None = None
        first: float | None = None
        started = time.perf_counter()
        body = {**self.body, "prompt": self.prompts.next()}
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 503:
                response.read()
                raise RuntimeError(f"the node refused a stream (503, all slots busy?): {response.text}")
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
                        if first is None:
                            first = time.perf_counter() - started
                        pieces.append(choice["text"])
        seconds = time.perf_counter() - started
        if usage is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return Sample(usage["prompt_tokens"], usage["completion_tokens"], seconds, "".join(pieces), first)


class NodeLoad:
    """`streams` requests sent to a node (or llama-server) at once, each on a client thread of its own, streamed
    or whole."""

    def __init__(
        self, client: httpx.Client, config: Config, pool: ThreadPoolExecutor, streams: int, *, stream: bool = True
    ) -> None:
        self.client = NodeClient(client, config, stream=stream)
        self.pool = pool
        self.streams = streams

    def _one(self, go: threading.Event) -> tuple[Sample, float]:
        go.wait()
        sample = self.client.run()
        return sample, time.perf_counter()

    def run(self) -> Load:
        go = threading.Event()
        futures = [self.pool.submit(self._one, go) for _ in range(self.streams)]
        time.sleep(0.01)  # let the threads reach go.wait(), so that the requests leave together
        started = time.perf_counter()
        go.set()
        done = [future.result() for future in futures]
        ended = max(end for _, end in done)
        return Load(tuple(sample for sample, _ in done), ended - started)


# --- the node subprocesses --------------------------------------------------------------------------------


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
def _node_process(
    config: Config, engine: str, slots: int
) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes], IO[bytes]]]:
    token = secrets.token_urlsafe(24)
    port = free_port()
    command = [
        sys.executable, "-m", "llamakit.node",
        "--model", config.model,
        "--engine", engine,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--slots", str(slots),
        "--threads", str(config.threads),
        "--ctx-size", str(config.n_ctx),
        "--herd-token", token,
        "--name", f"bench-{engine}",
        "--flash-attn", config.flash_attn,
        *(["--gpu-layers", config.gpu_layers] if config.gpu_layers is not None else []),
        *config.node_args,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=REQUEST_TIMEOUT,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            ) as client:
                yield client, process, log
        finally:
            stop(process)


@dataclass(frozen=True)
class Node:
    client: httpx.Client  # carries the node's token
    pid: int


@contextmanager
def llama_server(config: Config, slots: int) -> Iterator[Node]:
    """llama.cpp's own server on the same model file, threads, slots and context per slot as the nodes."""
    port = free_port()
    command = [
        config.llama_server or "llama-server",
        "--model", config.model_path,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--threads", str(config.threads),
        "--threads-batch", str(config.threads),
        "--parallel", str(slots),
        "--ctx-size", str(config.n_ctx * slots),  # llama-server splits it among its slots
        "--no-webui",
        *(["--gpu-layers", config.gpu_layers] if config.gpu_layers is not None else []),
        *config.llama_server_args,
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        except OSError as exc:
            raise SystemExit(f"cannot start llama-server {command[0]}: {exc}") from None
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                timeout=REQUEST_TIMEOUT,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            ) as client:
                deadline = time.monotonic() + NODE_READY_TIMEOUT
                while time.monotonic() < deadline and process.poll() is None:
                    try:
                        if client.get("/health").status_code == 200:  # 503 while it loads
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
                else:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"llama-server did not become ready ({process.poll()}); its log ends:\n{tail}")
                yield Node(client, process.pid)
        finally:
            stop(process)


@contextmanager
def running_nodes(config: Config, engines: Sequence[str], slots: int) -> Iterator[dict[str, Node]]:
    """One node per engine, each in its own process (same threads and context), all loading at once."""
    with ExitStack() as stack:
        nodes = {engine: stack.enter_context(_node_process(config, engine, slots)) for engine in engines}
        for client, process, log in nodes.values():
            _wait_ready(client, process, log)
        yield {engine: Node(client, process.pid) for engine, (client, process, _) in nodes.items()}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def busy_seconds() -> float:
    """CPU time every process spent (all CPUs, steal included: another VM's work), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(frozen=True)
class Accounting:
    """Where a run's CPU time goes: the generating process, ours (this one and the nodes), everybody's.

    This machine is shared: with llama.cpp's threads as many as the cores, another process that takes a core
    for a while stalls every barrier of the decode, and a run can come out several times slower. Others' work
    comes in bursts, so each run first waits (up to `settle` seconds) for a moment in which other processes
    use no more than `max_other_cores`; a run during which they used more is done again, up to `retries`
    times, and the least disturbed attempt kept. Waiting and retrying stop at the `deadline` (a
    `time.perf_counter()` value); `other_cores` is reported so that disturbed figures can be told apart.
    """

    ours: tuple[int, ...]
    max_other_cores: float
    retries: int
    settle: float
    deadline: float

    def wrap(self, run: Callable[[], Load], pid: int) -> Callable[[], Load]:
        def accounted() -> Load:
            best: Load | None = None
            for attempt in range(1, self.retries + 2):
                self._settle()
                own_before, ours_before, busy_before = cpu_seconds(pid), self._ours(), busy_seconds()
                load = run()
                other = (busy_seconds() - busy_before) - (self._ours() - ours_before)
                load = replace(
                    load,
                    cpu_seconds=cpu_seconds(pid) - own_before,
                    other_cores=max(other, 0.0) / load.seconds,
                    attempts=attempt,
                )
                if best is None or (load.other_cores or 0.0) < (best.other_cores or 0.0):
                    best = load
                if (load.other_cores or 0.0) <= self.max_other_cores or time.perf_counter() > self.deadline:
                    break
            assert best is not None
            return replace(best, disturbed=(best.other_cores or 0.0) > self.max_other_cores)

        return accounted

    def _settle(self) -> None:
        """Wait, up to `settle` seconds, for a quarter of a second in which other processes were (almost) idle."""
        until = min(time.perf_counter() + self.settle, self.deadline)
        while time.perf_counter() < until:
            ours, busy, started = self._ours(), busy_seconds(), time.perf_counter()
            time.sleep(0.25)
            other = (busy_seconds() - busy) - (self._ours() - ours)
            if other / (time.perf_counter() - started) <= self.max_other_cores:
                return

    def _ours(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.ours)


# --- measuring --------------------------------------------------------------------------------------------


def measure(
    runners: dict[str, Callable[[], R]], config: Config, warm: Sequence[str] | None = None
) -> tuple[dict[str, Tally[R]], dict[str, R]]:
    """One warm-up run each (or of those in `warm`), then `rounds` rounds of one run each, the order rotating
    by one per round."""
    names = list(runners)
    warmup: dict[str, R] = {}
    for name in names if warm is None else warm:
        warmup[name] = runners[name]()
        print(f"  warm-up  {name:<12} {warmup[name].tokens_per_second:8.1f} tok/s", flush=True)
        time.sleep(config.pause)
    tallies: dict[str, Tally[R]] = {name: Tally(name) for name in names}
    for r in range(config.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        line = []
        for name in order:
            sample = runners[name]()
            tallies[name].samples.append(sample)
            line.append(f"{name} {sample.tokens_per_second:.1f}{_marks(sample)}")
            time.sleep(config.pause)  # let the last contender's worker threads go idle
        print(f"  round {r + 1}/{config.rounds}  " + "  ".join(line), flush=True)
    return tallies, warmup


def _marks(sample: object) -> str:
    """`!` after a figure measured while other processes were busy, `~` after one measured on a second try."""
    if not isinstance(sample, Load):
        return ""
    return ("~" if sample.attempts > 1 else "") + ("!" if sample.disturbed else "")


def paired_ratio(tallies: dict[str, Tally[R]], a: str, b: str) -> float:
    """The median over rounds of a's speed over b's in that round: less sensitive to drifts in load. Rounds in
    which either was disturbed by other processes are left out, if that leaves any."""
    pairs = list(zip(tallies[a].samples, tallies[b].samples, strict=True))
    pairs = [(x, y) for x, y in pairs if not (x.disturbed or y.disturbed)] or pairs
    return statistics.median(x.tokens_per_second / y.tokens_per_second for x, y in pairs)


def environment() -> dict[str, Any]:
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def write_results(output: Path, results: dict[str, Any]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output} ({results['total_seconds']:.0f} s)")


# --- mode overhead: one stream, what the node costs on top of llama.cpp -----------------------------------


def overhead_warnings(tallies: dict[str, Tally[Sample]], warmup: dict[str, Sample], max_tokens: int) -> list[str]:
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


def overhead_report(tallies: dict[str, Tally[Sample]], warnings: list[str]) -> dict[str, float]:
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
    print(f"node / bare = {headline['node_over_bare']:.3f} (distance from the Python decode loop)")
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


def run_overhead(config: Config, engine: str, output: Path) -> None:
    started = time.perf_counter()
    with running_nodes(config, [engine], slots=1) as nodes:
        client = nodes[engine].client
        model = BareModel(config)
        bare, direct = BareLoop(model), DirectLlama(config)
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
            model.close()
    warnings = overhead_warnings(tallies, warmup, config.max_tokens)
    headline = overhead_report(tallies, warnings)
    results = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "overhead",
        "node_engine": engine,
        "config": asdict(config),
        "environment": environment(),
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
    write_results(output, results)


# --- mode concurrency: 1 to 8 streams through one node, per engine ----------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    engine: str  # bare, bare-batch, llama, batched, simple or server
    streams: int
    stream: bool = True  # requests streamed (SSE) or whole, for nodes and llama-server


def contenders(config: Config) -> list[Contender]:
    """In an order that keeps what is compared side by side in time: each engine's N streams next to the other
    engine's and to the bare loop of as many sequences, the single-stream references together."""
    found = [Contender("bare", "bare", 1)]
    if config.llama:
        found.append(Contender("llama", "llama", 1))
    served = [*config.engines, *([SERVER] if config.llama_server else [])]
    for n in config.concurrency:
        found += [Contender(f"{engine}-{n}", engine, n) for engine in served]
        if config.whole:
            found += [Contender(f"{engine}-{n}-whole", engine, n, stream=False) for engine in served]
        if n in config.bare_batches:
            found.append(Contender(f"bare-{n}", "bare-batch", n))
    found += [Contender(f"bare-{n}", "bare-batch", n) for n in config.bare_batches if n not in config.concurrency]
    return found


SERVED = (*ENGINES, SERVER)  # the engines of contenders that are servers, started up front


def warm_ups(found: list[Contender]) -> list[str]:
    """Every in-process loop once, each node once at its widest load (which uses every slot it will use)."""
    widest: dict[str, Contender] = {}
    for c in found:
        if c.engine in SERVED and (c.engine not in widest or c.streams > widest[c.engine].streams):
            widest[c.engine] = c
    names = {c.name for c in found if c.engine not in SERVED} | {c.name for c in widest.values()}
    return [c.name for c in found if c.name in names]


def concurrency_warnings(
    tallies: dict[str, Tally[Load]], warmup: dict[str, Load], reference: str, max_tokens: int
) -> list[str]:
    """Every stream should have generated `max_tokens` tokens, and the same text as the reference stream."""
    warnings: list[str] = []
    want = tallies[reference].samples[0].streams[0].text
    for name, tally in tallies.items():
        loads = [warmup[name], *tally.samples] if name in warmup else tally.samples
        streams = [s for load in loads for s in load.streams]
        counts = sorted({s.completion_tokens for s in streams})
        if counts != [max_tokens]:
            warnings.append(f"{name}: completion token counts {counts}, not max_tokens={max_tokens}")
        differ = sum(s.text != want for s in streams)
        if differ:
            warnings.append(f"{name}: {differ} of {len(streams)} streams' texts differ from {reference}'s")
        if not tally.clean:
            warnings.append(f"{name}: other processes were busy during every run; its figures are not reliable")
    return warnings


@dataclass(frozen=True)
class Row:
    """What the table shows of one contender, medians over the rounds."""

    aggregate: float  # completion tokens of all streams per wall second
    per_stream: float  # completion tokens per second of its own request, median over every stream
    first_text_ms: float | None  # from request to first piece of text, median over every stream
    per_cpu_second: float | None  # completion tokens per CPU second of the generating process
    cores: float | None  # CPU seconds per wall second: how busy the generating process kept the CPUs
    other_cores: float | None  # CPU seconds per wall second other processes used meanwhile
    to_bare: float
    to_own_single: float | None  # over the same engine's single stream (bare-N: over bare-1)


def rows_of(found: list[Contender], tallies: dict[str, Tally[Load]]) -> dict[str, Row]:
    bare = tallies["bare"].median
    single = {(c.engine, c.stream): tallies[c.name].median for c in found if c.streams == 1}
    rows: dict[str, Row] = {}
    for c in found:
        tally = tallies[c.name]
        streams = [s for load in tally.kept for s in load.streams]
        firsts = [s.first_token for s in streams if s.first_token is not None]
        cpu = [(load.completion_tokens, load.cpu_seconds, load.seconds) for load in tally.kept if load.cpu_seconds]
        others = [load.other_cores for load in tally.kept if load.other_cores is not None]
        rows[c.name] = Row(
            aggregate=tally.median,
            per_stream=statistics.median(s.tokens_per_second for s in streams),
            first_text_ms=statistics.median(firsts) * 1000 if firsts else None,
            per_cpu_second=statistics.median(n / used for n, used, _ in cpu) if cpu else None,
            cores=statistics.median(used / wall for _, used, wall in cpu) if cpu else None,
            other_cores=statistics.median(others) if others else None,
            to_bare=tally.median / bare,
            to_own_single=tally.median / single[c.engine, c.stream] if (c.engine, c.stream) in single else None,
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def server_report(config: Config, tallies: dict[str, Tally[Load]]) -> dict[str, float]:
    """Node / llama-server per engine, concurrency and kind of request: the ratio of medians, and the median of
    per-round ratios (aim ≥ 1.0)."""
    aims: dict[str, float] = {}
    kinds = [("", "streamed"), *([("-whole", "whole")] if config.whole else [])]
    print()
    node_flags = " ".join(["--flash-attn", config.flash_attn, *config.node_args])
    server_flags = " ".join(config.llama_server_args) or "its defaults"
    print(f"node / llama-server (aim ≥ 1.0; in brackets the median of per-round ratios), node {node_flags}, "
          f"llama-server {server_flags}:")  # fmt: skip
    for engine in config.engines:
        for suffix, kind in kinds:
            cells = []
            for n in config.concurrency:
                node, server = f"{engine}-{n}{suffix}", f"{SERVER}-{n}{suffix}"
                key = f"{engine}_{n}{suffix.replace('-', '_')}_over_server"
                aims[key] = tallies[node].median / tallies[server].median
                aims[f"paired_{key}"] = paired_ratio(tallies, node, server)
                cells.append(f"{n}: {aims[key]:.2f} [{aims[f'paired_{key}']:.2f}]")
            print(f"  {engine}, {kind:<8} " + "   ".join(cells))
    return aims


def concurrency_report(
    config: Config, found: list[Contender], tallies: dict[str, Tally[Load]], rows: dict[str, Row], warnings: list[str]
) -> dict[str, float]:
    print()
    print(
        f"{'contender':<16} {'streams':>7} {'aggregate tok/s':>15} {'clean':>5} {'min-max':>9} {'/ bare':>6} "
        f"{'/ own 1':>7} {'per stream':>10} {'1st text ms':>11} {'tok/CPU-s':>9} {'cores':>5} {'others':>6}"
    )
    for c in found:
        tally, row = tallies[c.name], rows[c.name]
        rates = [s.tokens_per_second for s in tally.kept]
        print(
            f"{c.name:<16} {c.streams:>7} {row.aggregate:>15.1f} {f'{len(tally.clean)}/{len(tally.samples)}':>5} "
            f"{f'{min(rates):.0f}-{max(rates):.0f}':>9} "
            f"{row.to_bare:>6.2f} {_fmt(row.to_own_single, '.2f'):>7} {row.per_stream:>10.1f} "
            f"{_fmt(row.first_text_ms, '.0f'):>11} {_fmt(row.per_cpu_second, '.1f'):>9} {_fmt(row.cores, '.2f'):>5} "
            f"{_fmt(row.other_cores, '.2f'):>6}"
        )

    aims: dict[str, float] = {}
    top = max(config.concurrency)
    print()
    for engine in config.engines:
        one, many = f"{engine}-1", f"{engine}-{top}"
        if one in tallies:
            key = f"{engine}_1_over_bare"
            aims[key], aims[f"paired_{key}"] = rows[one].to_bare, paired_ratio(tallies, one, "bare")
            print(
                f"{engine}, 1 stream / bare = {aims[key]:.3f} (aim ≥ 0.9; median of per-round ratios "
                f"{aims[f'paired_{key}']:.3f})"
            )
        if top > 1 and one in tallies:
            key = f"{engine}_{top}_over_{engine}_1"
            aims[key], aims[f"paired_{key}"] = (
                rows[many].aggregate / rows[one].aggregate,
                paired_ratio(tallies, many, one),
            )
            aim = " (aim ≥ 1.5;" if top == 8 else " (the aim, ≥ 1.5, is for 8 streams;"  # see bench/README.md
            print(
                f"{engine}, {top} streams / {engine}, 1 stream = {aims[key]:.3f}{aim} median of per-round "
                f"ratios {aims[f'paired_{key}']:.3f})"
            )
    if config.llama_server:
        aims.update(server_report(config, tallies))
    for engine in config.engines:
        many, bare_many = f"{engine}-{top}", f"bare-{top}"
        if top > 1 and bare_many in tallies:
            key = f"{engine}_{top}_over_bare_{top}"
            aims[key] = rows[many].aggregate / rows[bare_many].aggregate
            print(f"{engine}, {top} streams / bare-{top} = {aims[key]:.3f} (distance from the limit for {top} streams)")
    if "bare-1" in tallies:
        aims["bare_1_over_bare"] = rows["bare-1"].to_bare
        print(f"bare-1 / bare = {aims['bare_1_over_bare']:.3f} (the same loop in the batched engine's split context)")
    for n in config.bare_batches:
        if n > 1 and f"bare-{n}" in tallies:
            aims[f"bare_{n}_over_bare"] = rows[f"bare-{n}"].to_bare
            line = f"bare-{n} / bare = {aims[f'bare_{n}_over_bare']:.3f}"
            if "bare-1" in tallies:
                aims[f"bare_{n}_over_bare_1"] = rows[f"bare-{n}"].to_own_single or 0.0
                line += f", bare-{n} / bare-1 = {aims[f'bare_{n}_over_bare_1']:.3f}"
            print(f"{line} (what decoding {n} sequences per batch gains on this machine)")
    for warning in warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    return aims


def run_concurrency(config: Config, output: Path) -> None:
    started = time.perf_counter()
    found = contenders(config)
    with (
        running_nodes(config, config.engines, slots=config.slots) as nodes,
        ThreadPoolExecutor(max_workers=max(config.concurrency), thread_name_prefix="bench-stream") as pool,
        ExitStack() as closing,
    ):
        if config.llama_server:
            nodes = {**nodes, SERVER: closing.enter_context(llama_server(config, config.slots))}
        model = BareModel(config)
        closing.callback(model.close)
        me = os.getpid()
        ours = (me, *(node.pid for node in nodes.values()))
        deadline = started + config.retry_budget
        accounting = Accounting(ours, config.max_other_cores, config.retries, config.settle, deadline)
        runners: dict[str, Callable[[], Load]] = {}
        for c in found:
            if c.engine == "bare":
                loop = BareLoop(model)
                closing.callback(loop.close)
                runners[c.name] = accounting.wrap(Load.single(loop.run), me)
            elif c.engine == "bare-batch":
                batch = BareBatch(model, c.streams)
                closing.callback(batch.close)
                runners[c.name] = accounting.wrap(batch.run, me)
            elif c.engine == "llama":
                direct = DirectLlama(config)
                closing.callback(direct.close)
                runners[c.name] = accounting.wrap(Load.single(direct.run), me)
            else:
                node = nodes[c.engine]
                load = NodeLoad(node.client, config, pool, c.streams, stream=c.stream)
                runners[c.name] = accounting.wrap(load.run, node.pid)
        print(f"nodes ready and contenders loaded in {time.perf_counter() - started:.0f} s", flush=True)
        measuring = time.perf_counter()
        tallies, warmup = measure(runners, config, warm_ups(found))
        print(f"measured in {time.perf_counter() - measuring:.0f} s; stopping the nodes", flush=True)
    reference = "llama" if config.llama else "bare"
    warnings = concurrency_warnings(tallies, warmup, reference, config.max_tokens)
    rows = rows_of(found, tallies)
    aims = concurrency_report(config, found, tallies, rows, warnings)

    def describe(c: Contender) -> dict[str, Any]:
        tally = tallies[c.name]
        return {
            "engine": c.engine,
            "streams": c.streams,
            "stream": c.stream,
            **asdict(rows[c.name]),
            "clean_rounds": len(tally.clean),
            "aggregate_tokens_per_second": tally.rates,
            "seconds": [load.seconds for load in tally.samples],
            "cpu_seconds": [load.cpu_seconds for load in tally.samples],
            "other_cores_per_round": [load.other_cores for load in tally.samples],
            "attempts": [load.attempts for load in tally.samples],
            "disturbed": [load.disturbed for load in tally.samples],
            "completion_tokens": [load.completion_tokens for load in tally.samples],
            "per_stream_tokens_per_second": [[s.tokens_per_second for s in load.streams] for load in tally.samples],
            "first_text_seconds": [[s.first_token for s in load.streams] for load in tally.samples],
            "warmup_aggregate_tokens_per_second": warmup[c.name].tokens_per_second if c.name in warmup else None,
        }

    table: dict[str, dict[str, float]] = {}
    for c in found:
        table.setdefault(c.engine if c.stream else f"{c.engine}-whole", {})[str(c.streams)] = rows[c.name].aggregate
    results = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "concurrency",
        "config": asdict(config),
        "environment": environment(),
        "aggregate_tokens_per_second": table,
        "aims": aims,
        "contenders": {c.name: describe(c) for c in found},
        "warnings": warnings,
        "total_seconds": time.perf_counter() - started,
    }
    write_results(output, results)


# --- command line -----------------------------------------------------------------------------------------


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("counts must be at least 1")
    return values


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--mode",
        choices=("concurrency", "overhead"),
        default="concurrency",
        help="concurrency: 1-8 streams per engine (default); overhead: one stream, node vs llama",
    )
    parser.add_argument("--rounds", type=int, help="measured rounds after the warm-up (default 3; overhead 5)")
    parser.add_argument("--max-tokens", type=int, help="tokens per completion (default 64; overhead 128)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, for all (default 2)")
    parser.add_argument("--ctx-size", type=int, default=1024, help="context size in tokens, per slot (default 1024)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or .gguf path")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="a prompt that runs past max-tokens")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of idle between runs (default 0.2)")
    parser.add_argument("--output", type=Path, help="where to write the JSON results")
    concurrency = parser.add_argument_group("concurrency mode")
    concurrency.add_argument(
        "--engines", default="batched,simple", help="node engines to compare (default batched,simple)"
    )
    concurrency.add_argument(
        "--concurrency", type=_counts, default=(1, 2, 4, 8), help="concurrent streams (default 1,2,4,8)"
    )
    concurrency.add_argument("--slots", type=int, help="node slots (default: the largest concurrency)")
    concurrency.add_argument(
        "--bare-batches", type=_counts, default=(1, 8), help="bare-N loops, N sequences per batch (default 1,8)"
    )
    concurrency.add_argument("--no-bare-batches", action="store_true", help="no bare-N loops")
    concurrency.add_argument("--no-llama", action="store_true", help="leave out the single-stream llama reference")
    parser.add_argument(
        "--flash-attn",
        choices=tuple(FLASH_ATTN_TYPES),
        default="auto",
        help="the nodes' --flash-attn, and the in-process loops' flash attention (default auto, as llama-server)",
    )
    parser.add_argument(
        "--gpu-layers",
        help="layers on the GPU, N or all, for every contender (nodes, llama-server, the in-process loops); "
        "default: each one's own (none on a CPU-only build)",
    )
    concurrency.add_argument(
        "--llama-server",
        metavar="PATH",
        help="add llama.cpp's llama-server (this binary) as a contender: `bench/build_llama_server.py` builds it",
    )
    concurrency.add_argument(
        "--llama-server-args", default="", help='more llama-server flags, e.g. "--flash-attn off" (default none)'
    )
    parser.add_argument(
        "--node-args", default="", help='more node flags, e.g. "--cache-type-k q8_0 --cache-type-v q8_0"'
    )
    concurrency.add_argument("--whole", action="store_true", help="also send every load unstreamed (stream: false)")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="a prompt no contender has in its cache for every request (after a number counted once per run), "
        "instead of the same one",
    )
    concurrency.add_argument(
        "--max-other-cores",
        type=float,
        default=0.25,
        help="run again when other processes used more CPU cores than this meanwhile (default 0.25)",
    )
    concurrency.add_argument("--retries", type=int, default=1, help="such runs again at most (default 1)")
    concurrency.add_argument(
        "--retry-budget",
        type=float,
        default=150.0,
        help="no more waiting for quiet nor runs again after this many seconds from the start (default 150)",
    )
    concurrency.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="before each run, wait up to this many seconds for other processes to go idle (default 3)",
    )
    overhead = parser.add_argument_group("overhead mode")
    overhead.add_argument("--engine", choices=ENGINES, default="batched", help="the node's engine (default batched)")
    args = parser.parse_args()
    args.rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[args.mode]
    args.max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS[args.mode]
    args.output = args.output if args.output is not None else DEFAULT_OUTPUT[args.mode]
    args.engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if any(e not in ENGINES for e in args.engines) or not args.engines:
        parser.error(f"--engines takes a comma-separated subset of {', '.join(ENGINES)}")
    args.slots = args.slots if args.slots is not None else max(args.concurrency)
    if args.no_bare_batches:
        args.bare_batches = ()
    if args.rounds < 1 or args.max_tokens < 1 or args.threads < 1:
        parser.error("--rounds, --max-tokens and --threads must be at least 1")
    if args.gpu_layers is not None and args.gpu_layers != "all" and not args.gpu_layers.isdecimal():
        parser.error(f"--gpu-layers takes a number of layers or all, not {args.gpu_layers!r}")
    if args.slots < max(args.concurrency):
        parser.error("--slots must be at least the largest --concurrency (the node answers 503 when full)")
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
        mode=args.mode,
        engines=args.engines,
        concurrency=args.concurrency,
        slots=args.slots,
        bare_batches=args.bare_batches,
        llama=not args.no_llama,
        max_other_cores=args.max_other_cores,
        retries=args.retries,
        retry_budget=args.retry_budget,
        settle=args.settle,
        cold=args.cold,
        flash_attn=args.flash_attn,
        gpu_layers=args.gpu_layers,
        llama_server=str(Path(args.llama_server).resolve()) if args.llama_server else None,
        llama_server_args=tuple(shlex.split(args.llama_server_args)),
        node_args=tuple(shlex.split(args.node_args)),
        whole=args.whole,
    )
    print(
        f"{config.model} ({Path(config.model_path).name}), mode={config.mode}, max_tokens={config.max_tokens}, "
        f"threads={config.threads}, n_ctx={config.n_ctx}, rounds={config.rounds}, "
        f"prompts={'cold' if config.cold else 'warm'}, flash attention {config.flash_attn}, "
        f"gpu layers {config.gpu_layers or 'default'}, "
        f"llama-cpp-python {llama_cpp.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    if config.mode == "overhead":
        run_overhead(config, args.engine, args.output)
    else:
        print(
            f"engines {', '.join(config.engines)} with --slots {config.slots}, "
            f"concurrency {', '.join(map(str, config.concurrency))}",
            flush=True,
        )
        run_concurrency(config, args.output)


if __name__ == "__main__":
    main()
