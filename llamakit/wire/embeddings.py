"""Wire types of `POST /v1/embeddings`, shared by the node and the router: the request, its bounds, the answer.

The shapes are OpenAI's (`CreateEmbeddingRequest` / `CreateEmbeddingResponse` in its API spec): `input` is a
string, a list of strings, a list of token ids or a list of token-id lists; `encoding_format` is `float` (JSON
numbers) or `base64` (the vector's little-endian float32 bytes, which the `openai` client asks for by default).
Every field llamakit does not act on is refused with a 400 that names it, never dropped.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from llamakit.wire.errors import ApiError
from llamakit.wire.numbers import Bid

__all__ = [
    "EMBEDDING_FIELDS",
    "MAX_EMBEDDING_INPUTS",
    "MAX_EMBEDDING_TOKENS",
    "TEXT_TOKEN_ALLOWANCE",
    "EmbeddingRequest",
    "Input",
    "embedding_body",
    "encode_vector",
    "parse_embedding_request",
    "validate_body",
]

MAX_EMBEDDING_INPUTS = 2048  # inputs per request, OpenAI's own limit
MAX_EMBEDDING_TOKENS = 16384  # tokens per request, all inputs together; a node embeds about 2,000 a second per core
# Tokens a tokenizer may add to a text beyond one per UTF-8 byte: BOS, EOS/SEP, SentencePiece's dummy prefix.
TEXT_TOKEN_ALLOWANCE = 4
TOKEN_ID_MAX = 2**31 - 1  # llama_token is an int32

# What a request may carry. `user` is OpenAI's end-user label (it changes no output); `bid` is llamakit's.
EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user", "bid"})

Input = str | list[int]


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`. `inputs` is `input` as a list: strings (embedded as plain text, a BOS added as the
    model's tokenizer does) and token-id lists (embedded as given)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)
    # Kept on the usage record, so bounded as for completions (`protocol.GenerationRequest.user`): a length limit
    # makes pydantic check the text too, which refuses a lone surrogate ("\ud800"), as no database stores one.
    user: str | None = Field(default=None, max_length=100)
    bid: Bid | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if not value:
            raise ValueError("the input is empty: give a text, texts or token ids")
        # A string or a flat list of token ids is one input.
        items: list[Any] = [value] if isinstance(value, str) or isinstance(value[0], int) else value
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs are allowed per request, got {len(items)}")
        ids = 0
        for i, item in enumerate(items):
            if len(item) == 0:
                raise ValueError(f"input {i} is empty; every input needs at least one character or token")
            if isinstance(item, list):
                ids += len(item)
                if any(not 0 <= t <= TOKEN_ID_MAX for t in item):
                    raise ValueError(f"input {i} holds a token id out of range: ids are 0 or more")
        if ids > MAX_EMBEDDING_TOKENS:
            raise ValueError(f"at most {MAX_EMBEDDING_TOKENS} tokens are allowed per request, got {ids} token ids")
        return value

    @property
    def inputs(self) -> list[Input]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [list(self.input)]
        return list(self.input)  # type: ignore[arg-type]

    def token_bound(self) -> int:
        """An upper bound on the tokens of all inputs, without a tokenizer (see `fees.prompt_token_bound`):
        exact for token ids, UTF-8 bytes plus TEXT_TOKEN_ALLOWANCE for a text."""
        return sum(
            len(item) if isinstance(item, list) else len(item.encode("utf-8", "surrogatepass")) + TEXT_TOKEN_ALLOWANCE
            for item in self.inputs
        )


def parse_embedding_request(data: dict[str, Any]) -> EmbeddingRequest:
    """Validate a parsed body; a 400 naming the field for anything unknown or wrong. `null` means "not given"."""
    data = {k: v for k, v in data.items() if v is not None}
    unknown = sorted(set(data) - EMBEDDING_FIELDS)
    if unknown:
        raise ApiError(
            400,
            f"{unknown[0]!r} is not supported on /v1/embeddings; the fields are {', '.join(sorted(EMBEDDING_FIELDS))}",
            param=unknown[0],
            code="unsupported_field",
        )
    if "input" not in data:
        raise ApiError(400, "'input' is required: a string, a list of strings or of token ids", param="input")
    return validate_body(EmbeddingRequest, data)


_Model = TypeVar("_Model", bound=BaseModel)


def validate_body(model: type[_Model], data: dict[str, Any]) -> _Model:
    """`model` from a parsed body, or a 400 that names the first field in error (as `protocol.validate_request`
    does for completions)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"invalid request: {param}: {message}", param=param, code="invalid_value") from exc


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return list(vector)


def embedding_body(
    *, model: str, vectors: Sequence[Sequence[float]], encoding_format: str, prompt_tokens: int
) -> dict[str, Any]:
    """OpenAI's `CreateEmbeddingResponse`: one `embedding` object per input, in input order, and the tokens read."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
