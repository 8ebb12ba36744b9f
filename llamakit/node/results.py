"""What a generation produced, in terms both kinds of node share (llama-cpp-python's engines and a node fronting
llama-server): the text and token counts, and each token's log probability. No llama.cpp import here."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GenerationResult", "TokenLogprob"]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability under the model (the softmax of its raw logits, before any
    sampling setting), with the `top` most likely tokens at that step, each `(token, bytes, logprob)`."""

    token: int
    piece: bytes
    logprob: float
    top: list[tuple[int, bytes, float]]


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced: `finish_reason` is `stop`, `length` or `cancelled`; `cached_tokens` of
    the prompt's tokens were found in the slot's cache and not decoded again (they count in `prompt_tokens`).
    `admitted_ns` is when the engine took it in and `first_token_ns` when it sampled its first token (epoch
    nanoseconds, 0 when unknown): the node's trace splits queue, prefill and decode by them."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    cached_tokens: int = 0
    admitted_ns: int = 0
    first_token_ns: int = 0
