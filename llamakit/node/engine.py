"""The inference engine: one GGUF model held in `slots` llama.cpp contexts, each generating on its own thread.

Everything here is blocking and runs off the event loop; the HTTP layer talks to it through `GenerationJob`
(what to generate), a piece callback (text as it is produced) and a `threading.Event` (stop now).
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

from llamakit.catalog import ResolvedModel
from llamakit.node.chat_tokens import chat_tokens
from llamakit.node.errors import BadGrammar, BadSchema, BiasOutsideVocabulary, ContextOverflow, EmptyPrompt
from llamakit.node.grammar_check import GrammarCheck
from llamakit.node.llama_log import hearing, redirecting
from llamakit.node.placement import LlamaOptions, Placement, flash_attn_chosen, placement_of
from llamakit.node.results import GenerationResult, TokenLogprob
from llamakit.wire.completions import check_grammar_shape

__all__ = [
    "GenerationJob",
    "GenerationResult",
    "LoadedModel",
    "SimpleModel",
    "TextOutput",
    "TokenLogprob",
    "logprobs_at",
    "shared_prefix",
]

log = logging.getLogger(__name__)

# llama.cpp's own sampling defaults; OpenAI exposes only temperature and top_p.
TOP_K = 40
MIN_P = 0.05


# Generated tokens the penalties look back on, as llama-cpp-python's `Llama` and llama-server default to.
PENALTY_LAST_N = 64


@dataclass(frozen=True)
class GenerationJob:
    """A validated request, tokenized and ready for a slot.

    `logit_bias` maps token ids to a bias added to their logits (-100 bans, +100 forces, as OpenAI's);
    `presence_penalty`, `frequency_penalty` (OpenAI's, from -2 to 2) and `repeat_penalty` (llama.cpp's, 1 is
    off) look at the last PENALTY_LAST_N generated tokens; `logprobs` is how many alternatives to report per
    token (None: no logprobs, and no cost).
    """

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logprobs: int | None = None
    # Whose prompt cache this may reuse: only cells a request of the same salt left (the router's
    # X-Llamakit-Cache-Salt, one per account). A shared prefix shows in `cached_tokens` and in how fast the
    # prompt is read, so reusing another tenant's cells would tell a client what that tenant's prompt began with.
    cache_salt: str = ""

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repeat_penalty != 1


def logprobs_at(model: LoadedModel, logits: Any, token: int, top: int) -> TokenLogprob:
    """The TokenLogprob of `token` from a step's `n_vocab` logits (a ctypes float array or numpy row)."""
    row = np.ctypeslib.as_array(logits, shape=(model.n_vocab,)) if not isinstance(logits, np.ndarray) else logits
    row = row.astype(np.float64)
    peak = row.max()
    log_total = peak + math.log(float(np.exp(row - peak).sum()))
    best: list[tuple[int, bytes, float]] = []
    if top > 0:
        ids = np.argpartition(-row, top)[:top]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = [(int(i), model.piece(int(i)), float(row[i] - log_total)) for i in ids]
    return TokenLogprob(token, model.piece(token), float(row[token] - log_total), best)


class _StopMatcher:
    """Finds stop strings across token boundaries and holds back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return what is safe to emit and whether a stop string was reached."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextOutput:
    """Turns sampled tokens into text for one generation: whole UTF-8 characters, stop strings, token counts."""

    def __init__(self, model: LoadedModel, job: GenerationJob, on_text: Callable[[str, int], None]) -> None:
        self._model = model
        self._max_tokens = job.max_tokens
        self._on_text = on_text
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = _StopMatcher(job.stop)
        self._pieces: list[str] = []
        self.completion_tokens = 0
        self.finish_reason = "length"
        self._stop_string_hit = False

    def is_end(self, token: int) -> bool:
        """Whether `token` ends the generation (end of generation or of turn): it is neither text nor counted."""
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def add(self, token: int) -> bool:
        """Take one sampled token; True when the generation is over (end of generation, stop string, limit)."""
        if self.is_end(token):
            self.finish_reason = "stop"
            return True
        self.completion_tokens += 1
        text, stopped = self._matcher.feed(self._decoder.decode(self._model.piece(token)))
        if text:
            self._pieces.append(text)
            self._on_text(text, self.completion_tokens)
        if stopped:
            self.finish_reason = "stop"
            self._stop_string_hit = True
            return True
        return self.completion_tokens >= self._max_tokens

    def result(
        self,
        prompt_tokens: int,
        seconds: float,
        *,
        cancelled: bool = False,
        cached_tokens: int = 0,
        admitted_ns: int = 0,
        first_token_ns: int = 0,
    ) -> GenerationResult:
        if cancelled:
            self.finish_reason = "cancelled"
        if not self._stop_string_hit:
            # Text held back as the possible start of a stop string (or of a UTF-8 character) was generated and
            # is paid for: it belongs to the answer whenever generation ends for another reason.
            tail = self._matcher.feed(self._decoder.decode(b"", final=True))[0] + self._matcher.flush()
            if tail:
                self._pieces.append(tail)
                self._on_text(tail, self.completion_tokens)
        return GenerationResult(
            text="".join(self._pieces),
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
            seconds=seconds,
            cached_tokens=cached_tokens,
            admitted_ns=admitted_ns,
            first_token_ns=first_token_ns,
        )


_BLOCK = 256  # tokens compared at once by shared_prefix


def shared_prefix(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token lists. It runs on the event loop for every free slot of
    every request, and a slot may hold thousands of tokens: whole blocks are compared at C speed first."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i : i + _BLOCK] == b[i : i + _BLOCK]:
        i += _BLOCK
    if i >= n:
        return n
    for j in range(i, min(i + _BLOCK, n)):
        if a[j] != b[j]:
            return j
    return n


class LoadedModel:
    """What every engine shares: the model's vocabulary, chat template, grammar checks and token limits.

    Subclasses hold the llama.cpp contexts and implement `generate`; `slots` requests may run at once, and
    slot `i` is used by one request at a time (the node's `ModelHost` guarantees it).
    """

    engine = "base"

    def __init__(self, resolved: ResolvedModel, model: LlamaModel, *, slots: int, n_ctx: int) -> None:
        self.name = resolved.name
        self.path = resolved.path
        self.n_ctx = n_ctx
        self.slots = slots
        self._model = model
        self.vocab = model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos_token = model.token_eos()
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._piece_lock = threading.Lock()
        self.chat_formatter = self._chat_formatter(model)
        # time.monotonic() when the decode step running now began (None between steps; engines that have one
        # decode loop set it): the node's keepalives tell a slow step from a stuck one by it.
        self.step_started: float | None = None
        # Where llama.cpp put the model and how it attends (engines set it once their contexts exist).
        self.placement: Placement | None = None
        self.closed = False
        # llama.cpp compiles a request's grammar in a helper process first: a grammar can crash its compiler.
        self.grammars = GrammarCheck(resolved.path)

    @staticmethod
    def _chat_formatter(model: LlamaModel) -> Jinja2ChatFormatter | None:
        template = model.metadata().get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def close(self) -> None:
        """Free the model's contexts and its grammar helper. Once only: a model retired by its last slot's request
        after the host already closed it is closed again, and freeing llama.cpp's contexts twice crashes."""
        if self.closed:
            return
        self.closed = True
        self.grammars.close()
        self._free_contexts()

    def _free_contexts(self) -> None:
        raise NotImplementedError

    def choose_slot(self, free: list[int], prompt_tokens: list[int], cache_salt: str = "") -> int:
        """Which free slot a request for `prompt_tokens` (of `cache_salt`, see GenerationJob) gets; the lowest,
        unless an engine knows better."""
        return min(free)

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
        """Generate on `slot`, calling `on_text(piece, completion_tokens_so_far)` as soon as a piece of text is
        whole (a piece can hold several tokens: UTF-8 sequences and held-back stop prefixes). Stops at an
        end-of-generation token, a stop string, `max_tokens`, or when `cancel` is set; the completion tokens
        counted are the tokens sampled and delivered, the end-of-generation token excluded. `on_progress()` is
        called after each decode that advanced this request (a token, or a chunk of its prompt): the proof of
        life a node sends its router while an answer takes long. With `job.logprobs` set, one TokenLogprob per
        counted token is appended to `logprobs` before the text that holds the token is handed on.
        `on_admitted(cached_tokens)` is called once, before any text, with how many prompt tokens the slot's cache
        held (the result's `cached_tokens`): a stream's running counts carry it from its first token on."""
        raise NotImplementedError

    # --- preparing a request (any thread; tokenizing only reads the vocabulary) ---

    def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of a chat rendered with the model's own template.

        Only the template's own markup becomes control tokens: message text is always tokenized as plain text,
        so a user who types `<|im_end|>` cannot end its turn and write another role's (see chat_tokens.py).
        """
        if self.chat_formatter is None:
            # A base model without a template: a plain transcript that ends where the assistant speaks.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self._tokens(text, bos=True, special=False)
        return chat_tokens(self.chat_formatter, messages, self._tokens, self.is_control)

    def tokenize_text(self, text: str) -> list[int]:
        # special=True, as llama-cpp-python and llama-server's /completion do: a raw prompt is the caller's own
        # markup and may spell out template tokens. Chat messages never are (tokenize_chat).
        return self._tokens(text, bos=True, special=True)

    def _tokens(self, text: str, *, bos: bool, special: bool) -> list[int]:
        tokens: list[int] = self._model.tokenize(text.encode("utf-8", "replace"), add_bos=bos, special=special)
        return tokens

    def is_control(self, token: int) -> bool:
        """Whether `token` is a control token (end of turn, start of a role …), per the model's vocabulary."""
        # Only control tokens: llama.cpp leaves them unparsed in plain text. User-defined tokens (Gemma's runs of
        # spaces or its HTML tags) are ordinary vocabulary that plain text matches too.
        return bool(llama_cpp.llama_vocab_get_attr(self.vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)

    def grammar_for(
        self, grammar: str | None, response_format: Any | None, *, tools_schema: dict[str, Any] | None = None
    ) -> str | None:
        """The GBNF to constrain sampling with (a request's own, one for a JSON response format, or one for
        the JSON answers of tool calls), checked with llama.cpp's own parser. BadGrammar (the client's own grammar)
        or BadSchema (one made from a JSON schema) says why it cannot be used."""
        param = "grammar"
        if response_format is not None and response_format.type == "json_object":
            return JSON_GBNF
        if tools_schema is not None:
            grammar, param = self._schema_grammar(tools_schema, "tools"), "tools"
        elif response_format is not None and response_format.type == "json_schema":
            grammar = self._schema_grammar(response_format.json_schema.schema_, "response_format")
            param = "response_format"
        if grammar is None:
            return None
        made = param != "grammar"  # a grammar made here from a JSON schema, not the client's own
        what = f"the grammar made from the {param}'s JSON schema" if made else "the grammar"
        try:
            check_grammar_shape(grammar, what=what)
            problem = self.grammars.error(grammar)
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            if problem == "llama.cpp could not parse it" or problem.startswith("failed to parse grammar"):
                problem += (
                    " (check it against llama.cpp's GBNF syntax, grammars/README.md in llama.cpp; "
                    "a rule named 'root' is required)"
                )
            refusal = BadSchema if made else BadGrammar
            raise refusal(f"{what} cannot be used: {problem}" + ("; simplify the schema" if made else ""), param=param)
        return grammar

    @staticmethod
    def _schema_grammar(schema: dict[str, Any], param: str) -> str:
        try:
            grammar: str = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter raises ValueError, KeyError, RecursionError …
            what = "response_format.json_schema.schema" if param == "response_format" else "a tool's parameters"
            reason = {
                KeyError: f"it refers to {exc} (a $ref that is not in the schema)",
                RecursionError: "it refers to itself too deeply",
            }.get(type(exc), str(exc) or type(exc).__name__)
            raise BadSchema(f"{what} cannot be turned into a grammar: {reason}", param=param) from exc
        return grammar

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """`logit_bias` with token ids checked against the vocabulary; BiasOutsideVocabulary names the first one
        outside."""
        out: dict[int, float] = {}
        for key, value in (bias or {}).items():
            token = int(key)
            if token >= self.n_vocab:
                raise BiasOutsideVocabulary(
                    f"logit_bias names token {token}, but {self.name}'s vocabulary has tokens 0 to {self.n_vocab - 1}",
                    param="logit_bias",
                )
            out[token] = float(value)
        return out

    def plan_tokens(self, n_prompt: int, max_tokens: int | None, default_max_tokens: int) -> int:
        """`max_tokens` for a prompt of `n_prompt` tokens (`default_max_tokens` when None, cut to the room left).
        EmptyPrompt for no tokens; ContextOverflow, naming both numbers and the context, when they do not fit."""
        if n_prompt == 0:
            raise EmptyPrompt("the prompt is empty: there is nothing to continue", param="prompt")
        room = self.n_ctx - n_prompt
        if room <= 0:
            raise ContextOverflow(
                f"the prompt is {n_prompt} tokens, which does not fit the context of {self.n_ctx} tokens; "
                "shorten the prompt",
                param="messages",
            )
        if max_tokens is None:
            return min(default_max_tokens, room)
        if max_tokens > room:
            raise ContextOverflow(
                f"the prompt is {n_prompt} tokens and max_tokens is {max_tokens}, but the context holds "
                f"{self.n_ctx} tokens: ask for at most {room} tokens",
                param="max_tokens",
            )
        return max_tokens

    # --- generating (one thread per slot) ---

    def piece(self, token: int) -> bytes:
        """The bytes of one token, cached: a piece may be part of a UTF-8 character."""
        piece = self._pieces.get(token)
        if piece is None:
            with self._piece_lock:
                n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buffer, 256, 0, False)
                piece = self._piece_buffer.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece


class SimpleModel(LoadedModel):
    """The first engine: llama-cpp-python's `Llama`, one context per slot, each generating on its own thread."""

    engine = "simple"

    def __init__(
        self, resolved: ResolvedModel, *, slots: int, n_ctx: int, threads: int, options: LlamaOptions | None = None
    ) -> None:
        started = time.perf_counter()
        options = options or LlamaOptions()

        def llama(flash_attn: bool) -> Llama:
            return Llama(
                model_path=str(resolved.path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                **options.llama_kwargs(flash_attn=flash_attn),
            )

        with redirecting:  # not verbose, Llama points stderr at /dev/null while it loads: one load at a time
            with hearing() as loaded:
                first = llama(options.flash_attn != "off")
            # `Llama` takes flash attention on or off only: `auto` is asked of llama.cpp on the loaded model.
            chosen = options.flash_attn
            if chosen == "auto":
                chosen = "off" if self._flash_attn_auto(first, options, threads) == "off" else "on"
                if chosen == "off":
                    first.close()
                    first = llama(False)
            self.contexts = [first, *(llama(chosen == "on") for _ in range(slots - 1))]
        self._salts = ["" for _ in range(slots)]  # the cache salt of each context's last request
        super().__init__(resolved, self.contexts[0]._model, slots=slots, n_ctx=n_ctx)
        self.placement = placement_of(loaded, first._model.model, options, chosen)
        log.info(
            "loaded %s (%s), simple engine, %d slot(s), n_ctx=%d, in %.1fs: %s",
            self.name,
            self.path,
            slots,
            n_ctx,
            time.perf_counter() - started,
            self.placement.describe(),
        )

    @staticmethod
    def _flash_attn_auto(llama: Llama, options: LlamaOptions, threads: int) -> str:
        """What llama.cpp makes of flash attention `auto` for this model where it was placed: a small context
        made and freed to hear it say."""
        params = options.context_params(llama_cpp.llama_context_default_params())
        params.n_ctx = params.n_batch = params.n_ubatch = 256
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        with hearing() as made:
            ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if ctx:
            llama_cpp.llama_free(ctx)
        return flash_attn_chosen(made, "auto")

    @staticmethod
    def _biases(job: GenerationJob) -> LogitsProcessorList | None:
        """`logit_bias` as llama-cpp-python applies it: a logits processor ahead of its sampler chain."""
        if not job.logit_bias:
            return None
        ids = np.array(list(job.logit_bias), dtype=np.intc)
        biases = np.array(list(job.logit_bias.values()), dtype=np.single)

        def bias(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += biases
            return scores

        return LogitsProcessorList([bias])

    def _free_contexts(self) -> None:
        for llama in self.contexts:
            llama.close()
        self.contexts = []

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
        llama = self.contexts[slot]
        if self._salts[slot] != job.cache_salt:  # another tenant's cells: its prefix is not this request's to reuse
            llama.reset()  # type: ignore[no-untyped-call]
            self._salts[slot] = job.cache_salt
        llama.set_seed(job.seed if job.seed is not None else random.getrandbits(31))
        grammar = LlamaGrammar.from_string(job.grammar, verbose=False) if job.grammar else None
        output = TextOutput(self, job, on_text)
        # What Llama.generate will keep of its cache: the prefix it shares with the prompt but its last token.
        cached = shared_prefix(llama._input_ids[: llama.n_tokens].tolist(), job.prompt_tokens[:-1])
        if on_admitted is not None:
            on_admitted(cached)
        started = time.perf_counter()
        admitted_ns, first_token_ns = time.time_ns(), 0
        cancelled = False
        tokens = llama.generate(
            job.prompt_tokens, top_k=TOP_K, top_p=job.top_p, min_p=MIN_P, temp=job.temperature,
            repeat_penalty=job.repeat_penalty, frequency_penalty=job.frequency_penalty,
            presence_penalty=job.presence_penalty, grammar=grammar, logits_processor=self._biases(job),
        )  # fmt: skip
        try:
            for token in tokens:
                if not first_token_ns:  # llama.generate decodes the prompt before its first token
                    first_token_ns = time.time_ns()
                if on_progress is not None:
                    on_progress()
                if cancel.is_set():
                    cancelled = True
                    break
                if logprobs is not None and job.logprobs is not None and not output.is_end(token):
                    # The row the token was sampled from: Llama keeps the last decoded position's logits.
                    row = llama.scores[llama.n_tokens - 1, :]
                    logprobs.append(logprobs_at(self, row, token, job.logprobs))
                if output.add(token):
                    break
        finally:
            tokens.close()
        seconds = time.perf_counter() - started
        return output.result(
            len(job.prompt_tokens), seconds, cancelled=cancelled, cached_tokens=cached, admitted_ns=admitted_ns,
            first_token_ns=first_token_ns,
        )  # fmt: skip
