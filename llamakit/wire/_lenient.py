"""The base of llamakit's request models: tolerant of fields it does not know, and `null` as "not given"."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Lenient"]


class Lenient(BaseModel):
    """Ignores fields it does not know, and takes `null` as "not given": OpenAI's request schemas make almost
    every field nullable (`temperature`, `top_p`, `n`, `stream`, `stop`, …) and clients send `null` for them."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data
