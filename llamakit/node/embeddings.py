"""`POST /v1/embeddings` on a node: vectors from the node's own model, many inputs per llama.cpp batch.

An `Embedder` is a second llama.cpp context made for embeddings (`embeddings=True`, mean pooling over each
sequence's tokens), on its own handle of the same GGUF file (memory-mapped: the weights are shared through the
page cache), made on the first embedding request and remade when the node swaps its model. Its lifetime is
therefore its own: a swap never frees a model under it. Inputs are packed into one `llama_batch` as separate
sequences until the batch or the sequence count is full; each sequence's pooled vector is L2-normalised, as
OpenAI's vectors and llama-server's are.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from aiohttp import web
from llama_cpp._internals import LlamaModel

from llamakit.node.errors import (
    ContextOverflow,
    DimensionsMismatch,
    NodeError,
    NoModel,
    TokenOutsideVocabulary,
    TooManyTokens,
)
from llamakit.node.llama_log import hearing
from llamakit.node.placement import LlamaOptions, flash_attn_chosen, load_model
from llamakit.node.routes import HOST, METRICS, SETTINGS
from llamakit.node.settings import NodeSettings
from llamakit.web import json_response
from llamakit.wire.completions import parse_json
from llamakit.wire.embeddings import MAX_EMBEDDING_TOKENS, Input, embedding_body, parse_embedding_request

__all__ = ["EMBEDDINGS", "Embedder", "Embeddings", "embedding_routes", "setup_embeddings"]

log = logging.getLogger(__name__)

MAX_SEQUENCES = 16  # inputs decoded in one batch at most


@dataclass(frozen=True)
class Embedded:
    vectors: list[np.ndarray]
    prompt_tokens: int
    dimensions: int


class Embedder:
    """One embedding context of the GGUF at `path`; `n_ctx` tokens per batch, and so per input at most.
    Blocking: call `embed` off the event loop. One call at a time (a lock), as the context is one."""

    def __init__(self, path: Path, *, n_ctx: int, threads: int, options: LlamaOptions | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        options = options or LlamaOptions()
        # The node's GPU offload, flash attention and KV cache types: on a GPU, a second copy of the weights.
        self._model: LlamaModel = load_model(path, options)[0]
        self.vocab = self._model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.dimensions = llama_cpp.llama_model_n_embd(self._model.model)
        self.n_ctx = min(n_ctx, llama_cpp.llama_model_n_ctx_train(self._model.model) or n_ctx)
        params = options.context_params(llama_cpp.llama_context_default_params())
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.n_ctx = self.n_ctx
        # A whole batch in one micro-batch: pooling reads every token of a sequence at once.
        params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # the sequences of a batch share the n_ctx cells
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        with hearing() as made:
            self._ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not self._ctx:
            self._model.close()  # type: ignore[no-untyped-call]
            raise RuntimeError(
                f"llama.cpp could not create an embedding context of {self.n_ctx} tokens: "
                f"{made.reason() or 'no reason given'}"
            )
        self.flash_attn = flash_attn_chosen(made, options.flash_attn)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                llama_cpp.llama_batch_free(self._batch)
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
                self._model.close()  # type: ignore[no-untyped-call]

    def tokens(self, item: Input, index: int) -> list[int]:
        """An input's tokens: a text tokenized as plain text with a BOS (control tokens spelled in it stay text),
        token ids checked against the vocabulary (TokenOutsideVocabulary) and both against the context
        (ContextOverflow)."""
        if isinstance(item, str):
            tokens: list[int] = self._model.tokenize(item.encode("utf-8", "replace"), add_bos=True, special=False)
        else:
            bad = next((t for t in item if t >= self.n_vocab), None)
            if bad is not None:
                raise TokenOutsideVocabulary(
                    f"input {index} holds token id {bad}, which is not in the model's vocabulary of {self.n_vocab}",
                    param="input",
                )
            tokens = item
        if len(tokens) > self.n_ctx:
            raise ContextOverflow(
                f"input {index} is {len(tokens)} tokens; an input may be at most {self.n_ctx} tokens on this node",
                param="input",
            )
        return tokens

    def embed(self, inputs: list[Input]) -> Embedded:
        """The normalised vector of each input, in order, and the tokens read. A RequestRefused when a bound is
        passed (see `tokens`; TooManyTokens for the inputs together), NoModel once the context was closed."""
        with self._lock:
            if not self._ctx:
                raise NoModel("the embedding context was closed")
            encoded = [self.tokens(item, i) for i, item in enumerate(inputs)]
            total = sum(len(t) for t in encoded)
            if total > MAX_EMBEDDING_TOKENS:
                raise TooManyTokens(
                    f"the inputs are {total} tokens together; at most {MAX_EMBEDDING_TOKENS} are allowed per request",
                    param="input",
                )
            vectors: list[np.ndarray] = []
            group: list[list[int]] = []
            for tokens in encoded:
                if group and (sum(map(len, group)) + len(tokens) > self.n_ctx or len(group) == MAX_SEQUENCES):
                    vectors.extend(self._decode(group))
                    group = []
                group.append(tokens)
            vectors.extend(self._decode(group))
            return Embedded(vectors, total, self.dimensions)

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        llama_cpp.llama_memory_clear(self._memory, True)
        batch = self._batch
        n = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # embeddings need every token as an output
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on an embedding batch of {n} tokens")
        vectors = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            if not pointer:
                raise RuntimeError("llama.cpp returned no pooled embedding; the model cannot pool its tokens")
            array = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float * self.dimensions)).contents
            vector = np.array(array, dtype=np.float32)
            norm = float(np.linalg.norm(vector))
            vectors.append(vector / norm if norm > 0 else vector)
        return vectors


class Embeddings:
    """The node's embedder, made on first use and remade for another model file; calls run one at a time."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    def embedder(self, path: Path) -> Embedder:
        with self._lock:
            if self._embedder is not None and self._embedder.path != path:
                self._embedder.close()
                self._embedder = None
            if self._embedder is None:
                self._embedder = Embedder(
                    path,
                    n_ctx=self.settings.n_ctx,
                    threads=self.settings.threads,
                    options=LlamaOptions.from_settings(self.settings),
                )
                log.info(
                    "embedding context for %s: %d dimensions, flash attention %s",
                    path.name,
                    self._embedder.dimensions,
                    self._embedder.flash_attn,
                )
            return self._embedder

    def close(self) -> None:
        with self._lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None


