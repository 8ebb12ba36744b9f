"""Small types shared by the whole SDK: the "not given" sentinel, timeouts and chat messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias, final

import httpx

__all__ = ["DEFAULT_TIMEOUT", "NOT_GIVEN", "EmbeddingInput", "Messages", "NotGiven", "Timeout"]


@final
class NotGiven:
    """The type of `NOT_GIVEN`: tells "the caller said nothing" apart from an explicit `None`.

    `timeout=None` means "wait forever", so `None` cannot also mean "use the client's setting".
    """

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        # One instance, so `is NOT_GIVEN` works even after a copy or a pickle round trip.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> Literal[False]:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __reduce__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven()

Timeout: TypeAlias = float | httpx.Timeout | None
"""Seconds (one number for every phase), an `httpx.Timeout` for each phase, or `None` for no limit."""

# Generation can take minutes on a busy herd (queue wait + tokens), but a router that does not accept a
# connection within seconds is down: fail that fast and let the retry policy try again.
DEFAULT_TIMEOUT: Final = httpx.Timeout(600.0, connect=5.0)

Messages: TypeAlias = str | Sequence[Mapping[str, Any]]
EmbeddingInput: TypeAlias = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
"""What `embed` takes: a text, texts, one list of token ids, or several (OpenAI's `input`)."""
"""A chat: OpenAI-style `{"role", "content"}` mappings, or a plain string taken as one user message."""
