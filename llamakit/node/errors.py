"""What goes wrong on a node, in its own words: the exceptions the engine, the model host, the chat tokenizer and
the embedder raise. None of them knows HTTP; the route layer's one table (`node.http_errors.http_error`) turns each
into its status and OpenAI error body.

    NodeError                      message, and `param`: the request field at fault (None: none in particular)
     ├── RequestRefused            the request cannot be served as it is (400): what to change is in the message
     │    ├── EmptyPrompt          the prompt has no token to continue from
     │    ├── ContextOverflow      prompt (+ max_tokens), or an embedding input, longer than the context
     │    ├── TooManyTokens        embedding inputs longer together than a request may be
     │    ├── BadGrammar           the client's GBNF grammar cannot be used
     │    ├── BadSchema            a JSON schema (response_format, a tool's parameters) makes no usable grammar
     │    ├── TemplateRefused      the model's chat template raised on the messages
     │    ├── ControlTokenInText   a message spells out a control token the template would turn into markup
     │    ├── BiasOutsideVocabulary  logit_bias names a token id the vocabulary does not have
     │    ├── TokenOutsideVocabulary an embedding input holds a token id the vocabulary does not have
     │    └── DimensionsMismatch   `dimensions` asks for vectors of another size than the model makes
     ├── ModelNotServed            the request names a model other than the one this node serves
     ├── AlreadyLoading            a swap was asked for while another model still loads
     ├── NoModel                   no model to serve: none loaded, its load failed, or its context was closed
     ├── StillLoading              the model did not finish loading within the host's wait
     └── SlotsBusy                 every slot of the model generates now

`code` is the error code a client sees (None: only the type); an unknown model name is the catalog's own
`ModelNotAvailable`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyLoading",
    "BadGrammar",
    "BadSchema",
    "BiasOutsideVocabulary",
    "ContextOverflow",
    "ControlTokenInText",
    "DimensionsMismatch",
    "EmptyPrompt",
    "ModelNotServed",
    "NoModel",
    "NodeError",
    "RequestRefused",
    "SlotsBusy",
    "StillLoading",
    "TemplateRefused",
    "TokenOutsideVocabulary",
    "TooManyTokens",
]


class NodeError(Exception):
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class RequestRefused(NodeError):
    pass


class EmptyPrompt(RequestRefused):
    pass


class ContextOverflow(RequestRefused):
    code = "context_length_exceeded"


class TooManyTokens(RequestRefused):
    code = "too_many_tokens"


class BadGrammar(RequestRefused):
    code = "invalid_grammar"


class BadSchema(RequestRefused):
    code = "invalid_schema"


class TemplateRefused(RequestRefused):
    pass


class ControlTokenInText(RequestRefused):
    code = "invalid_value"


class BiasOutsideVocabulary(RequestRefused):
    code = "invalid_value"


class TokenOutsideVocabulary(RequestRefused):
    code = "invalid_token"


class DimensionsMismatch(RequestRefused):
    code = "unsupported_value"


class ModelNotServed(NodeError):
    code = "model_not_found"


class AlreadyLoading(NodeError):
    code = "busy"


class NoModel(NodeError):
    code = "model_error"


class StillLoading(NodeError):
    code = "loading"


class SlotsBusy(NodeError):
    code = "slots_busy"
