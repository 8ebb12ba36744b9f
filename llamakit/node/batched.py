"""The batched engine: one model, one llama.cpp context with a sequence per slot, and one decode loop.

Every step puts the next token of each running sequence, and prompt chunks of newly admitted ones, into one
`llama_batch`, decodes once, and samples each sequence with its own llama.cpp sampler chain (grammar, top-k,
top-p, min-p, temperature, seed) straight from the context's logits, without copying them into Python; greedy
alone is the argmax of those logits, read in place. New requests join at the next step; finished or cancelled
ones leave at once. This is llama.cpp's own server loop (continuous batching), on llama-cpp-python's low-level
API.

The cache is split per sequence (each slot has `n_ctx` cells no other slot can use), so a finished
sequence's cells cost the others nothing: they stay as the slot's prompt cache, as llama-server's
`cache_prompt` keeps them. The next request on that slot decodes only what follows the longest prefix it
shares with them (a chat's history, a common system prompt, a repeated prompt), and the rest is dropped
before it starts. A cancelled or failed sequence's cells are freed at once.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
import numpy.typing as npt

from llamakit.catalog import ResolvedModel
from llamakit.node.engine import (
    MIN_P,
    PENALTY_LAST_N,
    TOP_K,
    GenerationJob,
    GenerationResult,
    LoadedModel,
    TextOutput,
    TokenLogprob,
    logprobs_at,
    shared_prefix,
)
from llamakit.node.llama_log import hearing
from llamakit.node.loop_inbox import one_wakeup_per_inbox
from llamakit.node.placement import LlamaOptions, flash_attn_chosen, load_model, placement_of
from llamakit.node.ram_cache import SAVE_MIN_TOKENS, RamCache

__all__ = ["BatchedModel"]

log = logging.getLogger(__name__)

# Prompt tokens a cached prefix must save to be worth a gap in the running sequence ids (a second pass per step).
GAP_WORTH = 64
# Prompt tokens fed per step while other sequences generate: each such step holds up every running stream for
# as long as it takes to decode them, about 4.5 ms a token for SmolLM2 on two cores. Measured there with a
# 900-token prompt arriving beside a stream: chunks of 512 stalled the stream 1.8–2.1 s, of 64 0.3 s, and the
# prompt took as long (3.6–4.2 s) either way. Alone, a prompt is fed a whole batch at a time.
PREFILL_CHUNK = 64


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    job: GenerationJob
    output: TextOutput
    sampler: llama_cpp.llama_sampler_p | None  # None: greedy, the most likely token (argmax of the logits)
    cancel: threading.Event
    started: float
    prompt_left: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # the tokens whose cells this sequence holds, in order
    reused: int = 0  # of them, the prompt tokens found in the slot's cache
    next_token: int | None = None
    logits_at: int = -1
    result: GenerationResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[], None] | None = None
    on_admitted: Callable[[int], None] | None = None  # told `reused` once it is known (see LoadedModel.generate)
    logprobs: list[TokenLogprob] | None = None  # where each sampled token's logprobs go, when asked for
    admitted_ns: int = 0  # when the decode loop took it in, and sampled its first token (epoch ns; for traces)
    first_token_ns: int = 0


class BatchedModel(LoadedModel):
    """`slots` sequences in one context, advanced together by a decode loop on a thread of its own."""

    engine = "batched"

    def __init__(
        self,
        resolved: ResolvedModel,
        *,
        slots: int,
        n_ctx: int,
        threads: int,
        n_batch: int = 512,
        prefill_chunk: int = PREFILL_CHUNK,
        cache_ram: int = 0,
        options: LlamaOptions | None = None,
    ) -> None:
        started = time.perf_counter()
        options = options or LlamaOptions()
        model, loaded = load_model(resolved.path, options)
        super().__init__(resolved, model, slots=slots, n_ctx=n_ctx)
        # Flash attention and the KV cache types as the options say (flash attention `auto`, as llama-server's
        # default, is llama.cpp's choice: on wherever every layer's device runs it). Flash attention adds the
        # floats of attention in another order than the plain kernels: at temperature 0 a near-tie can go the
        # other way, so both engines and the embeddings always run with the same choice.
        params = options.context_params(llama_cpp.llama_context_default_params())
        # Each sequence gets n_ctx cells of its own: the cache is split, not shared, so one long
        # conversation cannot starve the others, and attention skips the other sequences' cells.
        params.n_ctx = n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        with hearing() as made:
            self._ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not self._ctx:
            model.close()  # type: ignore[no-untyped-call]
            reason = made.reason() or "no reason given"
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} × {slots} tokens: {reason}")
        self.placement = placement_of(loaded, model.model, options, flash_attn_chosen(made, options.flash_attn))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_batch = n_batch
        self._prefill_chunk = min(prefill_chunk, n_batch)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._logits_type = ctypes.c_float * self.n_vocab
        # Per slot, the tokens whose cells the slot keeps from its last request. Written by the decode loop
        # before it hands the result back, read by the event loop only while the slot is free.
        self._kept: list[list[int]] = [[] for _ in range(slots)]
        self._kept_salt: list[str] = ["" for _ in range(slots)]  # the cache salt of the request that left them
        self.ram = RamCache(self._ctx, cache_ram)  # `cache_ram` bytes of slot states saved before overwriting
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._loop = threading.Thread(target=self._run, name=f"llamakit-decode-{resolved.name}", daemon=True)
        self._loop.start()
        log.info(
            "loaded %s (%s), batched engine, %d slot(s) of %d tokens, in %.1fs: %s",
            self.name,
            self.path,
            slots,
            n_ctx,
            time.perf_counter() - started,
            self.placement.describe(),
        )

    # --- the request side (event loop and executor threads) ---

    def choose_slot(self, free: list[int], prompt_tokens: list[int], cache_salt: str = "") -> int:
        """The free slot whose kept cells share the longest prefix with the prompt, when that saves enough to
        pay for a gap in the running ids; else the lowest free slot.

        llama.cpp decodes the sequences of a split cache in one pass only while their ids run consecutively
        (`split_equal`); a gap costs a second pass of every step for as long as both sides run.
        """
        shared = {slot: self._shared(slot, prompt_tokens, cache_salt) for slot in free}
        lowest = min(free)
        best = max(free, key=lambda slot: (shared[slot], -slot))
        return best if shared[best] - shared[lowest] >= GAP_WORTH else lowest

    def _shared(self, slot: int, prompt_tokens: list[int], cache_salt: str) -> int:
        """How many leading tokens of the prompt `slot` keeps for a request of `cache_salt`: none of another's."""
        return shared_prefix(self._kept[slot], prompt_tokens) if self._kept_salt[slot] == cache_salt else 0

    def kept_tokens(self, slot: int) -> int:
        """How many cells `slot` keeps from its last request (its prompt cache)."""
        return len(self._kept[slot])

    def generate(
        self,
        slot: int,
        job: GenerationJob,
        on_text: Callable[[str, int], None],
        cancel: threading.Event,
        on_progress: Callable[[], None] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        on_admitted: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        seq = _Sequence(
            seq_id=slot,
            job=job,
            output=TextOutput(self, job, on_text),
            sampler=self._sampler(job),
            cancel=cancel,
            started=time.perf_counter(),
            on_progress=on_progress,
            on_admitted=on_admitted,
            logprobs=logprobs if job.logprobs is not None else None,
        )
        with self._wake:
            if self._closing:
                if seq.sampler is not None:
                    llama_cpp.llama_sampler_free(seq.sampler)
                raise RuntimeError("the model is being unloaded")
            self._incoming.append(seq)
            self._wake.notify()
        seq.done.wait()
        if seq.error is not None:
            raise seq.error
        assert seq.result is not None
        return seq.result

    def _sampler(self, job: GenerationJob) -> llama_cpp.llama_sampler_p | None:
        """The same chain llama-cpp-python's `Llama` builds, so both engines sample alike; None for a chain of
        greedy alone (temperature 0 and nothing that changes the logits), which `_decode_and_sample` takes as
        the argmax of the logits: the token llama.cpp's greedy sampler picks (the first of the largest), without
        copying the vocabulary's logits into a candidate array per token (about 90 µs each for a 49k vocabulary,
        3 % of a step of eight streams on two cores)."""
        if job.temperature == 0 and not (job.logit_bias or job.penalized or job.grammar):
            return None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        # Biases and penalties first, then the grammar, as `Llama`'s chain orders them.
        if job.logit_bias:
            entries = [llama_cpp.llama_logit_bias(token, bias) for token, bias in job.logit_bias.items()]
            biases = (llama_cpp.llama_logit_bias * len(entries))(*entries)
            add(chain, llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(job.logit_bias), biases))
        if job.penalized:
            penalties = llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, job.repeat_penalty, job.frequency_penalty, job.presence_penalty
            )
            add(chain, penalties)
        if job.grammar:
            add(chain, llama_cpp.llama_sampler_init_grammar(self.vocab, job.grammar.encode("utf-8"), b"root"))
        if job.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())  # `_sampler` returns None when nothing comes before
        else:
            seed = job.seed if job.seed is not None else random.getrandbits(31)
            add(chain, llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(chain, llama_cpp.llama_sampler_init_top_p(job.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(job.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        sampler: llama_cpp.llama_sampler_p = chain
        return sampler

    # --- the decode loop (its own thread) ---

    def _run(self) -> None:
        running: list[_Sequence] = []
        while True:
            with self._wake:
                while not self._incoming and not running and not self._closing:
                    self._wake.wait()
                if self._closing:
                    break
                while self._incoming:
                    seq = self._incoming.popleft()
                    self._admit(seq)
                    running.append(seq)
            try:
                running = self._step(running)
            except BaseException as exc:  # a failed decode fails the requests in it, not the node
                log.exception("decode step failed")
                for seq in running:
                    self._finish(seq, error=exc)
                running = []
        for seq in [*running, *self._incoming]:
            self._finish(seq, error=RuntimeError("the model was unloaded"))

    def _admit(self, seq: _Sequence) -> None:
        """Keep the cells of the longest prefix the slot shares with the prompt, drop the rest, and feed what
        follows; at least the prompt's last token is decoded again, for its logits. A history about to be
        dropped is saved to the RAM cache first, and a longer prefix saved there is copied into the slot."""
        seq.admitted_ns = time.time_ns()
        prompt, slot, kept = seq.job.prompt_tokens, seq.seq_id, self._kept[seq.seq_id]
        salt = seq.job.cache_salt
        share = self._shared(slot, prompt, salt)
        if len(kept) - share >= SAVE_MIN_TOKENS:  # the slot's history is about to go: keep it in RAM
            self.ram.save(slot, kept, self._kept_salt[slot])
        saved_share, saved = self.ram.best(prompt, salt)
        if saved is not None and saved_share >= share + SAVE_MIN_TOKENS:
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
            share = saved_share if self.ram.restore(saved, slot, salt) else 0
        keep = min(share, len(prompt) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1):
            keep = 0  # a partial removal can be refused: start the slot afresh
            llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self._kept[slot] = []
        self._kept_salt[slot] = salt  # the cells the slot keeps from now on are this request's
        seq.cached = prompt[:keep]
        seq.reused = keep
        seq.prompt_left = prompt[keep:]
        if seq.on_admitted is not None:  # once per request, before its first token can be sampled
            try:
                seq.on_admitted(keep)
            except Exception:  # the request's own bookkeeping: it must not stop the loop that serves every slot
                log.exception("on_admitted failed")

    def _step(self, running: list[_Sequence]) -> list[_Sequence]:
        """One decode of every running sequence; returns the sequences still running after it."""
        still: list[_Sequence] = []
        for seq in running:
            if seq.cancel.is_set():
                self._finish(seq, cancelled=True)
            else:
                still.append(seq)
        running = still
        batch = self._batch
        # What each sequence feeds this step: generating sequences a token each; then prompts, in order of
        # arrival, as the budget allows: a whole batch when no stream waits, else `prefill_chunk` prompt tokens,
        # so that a long prompt is fed in chunks while the streams keep flowing.
        feeds: dict[int, list[int]] = {}
        budget = self._n_batch
        for seq in running:
            if seq.next_token is not None:
                feeds[seq.seq_id] = [seq.next_token]
                budget -= 1
        if feeds:
            budget = min(budget, self._prefill_chunk)
        for seq in running:
            if seq.prompt_left and budget > 0:
                take = min(len(seq.prompt_left), budget)
                feeds[seq.seq_id], seq.prompt_left = seq.prompt_left[:take], seq.prompt_left[take:]
                budget -= take
        # In ascending sequence order: llama.cpp decodes consecutive sequences of a split cache in one unit,
        # and splits the batch into several full passes when they come out of order.
        n = 0
        for seq in sorted(running, key=lambda s: s.seq_id):
            seq.logits_at = -1
            tokens = feeds.get(seq.seq_id)
            if not tokens:
                continue
            pos = len(seq.cached)
            for token in tokens:
                n = self._put(batch, n, token, pos, seq.seq_id, logits=False)
                pos += 1
            seq.cached += tokens
            if seq.next_token is not None or not seq.prompt_left:
                batch.logits[n - 1] = True  # a generated token, or the last of the prompt: sample after it
                seq.logits_at = n - 1
        if n == 0:
            return running
        batch.n_tokens = n
        # A step in progress: a long prompt chunk or a heavy grammar can take seconds, and is work, not a hang.
        self.step_started = time.monotonic()
        try:
            return self._decode_and_sample(running, feeds, n)
        finally:
            self.step_started = None

    def _decode_and_sample(self, running: list[_Sequence], feeds: dict[int, list[int]], n: int) -> list[_Sequence]:
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        with one_wakeup_per_inbox():  # each stream's text goes to the event loop with one wake-up for all
            return self._sample(running, feeds)

    def _sample(self, running: list[_Sequence], feeds: dict[int, list[int]]) -> list[_Sequence]:
        """The next token of every sequence whose logits the step computed; returns those still running."""
        still = []
        for seq in running:
            if seq.on_progress is not None and seq.seq_id in feeds:
                seq.on_progress()
            if seq.logits_at < 0:
                still.append(seq)
                continue
            if seq.sampler is None:
                token = int(self._logits_row(seq.logits_at).argmax())
            else:
                token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.logits_at)
            if not seq.first_token_ns:
                seq.first_token_ns = time.time_ns()
            if seq.logprobs is not None and not seq.output.is_end(token):
                logits = llama_cpp.llama_get_logits_ith(self._ctx, seq.logits_at)
                seq.logprobs.append(logprobs_at(self, logits, token, seq.job.logprobs or 0))
            if seq.output.add(token):
                self._finish(seq)
            else:
                seq.next_token = token
                still.append(seq)
        return still

    def _logits_row(self, i: int) -> npt.NDArray[np.float32]:
        """The `n_vocab` logits after the batch's `i`-th token, in place (no copy): valid until the next decode."""
        row = ctypes.cast(llama_cpp.llama_get_logits_ith(self._ctx, i), ctypes.c_void_p).value
        if not row:
            raise RuntimeError(f"llama.cpp has no logits for batch position {i}")
        return np.frombuffer(memoryview(self._logits_type.from_address(row)), dtype=np.float32)

    @staticmethod
    def _put(batch: llama_cpp.llama_batch, n: int, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos  # type: ignore[call-overload]
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _finish(self, seq: _Sequence, *, cancelled: bool = False, error: BaseException | None = None) -> None:
        """Hand the result to the waiting request. A finished sequence's cells stay as its slot's prompt
        cache; a cancelled or failed one's are freed at once."""
        if seq.done.is_set():
            return
        if cancelled or error is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        else:
            self._kept[seq.seq_id] = seq.cached
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
        if error is not None:
            seq.error = error
        else:
            seconds = time.perf_counter() - seq.started
            seq.result = seq.output.result(
                len(seq.job.prompt_tokens), seconds, cancelled=cancelled, cached_tokens=seq.reused,
                admitted_ns=seq.admitted_ns, first_token_ns=seq.first_token_ns,
            )  # fmt: skip
        seq.done.set()

    def _free_contexts(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._loop.join()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._model.close()  # type: ignore[no-untyped-call]
