"""Node settings, validated with bounds, read from flags with `LLAMAKIT_*` environment variables as defaults."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llamakit.catalog import DEFAULT_MODEL
from llamakit.config import Flag, parse_settings
from llamakit.node.cores import available_cores
from llamakit.server import RequestLimits

__all__ = ["NodeSettings", "settings_from_args"]


class NodeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="catalog name or path to a .gguf file")
    engine: Literal["batched", "simple"] = Field(
        "batched", description="batched: one context, continuous batching; simple: a llama-cpp-python Llama per slot"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8081, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    slots: int = Field(2, ge=1, le=64, description="requests served at once, one llama.cpp context each")
    threads: int = Field(
        default_factory=available_cores,
        ge=1,
        le=256,
        description="CPU threads per context",
    )
    n_ctx: int = Field(2048, ge=64, le=1 << 20, description="context size in tokens, per slot")
    cache_ram: int = Field(
        512,
        ge=0,
        le=1 << 20,
        description="batched engine: MiB of RAM for slot caches saved before a slot is reused, so a "
        "conversation's history survives other requests taking its slot (0: none)",
    )
    prefill_chunk: int = Field(
        64,
        ge=1,
        le=512,
        description="batched engine: prompt tokens fed per step while other requests stream (smaller: smoother "
        "streams while a long prompt arrives; larger: that prompt's first token sooner on fast hardware)",
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    herd_token: str = Field(
        default_factory=lambda: secrets.token_urlsafe(24),
        min_length=8,
        description="shared secret of the herd",
    )
    name: str = Field(default_factory=lambda: f"node-{secrets.token_hex(3)}", min_length=1, max_length=64)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")
    request_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds a client has to send a request's line and headers (408 after); its body gets as long "
        "again plus its size at --min-upload-rate",
    )
    min_upload_rate: int = Field(64 * 1024, ge=1, description="slowest rate a request body may arrive at, bytes/s")
    max_connections: int | None = Field(
        None, ge=1, description="client connections open at once (default: the limit of open files less a tenth)"
    )
    router: str | None = Field(None, description="router URL to join (POST /herd/join) and send heartbeats to")
    public_url: str | None = Field(None, description="URL the router should use for this node (default: host:port)")
    heartbeat_seconds: float = Field(5.0, gt=0, description="seconds between heartbeats to the router")
    llama_log: Literal["debug", "info", "warning", "error"] = Field(
        "warning", description="the least severe of llama.cpp's own log messages to show (logger 'llama.cpp')"
    )

    @property
    def request_limits(self) -> RequestLimits:
        """What a client may take to send a request, and the connections open at once (see llamakit.server)."""
        return RequestLimits(
            header_timeout=self.request_timeout,
            min_upload_rate=self.min_upload_rate,
            max_connections=self.max_connections,
        )

    @property
    def url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


FLAGS = [
    Flag("model", "--model", "LLAMAKIT_MODEL"),
    Flag("engine", "--engine", "LLAMAKIT_ENGINE"),
    Flag("host", "--host", "LLAMAKIT_HOST"),
    Flag("port", "--port", "LLAMAKIT_PORT", int),
    Flag("slots", "--slots", "LLAMAKIT_SLOTS", int),
    Flag("threads", "--threads", "LLAMAKIT_THREADS", int),
    Flag("n_ctx", "--ctx-size", "LLAMAKIT_CTX_SIZE", int),
    Flag("prefill_chunk", "--prefill-chunk", "LLAMAKIT_PREFILL_CHUNK", int),
    Flag("cache_ram", "--cache-ram", "LLAMAKIT_CACHE_RAM", int),
    Flag("default_max_tokens", "--default-max-tokens", "LLAMAKIT_DEFAULT_MAX_TOKENS", int),
    Flag("herd_token", "--herd-token", "LLAMAKIT_HERD_TOKEN"),
    Flag("name", "--name", "LLAMAKIT_NODE_NAME"),
    Flag("router", "--router", "LLAMAKIT_ROUTER"),
    Flag("public_url", "--public-url", "LLAMAKIT_PUBLIC_URL"),
    Flag("llama_log", "--llama-log", "LLAMAKIT_LLAMA_LOG"),
    Flag("request_timeout", "--request-timeout", "LLAMAKIT_REQUEST_TIMEOUT", float),
    Flag("min_upload_rate", "--min-upload-rate", "LLAMAKIT_MIN_UPLOAD_RATE", int),
    Flag("max_connections", "--max-connections", "LLAMAKIT_MAX_CONNECTIONS", int),
]


def settings_from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> NodeSettings:
    return parse_settings(
        NodeSettings, FLAGS, argv, env, prog="python -m llamakit.node", description="A llamakit inference node."
    )
