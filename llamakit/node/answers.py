"""A generation in OpenAI's shapes: whole bodies and stream chunks, with logprobs and tool calls.

Logprobs follow OpenAI's two formats: chat's `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`
and the legacy completions' `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. A tool-call answer
is the generic-format JSON of `llamakit.wire.tool_calls`; streamed, the text of a `response` goes out as it comes,
and each call as `delta.tool_calls` items with an `index`: its id and name first, then its arguments' JSON
text piece by piece (OpenAI's stream shape).
"""

from __future__ import annotations

import codecs
from typing import Any

from llamakit.node.results import GenerationResult, TokenLogprob
from llamakit.wire.completions import (
    Usage,
    chat_chunk_body,
    chat_completion_body,
    completion_body,
    completion_chunk_body,
)
from llamakit.wire.tool_calls import ToolCallParser, parse_answer

__all__ = ["Answer", "chat_logprobs", "completion_logprobs"]


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat completions' `logprobs` object for `entries`."""
    return {
        "content": [
            {
                "token": _token_text(e.piece),
                "logprob": e.logprob,
                "bytes": list(e.piece),
                "top_logprobs": [
                    {"token": _token_text(piece), "logprob": logprob, "bytes": list(piece)}
                    for _, piece, logprob in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[TokenLogprob], *, offset: int = 0) -> dict[str, Any]:
    """Legacy completions' `logprobs` object; `text_offset` counts characters from `offset`."""
    tokens = [_token_text(e.piece) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(piece): logprob for _, piece, logprob in e.top} for e in entries],
        "text_offset": offsets,
    }


def content_entries(entries: list[TokenLogprob]) -> list[TokenLogprob]:
    """With tools, the answer is generated as JSON (`{"response": "…"}` or tool calls; see tool_calls.py) and
    its text is the string inside: the logprobs of a message are those of the tokens that made its text, as
    OpenAI gives them, not of the JSON around it. A token that holds both (`Hi"`) counts as text."""
    parser, decoder = ToolCallParser(), codecs.getincrementaldecoder("utf-8")("replace")
    return [entry for entry in entries if parser.feed(decoder.decode(entry.piece))[0]]


class Answer:
    """One generation's answer as `kind` ("chat" or "completion") bodies and chunks."""

    def __init__(self, *, kind: str, id: str, model: str, tools: bool, logprobs: list[TokenLogprob] | None) -> None:
        self.kind = kind
        self.id = id
        self.model = model
        self.logprobs = logprobs
        self.parser = ToolCallParser() if tools else None
        self._given = 0  # logprob entries already sent in chunks
        self._offset = 0  # characters of completion text already sent (text_offset)

    # --- whole ---

    def body(self, result: GenerationResult, usage: Usage) -> dict[str, Any]:
        finish = "stop" if result.finish_reason == "cancelled" else result.finish_reason
        if self.kind != "chat":
            logprobs = None if self.logprobs is None else completion_logprobs(self.logprobs)
            return completion_body(
                id=self.id, model=self.model, text=result.text, finish_reason=finish, usage=usage, logprobs=logprobs
            )
        entries = self.logprobs
        if entries is not None and self.parser is not None:
            entries = content_entries(entries)
        logprobs = None if entries is None else chat_logprobs(entries)
        text: str | None = result.text
        calls = None
        if self.parser is not None:
            parsed = parse_answer(result.text, finished=finish == "stop")
            text, calls = parsed.content, parsed.tool_calls
            if calls and finish == "stop":  # a call cut by max_tokens keeps "length", as OpenAI says it
                finish = "tool_calls"
        return chat_completion_body(
            id=self.id, model=self.model, text=text, finish_reason=finish, usage=usage, tool_calls=calls,
            logprobs=logprobs,
        )  # fmt: skip

    # --- streamed ---

    def opening(self) -> list[dict[str, Any]]:
        if self.kind == "chat":
            return [chat_chunk_body(id=self.id, model=self.model, delta={"role": "assistant", "content": ""})]
        return []

    def piece(self, text: str, n_completion: int) -> list[dict[str, Any]]:
        """Chunks for a piece of text made of the tokens up to `n_completion`: its text, or with tools the
        answer's text and tool-call deltas known so far (none while the shape of the answer is not)."""
        if self.parser is None:
            return [self._text_chunk(text, self._logprobs_until(n_completion))]
        text, calls = self.parser.feed(text)
        # Tokens that made no text (the JSON around it, or a call) have no logprobs in the answer: see
        # content_entries.
        logprobs = self._logprobs_until(n_completion)
        chunks = [self._text_chunk(text, logprobs)] if text else []
        for call in calls:
            delta: dict[str, Any] = {"tool_calls": [call]}
            if "id" in call and call["index"] == 0:
                delta["content"] = None
            chunks.append(chat_chunk_body(id=self.id, model=self.model, delta=delta))
        return chunks

    def closing(self, result: GenerationResult) -> list[dict[str, Any]]:
        """The last chunks: what a tool-call answer held back, then the one with the finish reason."""
        chunks: list[dict[str, Any]] = []
        finish = result.finish_reason
        if self.parser is not None and self.parser.streaming_calls:
            # The calls went out as they came. Cut short, the last is as far as it got, and the finish reason
            # says why (as OpenAI streams a call cut by max_tokens).
            if self.parser.calls_complete and finish == "stop":
                finish = "tool_calls"
        elif self.parser is not None and not self.parser.streaming_text:
            parsed = self.parser.finish(finished=finish == "stop")
            if parsed.tool_calls:
                finish = "tool_calls"
                for index, call in enumerate(parsed.tool_calls):
                    delta: dict[str, Any] = {"tool_calls": [{"index": index, **call}]}
                    if index == 0:
                        delta["content"] = None
                    chunks.append(chat_chunk_body(id=self.id, model=self.model, delta=delta))
            elif parsed.content:
                chunks.append(self._text_chunk(parsed.content, None))
        rest = self._logprobs_until(len(self.logprobs)) if self.logprobs is not None else None
        if self.parser is not None:  # with tools, what is left is the JSON that closes the answer
            rest = None if rest is None else chat_logprobs([])
        if self.kind == "chat":
            chunks.append(chat_chunk_body(id=self.id, model=self.model, delta={}, finish_reason=finish, logprobs=rest))
        else:
            chunks.append(
                completion_chunk_body(id=self.id, model=self.model, text="", finish_reason=finish, logprobs=rest)
            )
        return chunks

    def usage(self, usage: Usage) -> dict[str, Any]:
        if self.kind == "chat":
            return chat_chunk_body(id=self.id, model=self.model, delta=None, usage=usage)
        return completion_chunk_body(id=self.id, model=self.model, text=None, usage=usage)

    def _text_chunk(self, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        if self.kind == "chat":
            return chat_chunk_body(id=self.id, model=self.model, delta={"content": text}, logprobs=logprobs)
        return completion_chunk_body(id=self.id, model=self.model, text=text, logprobs=logprobs)

    def _logprobs_until(self, n: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        entries = self.logprobs[self._given : n]
        self._given = max(self._given, n)
        if self.kind == "chat":
            return chat_logprobs(entries)
        shaped = completion_logprobs(entries, offset=self._offset)
        self._offset += sum(len(t) for t in shaped["tokens"])
        return shaped