EMBEDDINGS = web.AppKey("embeddings", Embeddings)

embedding_routes = web.RouteTableDef()


@embedding_routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """OpenAI's `POST /v1/embeddings` with the node's model; `usage.prompt_tokens` is every token embedded."""
    req = parse_embedding_request(parse_json(await request.read()))
    host, metrics = request.app[HOST], request.app[METRICS]
    model = await host.serving(req.model)
    embedder = await asyncio.to_thread(request.app[EMBEDDINGS].embedder, model.path)
    if req.dimensions is not None and req.dimensions != embedder.dimensions:
        metrics.requests.labels("embeddings", "rejected").inc()
        raise DimensionsMismatch(
            f"dimensions is {req.dimensions}, but {model.name!r} makes vectors of {embedder.dimensions} and llamakit "
            "does not shorten them: leave dimensions out or give that number",
            param="dimensions",
        )
    try:
        done = await asyncio.to_thread(embedder.embed, req.inputs)
    except NodeError:
        metrics.requests.labels("embeddings", "rejected").inc()
        raise
    metrics.requests.labels("embeddings", "ok").inc()
    metrics.prompt_tokens.inc(done.prompt_tokens)
    body = embedding_body(
        model=model.name,
        vectors=[v.tolist() for v in done.vectors],
        encoding_format=req.encoding_format,
        prompt_tokens=done.prompt_tokens,
    )
    return json_response(body)


def setup_embeddings(app: web.Application) -> None:
    """Add the embeddings route and the embedder's lifetime (closed with the app) to a node's app."""
    embeddings = Embeddings(app[SETTINGS])
    app[EMBEDDINGS] = embeddings
    app.add_routes(embedding_routes)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(embeddings.close)

    app.cleanup_ctx.append(lifetime)
