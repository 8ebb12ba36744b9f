"""A llamakit request in llama-server's terms, llama-server's stream chunks read back, and its errors as the
node's answers.

Every field a llamakit request carries is either sent to llama-server with the meaning it has on a node of
llama-cpp-python, or refused with a 400 that names it; none is dropped. llama-server is always asked for a
stream, whole answers included: each chunk then carries the tokens it has counted so far (`timings_per_token`),
so a generation stopped halfway still reports its exact usage, and the last chunk carries `usage`.

Sampling is pinned to what the llama-cpp-python node does (llama.cpp's top-k 40 and min-p 0.05 under OpenAI's
temperature and top-p, no DRY, XTC, Mirostat or typical-p), whatever defaults the llama-server was started
with: a request means the same on either kind of node. Tools, like on that node, are offered in a system
message and answered as JSON under a schema (`wire.tool_calls`): llama-server constrains the answer to that
schema (`json_schema`) and the node reads the calls out of it, so a herd that mixes both kinds of node answers
tool calls in one way, and the router's bound on the prompt holds for both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from llamakit.node.results import TokenLogprob
from llamakit.wire.completions import ChatCompletionRequest, CompletionRequest, GenerationRequest
from llamakit.wire.errors import ApiError

__all__ = ["SAMPLING", "Chunk", "generation_body", "read_chunk", "upstream_refusal"]

# llama.cpp's sampler settings as the llama-cpp-python node uses them (engine.TOP_K, engine.MIN_P), and the
# samplers llama-server offers beyond them switched off, in the order llama.cpp's common sampler applies them.
SAMPLING: dict[str, Any] = {
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "top_n_sigma": -1.0,
    "xtc_probability": 0.0,
    "dry_multiplier": 0.0,
    "mirostat": 0,
    "dynatemp_range": 0.0,
    "repeat_last_n": 64,  # engine.PENALTY_LAST_N
    "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
}


def generation_body(
    req: GenerationRequest, *, n_vocab: int | None, n_ctx: int, default_max_tokens: int, seed: int | None = None
) -> dict[str, Any]:
    """llama-server's body for `req` on `/v1/chat/completions` (a ChatCompletionRequest) or `/v1/completions`,
    streamed; ApiError 400 naming the field llama-server would take otherwise than llamakit means it (a
    `logit_bias` token outside the vocabulary of `n_vocab` tokens, which llama-server skips without a word; a
    `max_tokens` that leaves no room for a prompt in the slot's `n_ctx`, where it would stop at the context's end).
    `seed` is the one to use when the request gives none (default: a random one, as the node draws)."""
    if req.token_limit is not None and req.token_limit >= n_ctx:
        field = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        raise ApiError(
            400,
            f"{field} is {req.token_limit}, but the context holds {n_ctx} tokens, the prompt's included: ask for fewer",
            param=field,
            code="context_length_exceeded",
        )
    chosen = req.seed if req.seed is not None else seed
    body: dict[str, Any] = {
        "stream": True,
        "stream_options": {"include_usage": True},
        "timings_per_token": True,  # each chunk says how many tokens were read and made so far
        "return_progress": True,  # chunks while a long prompt is read: the node can tell the router it works
        # The last chunk's `__verbose.stop_type` tells an end-of-generation token ("eos"), which llama-server counts
        # among the completion tokens and the other kind of node does not, from a stop string ("word"): see
        # `read_chunk`. (It also carries the prompt's text once, in that last chunk.)
        "verbose": True,
        "n_predict": req.token_limit or min(default_max_tokens, n_ctx - 1),
        "temperature": req.temperature,
        "top_p": req.top_p,
        **SAMPLING,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repeat_penalty": req.repeat_penalty,
        # llama-server's seed is 32 bits, its all-ones value meaning "random"; 31 bits never mean that.
        "seed": (chosen if chosen is not None else random.getrandbits(31)) & 0x7FFFFFFF,
        "stop": req.stop_list,
        "n_probs": 0,
    }
    top = req.logprob_count()
    if top is not None:
        body["n_probs"] = max(top, 1)  # with 0 llama-server reports no logprob at all; the node trims to `top`
    if req.logit_bias:
        body["logit_bias"] = [[token, bias] for token, bias in _checked_bias(req.logit_bias, n_vocab)]
    schema: dict[str, Any] | None = None
    if isinstance(req, ChatCompletionRequest):
        body["messages"] = req.template_messages()  # tools offered in a system message, earlier calls as JSON
        body["reasoning_format"] = "none"  # a thinking model's text stays in the answer, as on the other node
        setup = req.tool_setup()
        if setup is not None:
            schema = setup.schema_
    else:
        assert isinstance(req, CompletionRequest)
        body["prompt"] = req.prompt_text
    if schema is None and req.response_format is not None:
        if req.response_format.type == "json_object":
            schema = {"type": "object"}
        elif req.response_format.type == "json_schema":
            assert req.response_format.json_schema is not None  # ResponseFormat checks it
            schema = req.response_format.json_schema.schema_
    if schema is not None:
        body["json_schema"] = schema
    elif req.grammar is not None:
        body["grammar"] = req.grammar
    return body


def _checked_bias(bias: dict[str, float], n_vocab: int | None) -> list[tuple[int, float]]:
    out = []
    for key, value in bias.items():
        token = int(key)
        if n_vocab is not None and token >= n_vocab:
            raise ApiError(
                400,
                f"logit_bias names token {token}, but the model's vocabulary has tokens 0 to {n_vocab - 1}",
                param="logit_bias",
                code="invalid_value",
            )
        out.append((token, float(value)))
    return out


@dataclass
class Chunk:
    """What one chunk of llama-server's stream adds: text, its tokens' logprobs (each trimmed to `top`
    alternatives), the finish reason, the token counts so far (`timings`: prompt, of which cached, and
    completion), how long llama-server has spent on the prompt and on generating (`timings`' `prompt_ms` and
    `predicted_ms`) and, last, `usage`."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    counts: tuple[int, int, int] | None = None  # prompt tokens, cached of them, completion tokens
    phases_ms: tuple[float, float] | None = None  # milliseconds reading the prompt, and generating since
    ended_on_eog: bool = False  # the generation ended on an end-of-generation token, which llama-server counted
    usage: dict[str, Any] | None = None


