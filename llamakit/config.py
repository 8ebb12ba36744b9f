"""Settings from flags, then `LLAMAKIT_*` environment variables, then defaults, validated by a pydantic model."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["Flag", "parse_settings"]

S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A command-line flag for the settings field `field`, with its environment variable."""

    field: str
    flag: str
    env: str
    type: Callable[[str], Any] = str
    repeat: bool = False  # repeatable flag; the environment variable holds a comma-separated list


def parse_settings(
    model: type[S],
    flags: Sequence[Flag],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    prog: str,
    description: str,
) -> S:
    """Flags win over environment variables, which win over the defaults; invalid values exit with a message."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in flags:
        help_text = f"{model.model_fields[f.field].description or f.field} (env {f.env})"
        if f.repeat:
            parser.add_argument(f.flag, dest=f.field, type=f.type, action="append", default=None, help=help_text)
        else:
            parser.add_argument(f.flag, dest=f.field, type=f.type, default=None, help=help_text)
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for f in flags:
        value = getattr(args, f.field)
        if value is None and f.env in env:
            raw = env[f.env]
            value = [v.strip() for v in raw.split(",") if v.strip()] if f.repeat else raw
        if value is not None:
            values[f.field] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        names = {f.field: f.flag for f in flags}
        parser.error("; ".join(_problem(error["loc"], error["msg"], names) for error in exc.errors()))


def _problem(loc: tuple[int | str, ...], message: str, names: Mapping[str, str]) -> str:
    """One validation error as the command line says it: the flag, if it is one flag's (`--loop`, not the
    field `event_loop`), and pydantic's message without its "Value error, " prefix (a check of ours, already
    phrased for the operator)."""
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    return f"{names.get(str(loc[0]), loc[0])}{''.join(f'.{part}' for part in loc[1:])}: {message}"
