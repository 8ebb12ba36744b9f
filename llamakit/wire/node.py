"""The node ↔ router contract beyond OpenAI's shapes: a node's `/health` body, and the running token counts a
node appends to each token chunk of a stream.

A stream cut by its client is charged "for the tokens generated", before any usage chunk exists: so every token
chunk a node sends carries, as its last field after `"usage":null`, `"llamakit":{"prompt_tokens":P,
"completion_tokens":C,"cached_tokens":K}` (K of the P prompt tokens were read from the node's prompt cache, and
are charged at the cached fee: docs/money.md#cached-prompt-tokens). The router strips the field before the client
sees the chunk. `with_counts` writes it and `split_counts` finds it at the end of the bytes, so that the router
passes the rest on without parsing the JSON (the relay does so once per token). A chunk from a node older than
`cached_tokens` reads as K = 0. Headers are in `llamakit.wire.headers`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

__all__ = ["COUNTS_FIELD", "LlamaServerHealth", "NodeHealth", "TokenCounts", "split_counts", "with_counts"]

COUNTS_FIELD = "llamakit"

# A token chunk's tail: no usage, then the counts. An unescaped `"` never occurs inside a JSON string, so this
# tail can only be the object's own fields.
_NO_USAGE = b',"usage":null'
_COUNTS_AT = _NO_USAGE + b',"' + COUNTS_FIELD.encode() + b'":{"prompt_tokens":'
_COMPLETION_AT = b',"completion_tokens":'
_CACHED_AT = b',"cached_tokens":'
_END = b"}}"


class TokenCounts(NamedTuple):
    """What a stream has delivered so far: its prompt tokens (`cached_tokens` of them read from the node's prompt
    cache, known before the first token) and the completion tokens sent up to this chunk.

    A named tuple: a router makes one per token chunk it relays, and one is made in about 0.23 µs where a frozen
    dataclass of three fields takes 0.4 µs (bench/token_counts.py)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }


def with_counts(chunk: dict[str, Any], counts: TokenCounts) -> dict[str, Any]:
    """`chunk` (an OpenAI chunk whose `usage` is None) with `counts` as its last field, as a node sends it."""
    chunk[COUNTS_FIELD] = counts.as_dict()
    return chunk


def split_counts(payload: bytes) -> tuple[bytes, TokenCounts] | None:
    """A token chunk's JSON text without its counts (as the client gets it), and the counts; None when `payload`
    does not end as `with_counts` writes (any other event, or a chunk whose JSON was written otherwise)."""
    at = payload.rfind(_COUNTS_AT)
    if at < 0 or not payload.endswith(_END):
        return None
    numbers = payload[at + len(_COUNTS_AT) : -len(_END)]
    prompt, sep, rest = numbers.partition(_COMPLETION_AT)
    completion, cached_sep, cached = rest.partition(_CACHED_AT)
    if not sep or not prompt.isdigit() or not completion.isdigit() or (cached_sep and not cached.isdigit()):
        return None
    counts = TokenCounts(int(prompt), int(completion), int(cached) if cached_sep else 0)
    return payload[: at + len(_NO_USAGE)] + b"}", counts


class LlamaServerHealth(BaseModel):
    """The llama.cpp llama-server a node fronts: where, which build, and, when the node started it (`supervised`),
    its process and how often it was restarted."""

    url: str
    build: str | None = None
    supervised: bool = False
    pid: int | None = None
    restarts: int = 0


class NodeHealth(BaseModel):
    """A node's `GET /health` body: what the router learns of it (its models, slots and context per slot), and
    where llama.cpp runs its model (absent from nodes that do not say, and while a model loads)."""

    status: Literal["ready", "loading", "error"] | str
    name: str | None = None
    model: str | None = None
    models: list[str] = []
    slots: int = 1
    busy: int = 0
    n_ctx: int | None = None  # tokens per slot, prompt and completion together
    error: str | None = None
    backend: str | None = None  # the devices holding the model's layers, GPUs first: "CUDA0", "CUDA0+CPU", "CPU"
    gpu_layers: int | None = None  # layers offloaded to a GPU: 0 on a CPU-only llama.cpp
    layers: int | None = None  # layers that could be offloaded (the repeating ones and the output layer)
    flash_attn: str | None = None  # "on" or "off" as llama.cpp chose it ("auto" if it did not say)
    cache_type_k: str | None = None  # KV cache types: "f16", "q8_0" …
    cache_type_v: str | None = None
    # What is wrong with the loaded model's file on disk (gone, unreadable): the node still serves from memory,
    # but could not load the model again. None while the file is there.
    model_file: str | None = None
    llama_server: LlamaServerHealth | None = None  # a node whose engine is llama.cpp's own llama-server
