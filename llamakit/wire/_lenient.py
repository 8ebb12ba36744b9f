"""The base of llamakit's request models: tolerant of fields it does not know, `null` as "not given", and strict
about JSON types (an integer is a JSON integer, a number a JSON number, a boolean a JSON boolean)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Lenient"]


class Lenient(BaseModel):
    """Ignores fields it does not know, and takes `null` as "not given": OpenAI's request schemas make almost
    every field nullable (`temperature`, `top_p`, `n`, `stream`, `stop`, …) and clients send `null` for them.

    Strict, as OpenAI is: `"max_tokens": "10"` or `true` is a 400, not 10 or 1 (a JSON integer is also a number,
    so `"temperature": 1` stays 1.0)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data
