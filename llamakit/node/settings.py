"""Node settings, validated with bounds, read from flags with `LLAMAKIT_*` environment variables as defaults."""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamakit.catalog import DEFAULT_MODEL

__all__ = ["NodeSettings", "settings_from_args"]


class NodeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="catalog name or path to a .gguf file")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8081, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    slots: int = Field(2, ge=1, le=64, description="requests served at once, one llama.cpp context each")
    threads: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1),
        ge=1,
        le=256,
        description="CPU threads per context",
    )
    n_ctx: int = Field(2048, ge=64, le=1 << 20, description="context size in tokens, per slot")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    herd_token: str = Field(
        default_factory=lambda: secrets.token_urlsafe(24),
        min_length=8,
        description="shared secret of the herd",
    )
    name: str = Field(default_factory=lambda: f"node-{secrets.token_hex(3)}", min_length=1, max_length=64)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")


_FLAGS: dict[str, tuple[str, type]] = {
    "model": ("LLAMAKIT_MODEL", str),
    "host": ("LLAMAKIT_HOST", str),
    "port": ("LLAMAKIT_PORT", int),
    "slots": ("LLAMAKIT_SLOTS", int),
    "threads": ("LLAMAKIT_THREADS", int),
    "n_ctx": ("LLAMAKIT_CTX_SIZE", int),
    "default_max_tokens": ("LLAMAKIT_DEFAULT_MAX_TOKENS", int),
    "herd_token": ("LLAMAKIT_HERD_TOKEN", str),
    "name": ("LLAMAKIT_NODE_NAME", str),
}


def settings_from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> NodeSettings:
    """Flags win over environment variables, which win over the defaults; invalid values exit with a message."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="python -m llamakit.node", description="A llamakit inference node.")
    for name, (var, kind) in _FLAGS.items():
        field = NodeSettings.model_fields[name]
        flag = "--ctx-size" if name == "n_ctx" else "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"{field.description} (env {var})")
    args = parser.parse_args(argv)
    values: dict[str, object] = {}
    for name, (var, _kind) in _FLAGS.items():
        value = getattr(args, name)
        if value is None and var in env:
            value = env[var]
        if value is not None:
            values[name] = value
    try:
        return NodeSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(problems)