def read_chunk(event: dict[str, Any], *, top: int) -> Chunk:
    """A chat (`delta.content`) or text completion (`text`) chunk of llama-server's."""
    chunk = Chunk()
    for choice in event.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(text, str):
            chunk.text += text
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            entries = [_logprob(e, top) for e in logprobs.get("content") or () if isinstance(e, dict)]
            # The end-of-generation token (no text) has none in the answer, as on the other node.
            chunk.logprobs += [entry for entry in entries if entry.piece]
        if isinstance(choice.get("finish_reason"), str):
            chunk.finish_reason = choice["finish_reason"]
    timings = event.get("timings")
    if isinstance(timings, dict):
        cached, read, made = (int(timings.get(k) or 0) for k in ("cache_n", "prompt_n", "predicted_n"))
        chunk.counts = (cached + read, cached, made)
        prompt_ms, predicted_ms = timings.get("prompt_ms"), timings.get("predicted_ms")
        if isinstance(prompt_ms, int | float) and isinstance(predicted_ms, int | float):
            chunk.phases_ms = (max(float(prompt_ms), 0.0), max(float(predicted_ms), 0.0))
    if isinstance(event.get("usage"), dict):
        chunk.usage = event["usage"]
    verbose = event.get("__verbose")
    if isinstance(verbose, dict) and verbose.get("stop_type") == "eos":
        chunk.ended_on_eog = True
    return chunk


def _logprob(entry: dict[str, Any], top: int) -> TokenLogprob:
    def piece(item: dict[str, Any]) -> bytes:
        raw = item.get("bytes")
        return bytes(raw) if isinstance(raw, list) else str(item.get("token") or "").encode()

    alternatives = [a for a in entry.get("top_logprobs") or () if isinstance(a, dict)][:top]
    return TokenLogprob(
        token=int(entry.get("id") or 0),
        piece=piece(entry),
        logprob=float(entry.get("logprob") or 0.0),
        top=[(int(a.get("id") or 0), piece(a), float(a.get("logprob") or 0.0)) for a in alternatives],
    )


def upstream_refusal(status: int, kind: str, error_type: str, message: str, *, url: str) -> ApiError:
    """The node's answer when llama-server at `url` refused a request with `status` and its error type: the
    client's fault (400) only when it was; a 5xx otherwise, so that a router tries another node."""
    said = f"llama-server: {message}"
    if error_type == "exceed_context_size_error":
        param = "messages" if kind == "chat" else "prompt"
        return ApiError(400, said, param=param, code="context_length_exceeded")
    if status == 400:
        lowered = message.lower()
        if "json_schema" in lowered:
            return ApiError(400, said, param="response_format", code="invalid_schema")
        if "grammar" in lowered:
            return ApiError(400, said, param="grammar", code="invalid_grammar")
        return ApiError(400, said, code="invalid_value")
    if status in (401, 403):
        return ApiError(
            503,
            f"llama-server at {url} refused this node's API key: give its --api-key with --llama-server-api-key",
            type="server_error",
            code="upstream_auth",
        )
    if status == 503:
        return ApiError(503, said, type="server_error", code="loading", headers={"Retry-After": "5"})
    return ApiError(502, f"llama-server at {url} failed: {message}", type="server_error", code="upstream_error")
