"""Function calling in llama.cpp's generic format: tools described in a system message, JSON answers forced by
a grammar, and the JSON turned back into OpenAI's `tool_calls`.

The catalog models' chat templates know nothing of tools, so every model gets the format llama.cpp's server
uses for templates without tool support (`common_chat_params_init_generic` in llama.cpp's `chat.cpp`): the
model answers with one JSON object, either `{"tool_calls": [{"name": …, "arguments": {…}}]}` or
`{"response": "…"}`, and a grammar built from the tools' parameter schemas makes any other answer impossible.
With `tool_choice: "required"` or a named function only the first shape is allowed; with `"none"` the tools
are not offered at all. A conversation's earlier calls and their results are rendered in the same JSON, in
assistant and user turns, so that any chat template can carry them.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from llamakit.wire._lenient import Lenient

__all__ = [
    "FunctionDefinition",
    "ParsedAnswer",
    "Tool",
    "ToolCallParser",
    "ToolSetup",
    "parse_answer",
    "render_tool_messages",
    "tool_setup",
]

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class FunctionDefinition(Lenient):
    name: str = Field(json_schema_extra={"pattern": _NAME.pattern})  # checked by `_name`, which says the rule
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a function name is 1 to 64 letters, digits, underscores or dashes")
        return value


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class ToolSetup(BaseModel):
    """What a chat request with tools adds to generation: a system message and the grammar's JSON schema."""

    system: str
    schema_: dict[str, Any]
    required: bool


def chosen_function(tool_choice: ToolChoice | None) -> str | None:
    """The function a named `tool_choice` ({"type": "function", "function": {"name": …}}) forces, else None."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError('a named tool_choice is {"type": "function", "function": {"name": "<a tool>"}}')
        return name
    return None


def tool_setup(tools: list[Tool], tool_choice: ToolChoice | None, *, parallel: bool) -> ToolSetup | None:
    """The system message and answer schema for `tools` under `tool_choice` (OpenAI's default: `auto`), or None
    when no tool is offered (`none`, or no tools). Raises ValueError for a choice that names no given tool."""
    choice = tool_choice if tool_choice is not None else "auto"
    if not tools or choice == "none":
        return None
    named = chosen_function(choice)
    offered = [t.function for t in tools]
    if named is not None:
        offered = [f for f in offered if f.name == named]
        if not offered:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
    calls: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [_call_schema(f) for f in offered]},
    }
    if not parallel:
        calls["maxItems"] = 1
    call_shape: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    required = named is not None or choice == "required"
    answer_shape = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    schema = call_shape if required else {"anyOf": [call_shape, answer_shape]}
    listing = json.dumps(
        [{"name": f.name, "description": f.description or "", "parameters": f.parameters} for f in offered],
        ensure_ascii=False,
    )
    if required:
        how = 'Answer with one JSON object that calls tools: {"tool_calls": [{"name": <tool name>, "arguments": {…}}]}.'
    else:
        how = (
            'Answer with one JSON object: {"tool_calls": [{"name": <tool name>, "arguments": {…}}]} to call tools, '
            'or {"response": "<your answer>"} to answer the user directly.'
        )
    system = f"You can call these tools (JSON schemas of their arguments):\n{listing}\n{how}"
    return ToolSetup(system=system, schema_=schema, required=required)


def _call_schema(function: FunctionDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
    }


def render_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages (with assistant `tool_calls` and `role: "tool"` results) as plain role/content messages in
    the generic format: a call is the assistant's JSON answer, a result a user turn holding a `tool_response`."""
    rendered: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                for c in message["tool_calls"]
            ]
            rendered.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
        elif role == "tool":
            result = {"tool_call_id": message.get("tool_call_id"), "content": content}
            rendered.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
        else:
            rendered.append({"role": "system" if role == "developer" else role, "content": content})
    return rendered


