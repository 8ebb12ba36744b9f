"""Token log probabilities as a generation carries them: one shape for chat and completions.

The router answers in OpenAI's two formats (chat's `logprobs.content` list, the legacy completions'
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`); both become a list of `TokenLogprob`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_TOP_LOGPROBS", "TokenLogprob", "TopLogprob", "logprobs_of"]

# OpenAI's limit on `top_logprobs` (chat) and `logprobs` (completions): the router's too.
MAX_TOP_LOGPROBS = 20


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position: its text, natural log probability, and UTF-8 bytes (None
    from a completions answer, which does not give them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    token: str
    logprob: float
    bytes: list[int] | None = None

    @property
    def probability(self) -> float:
        return math.exp(self.logprob)


class TokenLogprob(TopLogprob):
    """A generated token with its log probability, and the `top_logprobs` most likely tokens at its position."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


def logprobs_of(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    """A choice's (or a stream chunk's) token logprobs in either format; None when it has none."""
    data = choice.get("logprobs")
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("content"), list):  # chat
        return [TokenLogprob.model_validate(entry) for entry in data["content"] if isinstance(entry, dict)]
    tokens, logprobs = data.get("tokens"), data.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list):
        return None
    given = data.get("top_logprobs")
    tops: list[Any] = given if isinstance(given, list) else [None] * len(tokens)
    return [
        TokenLogprob(
            token=token,
            logprob=logprob,
            top_logprobs=[TopLogprob(token=t, logprob=p) for t, p in top.items()] if isinstance(top, dict) else [],
        )
        for token, logprob, top in zip(tokens, logprobs, tops, strict=False)
    ]
