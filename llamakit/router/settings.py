"""Router settings, validated with bounds, read from flags with `LLAMAKIT_*` environment variables as defaults."""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from llamakit.config import Flag, parse_settings
from llamakit.logs import LogFormat
from llamakit.money.currency import (
    DEFAULT_CREDIT_VALUE,
    DEFAULT_CURRENCY,
    CreditValue,
    parse_credit_value,
    parse_currency,
)
from llamakit.money.fees import parse_discount
from llamakit.router.ledger import backend_of
from llamakit.server import SERVING_FLAGS, ServingSettings

__all__ = ["RouterSettings", "settings_from_args"]


class RouterSettings(ServingSettings):
    model_config = ConfigDict(frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    db: str = Field(
        "llamakit.db",
        description="the ledger: a SQLite file (a path or sqlite:///path; ':memory:' for none) "
        "or postgresql://user@host:port/dbname (password in PGPASSWORD or ~/.pgpass)",
    )
    admin_key: str = Field(
        default_factory=lambda: "lka-" + secrets.token_urlsafe(24), min_length=8, description="operator's key"
    )
    herd_token: str = Field(
        default_factory=lambda: secrets.token_urlsafe(24), min_length=8, description="shared secret of the herd"
    )
    nodes: list[str] = Field(default_factory=list, description="node URL to add statically (repeatable)")
    fees_file: Path | None = Field(None, description="JSON fee schedules per model ('*' is the default)")
    base_fee: int = Field(10, ge=0, description="default fee per request, in credits")
    prompt_token_fee: int = Field(1, ge=0, description="default fee per prompt token")
    completion_token_fee: int = Field(2, ge=0, description="default fee per completion token")
    cached_prompt_token_fee: int | None = Field(
        None, ge=0, description="default fee per prompt token a node read from its cache (default: the prompt fee)"
    )
    credit_value: Decimal = Field(
        DEFAULT_CREDIT_VALUE,
        description="what one credit is worth in --currency (default 0.000001: 1 credit per token reads as "
        "1 per million tokens); usage.cost is credits × this",
    )
    currency: str = Field(DEFAULT_CURRENCY, description="the ISO 4217 code of the operator's currency, such as USD")
    max_queue: int = Field(256, ge=0, description="requests that may wait per model before 429 queue_full")
    max_queue_share: float = Field(
        0.5, gt=0, le=1, description="the share of --max-queue that one account's waiting requests may take, per model"
    )
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait for a node before 504")
    node_timeout: float = Field(60.0, gt=0, description="seconds without a byte from a node before giving up on it")
    node_rest: float = Field(
        30.0, ge=0, description="seconds a node that let a request time out gets no work (doubles if it repeats)"
    )
    health_interval: float = Field(2.0, gt=0, description="seconds between health checks of each node")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens held for when a request gives none")
    max_tokens_limit: int = Field(32768, ge=1, description="largest max_tokens a request may ask for")
    max_attempts: int = Field(3, ge=1, le=10, description="nodes tried for one request before giving up")
    usage_log: Path | None = Field(None, description="JSONL file that gets one line per settled request")
    access_log: bool = Field(False, description="log every HTTP request (the usage log already has each one)")
    log_format: LogFormat = Field("text", description="text, or json: one JSON object per line (see docs/operating.md)")
    log_requests: bool = Field(
        False,
        description="log one line per finished paid request, with its usage record's fields (logger llamakit.requests)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the event loop: uvloop (libuv; about a fifth less CPU per request) or asyncio's own"
    )
    affinity: bool = Field(
        True, description="send a conversation's next turn to the node whose prompt cache likely holds its history"
    )

    checkpoint_tokens: int = Field(
        32,
        ge=0,
        description="a running stream notes in the ledger what it has delivered every this many tokens (or "
        "--checkpoint-ms, whichever first), so that a crash of the router leaves at most that uncharged; 0: never "
        "(a crash refunds streams in full); see docs/money.md#a-router-crash",
    )
    checkpoint_ms: float = Field(
        1000.0, gt=0, description="milliseconds between two checkpoints of a running stream, at most (see above)"
    )
    batch_discount: Decimal = Field(
        Decimal("0.5"),
        description="what a batch line pays of its price (0 < d <= 1; OpenAI's Batch API's half price is 0.5); "
        "batch lines run only on slots no interactive request waits for",
    )
    batch_max_lines: int = Field(50_000, ge=1, description="most lines (requests) in a batch's input file")
    batch_max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="largest batch input file, in bytes (each line: --max-body-bytes)"
    )

    audit_every: float = Field(
        3600.0,
        ge=0,
        description="seconds between audits of the books in the background (the first at start-up; 0: none); "
        "see docs/operating.md#the-audit",
    )

    cluster: bool = Field(
        False,
        description="share the queue, the slots and the herd with the other routers on the same PostgreSQL --db "
        "(see docs/scale-out.md)",
    )
    lease: float = Field(
        10.0, ge=0.5, le=3600, description="seconds a router's lease lasts (--cluster); renewed every third of it"
    )
    router_id: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="this router's name in the cluster (default: host:port); a router restarted under the "
        "same name releases at once what its earlier life left",
    )

    @model_validator(mode="after")
    def _cached_fee_at_most_the_prompt_fee(self) -> RouterSettings:
        if self.cached_prompt_token_fee is not None and self.cached_prompt_token_fee > self.prompt_token_fee:
            raise ValueError(
                f"--cached-prompt-token-fee ({self.cached_prompt_token_fee}) may not be above --prompt-token-fee "
                f"({self.prompt_token_fee}): a prompt token read from a cache costs at most a fresh one"
            )
        return self

    @model_validator(mode="after")
    def _cluster_needs_postgres(self) -> RouterSettings:
        if self.cluster and backend_of(self.db) != "postgres":
            raise ValueError("--cluster needs a PostgreSQL ledger: --db postgresql://user@host:port/dbname")
        return self

    @field_validator("batch_discount", mode="before")
    @classmethod
    def _batch_discount(cls, value: object) -> Decimal:
        return parse_discount(value)

    @field_validator("credit_value", mode="before")
    @classmethod
    def _credit_value(cls, value: object) -> Decimal:
        return parse_credit_value(value)

    @field_validator("currency", mode="before")
    @classmethod
    def _currency(cls, value: object) -> str:
        return parse_currency(value)

    @functools.cached_property
    def money(self) -> CreditValue:
        """What a credit is worth, in the operator's currency."""
        return CreditValue(self.credit_value, self.currency)

    @property
    def cluster_id(self) -> str:
        """This router's name in the cluster: `router_id`, else host:port (the host's name for 0.0.0.0)."""
        if self.router_id:
            return self.router_id
        return f"{self.reachable_host}:{self.port}"

    @property
    def reachable_host(self) -> str:
        """The host others reach this router at: `host`, or the machine's name when it listens on every
        address (0.0.0.0 or ::, which nobody can connect to)."""
        return socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host

    @field_validator("db", mode="before")
    @classmethod
    def _ledger_url(cls, value: object) -> object:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, str):
            backend_of(value)  # ValueError for a URL of another kind
        return value