def _arguments(raw: Any) -> Any:
    """A call's `arguments` as JSON: OpenAI sends them as a JSON string."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw if raw is not None else {}


class ParsedAnswer(BaseModel):
    """A generic-format answer in OpenAI's terms: `content` or `tool_calls` (each `{"id", "type", "function":
    {"name", "arguments"}}` with `arguments` a JSON string)."""

    content: str | None
    tool_calls: list[dict[str, Any]] | None


def parse_answer(text: str, *, finished: bool) -> ParsedAnswer:
    """The model's JSON answer as content or tool calls. An answer cut short (`finished` False, or not JSON) is
    what a stream of it would have delivered (see `_cut_short`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _cut_short(text)
    if not finished or not isinstance(data, dict):
        return _cut_short(text)
    if isinstance(data.get("tool_calls"), list):
        calls = [
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {"name": c.get("name"), "arguments": json.dumps(c.get("arguments"), ensure_ascii=False)},
            }
            for c in data["tool_calls"]
            if isinstance(c, dict)
        ]
        return ParsedAnswer(content=None, tool_calls=calls)
    if isinstance(data.get("response"), str):
        return ParsedAnswer(content=data["response"], tool_calls=None)
    return ParsedAnswer(content=text, tool_calls=None)


def _cut_short(text: str) -> ParsedAnswer:
    """An answer cut short (by max_tokens) as its stream gives it: the text of a `{"response": "…` so far, or
    the calls whose names were made, their arguments as far as they got (as OpenAI gives a call cut by
    max_tokens); any other shape as its raw text, so that the client sees what was generated."""
    parser = ToolCallParser()
    content, deltas = parser.feed(text)
    if parser.streaming_text:
        return ParsedAnswer(content=content, tool_calls=None)
    if not parser.streaming_calls:
        return ParsedAnswer(content=text, tool_calls=None)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta["index"] not in calls:
            calls[delta["index"]] = {"id": delta["id"], "type": "function", "function": dict(delta["function"])}
        else:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return ParsedAnswer(content=None, tool_calls=[calls[i] for i in sorted(calls)] or None)


class ToolCallParser:
    """Streams a generic-format answer as it is generated, the way OpenAI streams: the text of a
    `{"response": "…"}` as it comes, and each call of a `{"tool_calls": [{"name": …, "arguments": …}]}` as soon as
    its name is known (a delta with its `id`, `type` and `name`), then its arguments' JSON text piece by piece
    (deltas whose `function.arguments` concatenate to it).

    `feed(piece)` returns the answer text now certain (escapes decoded) and the `delta.tool_calls` items now
    known; `finish()` the parsed answer. The grammar fixes the order `name`, then `arguments`; an answer in any
    other shape streams nothing and is parsed whole at the end.
    """

    _OPENING = re.compile(r'\s*\{\s*"response"\s*:\s*"')
    _CALLS = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
    _CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')
    _AFTER_CALL = re.compile(r"\s*\}\s*([,\]])")

    def __init__(self) -> None:
        self.raw = ""
        self._start: int | None = None  # where the response string's characters begin in `raw`
        self._sent = 0  # characters of the decoded string already given out
        self._at: int | None = None  # where the calls scanner reads `raw` next, once the answer is calls
        self._arguments: _ValueScanner | None = None  # the arguments being streamed
        self.calls = 0  # calls whose arguments are whole
        self.calls_complete = False  # the calls' array closed

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        self.raw += piece
        if self._start is None and self._at is None:
            if (match := self._OPENING.match(self.raw)) is not None:
                self._start = match.end()
            elif (match := self._CALLS.match(self.raw)) is not None:
                self._at = match.end()
            else:
                return "", []
        if self._at is not None:
            return "", self._scan_calls()
        assert self._start is not None
        decoded = _decode_partial_string(self.raw[self._start :])
        out = decoded[self._sent :]
        self._sent = len(decoded)
        return out, []

    @property
    def streaming_text(self) -> bool:
        """Whether the answer is a `response` whose text went out as it came."""
        return self._start is not None

    @property
    def streaming_calls(self) -> bool:
        """Whether the answer is tool calls, which go out as they come."""
        return self._at is not None

    def finish(self, *, finished: bool) -> ParsedAnswer:
        return parse_answer(self.raw, finished=finished)

    def _scan_calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while self._at is not None and not self.calls_complete:
            if self._arguments is None:
                match = self._CALL.match(self.raw, self._at)
                if match is None:
                    break
                name = json.loads(f'"{match[1]}"')
                deltas.append({"index": self.calls, "id": f"call_{secrets.token_hex(12)}", "type": "function",
                               "function": {"name": name, "arguments": ""}})  # fmt: skip
                self._arguments, self._at = _ValueScanner(), match.end()
            fragment, self._at = self._arguments.feed(self.raw, self._at)
            if fragment:
                deltas.append({"index": self.calls, "function": {"arguments": fragment}})
            if not self._arguments.done:
                break
            after = self._AFTER_CALL.match(self.raw, self._at)
            if after is None:
                break
            self._arguments, self.calls, self._at = None, self.calls + 1, after.end()
            self.calls_complete = after[1] == "]"
        return deltas


class _ValueScanner:
    """Finds where one JSON value ends in text that arrives piece by piece, giving out its text as it goes."""

    def __init__(self) -> None:
        self.started = False
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False  # a number, true, false or null: it ends at the first character not its own

    def feed(self, raw: str, at: int) -> tuple[str, int]:
        """The value's text in `raw` from `at` on (leading blanks skipped), and where scanning stopped."""
        begin = at
        while at < len(raw) and not self.done:
            c = raw[at]
            if not self.started:
                if c.isspace():
                    at += 1
                    begin = at
                    continue
                self.started = True
                self._scalar = c not in '{["'
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
                    self.done = self._depth == 0
            elif self._scalar:
                if c.isspace() or c in ",}]":
                    self.done = True
                    return raw[begin:at], at
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                self.done = self._depth == 0
            at += 1
        return raw[begin:at], at


def _decode_partial_string(body: str) -> str:
    """The characters of a JSON string body known so far: up to its closing quote, without a trailing partial
    escape."""
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == '"':
            break
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            break
        kind = body[i + 1]
        if kind == "u":
            if i + 6 > len(body):
                break
            try:
                code = int(body[i + 2 : i + 6], 16)
            except ValueError:
                break
            if 0xD800 <= code < 0xDC00:  # a surrogate pair: wait for its second half
                if i + 12 > len(body):
                    break
                try:
                    low = int(body[i + 8 : i + 12], 16)
                except ValueError:
                    break
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
                continue
            out.append(chr(code))
            i += 6
            continue
        out.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(kind, kind))
        i += 2
    return "".join(out)
