"""A chat's prompt tokens, with the template's markup as control tokens and the messages' text as plain text.

Rendering a chat template to one string and tokenizing it with special tokens parsed (what llama-cpp-python
and llama-server do) turns a user's typed `<|im_end|>` into the real end-of-turn token: the user can close its
own turn and write a system turn. Here every message's text is swapped for a unique marker, the template is
rendered around the markers, and the pieces are tokenized apart: the template's pieces with special tokens
parsed, the messages' text without.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Protocol

from llamakit.node.errors import ControlTokenInText, TemplateRefused

__all__ = ["chat_tokens"]


class Tokenize(Protocol):
    def __call__(self, text: str, *, bos: bool, special: bool) -> list[int]: ...


Render = Callable[..., object]  # a chat template: `render(messages=[...])` gives an object with `.prompt`


def chat_tokens(
    render: Render,
    messages: Sequence[dict[str, str]],
    tokenize: Tokenize,
    is_control: Callable[[int], bool],
) -> list[int]:
    """Prompt tokens for `messages` (dicts with `role` and `content`) under the chat template `render`.

    Raises TemplateRefused when the template refuses the messages, ControlTokenInText when a template transforms
    message text in a way the markers cannot follow and the text spells out a control token.
    """
    original = _render(render, list(messages))
    nonce = secrets.token_hex(8)
    marked = [{**m, "content": f"\ue000{nonce}.{i}\ue001"} for i, m in enumerate(messages)]
    template = _render(render, marked)
    pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", template)
    # pieces alternate: markup, message index, markup, …, markup
    markup, indices = pieces[0::2], [int(i) for i in pieces[1::2]]
    for transform in (_same, _trimmed):
        texts = [transform(messages[i]["content"]) for i in indices]
        if "".join(m + t for m, t in zip(markup, [*texts, ""], strict=True)) == original:
            tokens: list[int] = []
            for piece, text in zip(markup, [*texts, None], strict=True):
                if piece:
                    tokens += tokenize(piece, bos=False, special=True)
                if text:
                    tokens += tokenize(text, bos=False, special=False)
            return tokens
    # The template changed the text in some other way (truncated it, say): the whole rendering is tokenized as it
    # is, which is safe only while no message spells out a control token.
    for message in messages:
        found = [t for t in tokenize(message["content"], bos=False, special=True) if is_control(t)]
        if found:
            raise ControlTokenInText(
                "a message's text spells out one of the model's control tokens, which its chat template would "
                "turn into real markup; remove it",
                param="messages",
            )
    return tokenize(original, bos=False, special=True)


def _render(render: Render, messages: list[dict[str, str]]) -> str:
    try:
        result = render(messages=messages)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception()
        raise TemplateRefused(f"the model's chat template refused these messages: {exc}", param="messages") from exc
    prompt = getattr(result, "prompt", result)
    return prompt if isinstance(prompt, str) else str(prompt)


def _same(text: str) -> str:
    return text


def _trimmed(text: str) -> str:  # Gemma's templates write `message['content'] | trim`
    return text.strip()