def _yes(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    # argparse prints this message as it is (a ValueError would read "invalid _yes value").
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


FLAGS = [
    Flag("host", "--host", "LLAMAKIT_HOST"),
    Flag("port", "--port", "LLAMAKIT_PORT", int),
    Flag("db", "--db", "LLAMAKIT_DB"),
    Flag("admin_key", "--admin-key", "LLAMAKIT_ADMIN_KEY"),
    Flag("herd_token", "--herd-token", "LLAMAKIT_HERD_TOKEN"),
    Flag("nodes", "--node", "LLAMAKIT_NODES", repeat=True),
    Flag("fees_file", "--fees", "LLAMAKIT_FEES"),
    Flag("base_fee", "--base-fee", "LLAMAKIT_BASE_FEE", int),
    Flag("prompt_token_fee", "--prompt-token-fee", "LLAMAKIT_PROMPT_TOKEN_FEE", int),
    Flag("completion_token_fee", "--completion-token-fee", "LLAMAKIT_COMPLETION_TOKEN_FEE", int),
    Flag("cached_prompt_token_fee", "--cached-prompt-token-fee", "LLAMAKIT_CACHED_PROMPT_TOKEN_FEE", int),
    Flag("credit_value", "--credit-value", "LLAMAKIT_CREDIT_VALUE"),
    Flag("currency", "--currency", "LLAMAKIT_CURRENCY"),
    Flag("max_queue", "--max-queue", "LLAMAKIT_MAX_QUEUE", int),
    *SERVING_FLAGS,
    Flag("max_queue_share", "--max-queue-share", "LLAMAKIT_MAX_QUEUE_SHARE", float),
    Flag("queue_timeout", "--queue-timeout", "LLAMAKIT_QUEUE_TIMEOUT", float),
    Flag("node_timeout", "--node-timeout", "LLAMAKIT_NODE_TIMEOUT", float),
    Flag("node_rest", "--node-rest", "LLAMAKIT_NODE_REST", float),
    Flag("health_interval", "--health-interval", "LLAMAKIT_HEALTH_INTERVAL", float),
    Flag("default_max_tokens", "--default-max-tokens", "LLAMAKIT_DEFAULT_MAX_TOKENS", int),
    Flag("usage_log", "--usage-log", "LLAMAKIT_USAGE_LOG"),
    Flag("access_log", "--access-log", "LLAMAKIT_ACCESS_LOG", _yes),
    Flag("log_format", "--log-format", "LLAMAKIT_LOG_FORMAT"),
    Flag("log_requests", "--log-requests", "LLAMAKIT_LOG_REQUESTS", _yes),
    Flag("event_loop", "--loop", "LLAMAKIT_LOOP"),
    Flag("affinity", "--affinity", "LLAMAKIT_AFFINITY", _yes),
    Flag("batch_discount", "--batch-discount", "LLAMAKIT_BATCH_DISCOUNT"),
    Flag("batch_max_lines", "--batch-max-lines", "LLAMAKIT_BATCH_MAX_LINES", int),
    Flag("batch_max_file_bytes", "--batch-max-file-bytes", "LLAMAKIT_BATCH_MAX_FILE_BYTES", int),
    Flag("audit_every", "--audit-every", "LLAMAKIT_AUDIT_EVERY", float),
    Flag("checkpoint_tokens", "--checkpoint-tokens", "LLAMAKIT_CHECKPOINT_TOKENS", int),
    Flag("checkpoint_ms", "--checkpoint-ms", "LLAMAKIT_CHECKPOINT_MS", float),
    Flag("cluster", "--cluster", "LLAMAKIT_CLUSTER", _yes),
    Flag("lease", "--lease", "LLAMAKIT_LEASE", float),
    Flag("router_id", "--router-id", "LLAMAKIT_ROUTER_ID"),
]


def settings_from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RouterSettings:
    return parse_settings(
        RouterSettings,
        FLAGS,
        argv,
        env,
        prog="python -m llamakit.router",
        description="The llamakit router: prices, queues and settles requests for a herd of nodes.",
    )
