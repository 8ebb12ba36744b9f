"""Node settings, validated with bounds, read from flags with `LLAMAKIT_*` environment variables as defaults."""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from llamakit.catalog import DEFAULT_MODEL
from llamakit.config import Flag, parse_settings
from llamakit.logs import LogFormat
from llamakit.node.cores import available_cores
from llamakit.server import SERVING_FLAGS, ServingSettings

__all__ = ["CACHE_TYPES", "CacheType", "NodeSettings", "settings_from_args"]

# llama-server's --cache-type-k/-v values (common/arg.cpp's kv_cache_types), most precise first.
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
CACHE_TYPES: tuple[str, ...] = get_args(CacheType)


class NodeSettings(ServingSettings):
    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="catalog name or path to a .gguf file")
    engine: Literal["batched", "simple"] = Field(
        "batched", description="batched: one context, continuous batching; simple: a llama-cpp-python Llama per slot"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8081, ge=0, le=65535, description="port to listen on (0 picks a free one)")
    slots: int = Field(
        2,
        ge=1,
        le=64,
        description="requests served at once: a sequence each of one llama.cpp context (batched), a context each",
    )
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
    router: str | None = Field(None, description="router URL to join (POST /herd/join) and send heartbeats to")
    public_url: str | None = Field(None, description="URL the router should use for this node (default: host:port)")
    heartbeat_seconds: float = Field(5.0, gt=0, description="seconds between heartbeats to the router")
    log_format: LogFormat = Field("text", description="text, or json: one JSON object per line (see docs/operating.md)")
    llama_log: Literal["debug", "info", "warning", "error"] = Field(
        "warning", description="the least severe of llama.cpp's own log messages to show (logger 'llama.cpp')"
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto",
        description="flash attention, as llama-server's --flash-attn: auto lets llama.cpp choose (on wherever the "
        "device of every layer runs it, so always on a CPU)",
    )
    cache_type_k: CacheType = Field(
        "f16", description=f"KV cache type of the keys, as llama-server's --cache-type-k: {', '.join(CACHE_TYPES)}"
    )
    cache_type_v: CacheType = Field(
        "f16",
        description="KV cache type of the values, as llama-server's --cache-type-v; a quantized one needs flash "
        "attention",
    )
    gpu_layers: int | Literal["all"] = Field(
        "all",
        description="layers to offload to the GPU, a number or all (llama-server's --gpu-layers); a llama.cpp "
        "built without a GPU backend offloads none",
    )
    main_gpu: int = Field(0, ge=0, description="the GPU of the whole model with --split-mode none (llama.cpp's index)")
    split_mode: Literal["none", "layer", "row"] = Field(
        "layer", description="how to split the model across GPUs: none (one GPU), layer (default), row"
    )
    tensor_split: tuple[float, ...] | None = Field(
        None, description="the share of the model per GPU, comma-separated, e.g. 3,1 (default: by free memory)"
    )
    # llama.cpp's own server as the engine (docs/node.md, "Fronting llama-server"): one running at a URL, or one
    # this node starts from a binary and keeps running.
    llama_server: str | None = Field(
        None,
        description="front the llama.cpp llama-server running at this URL instead of loading a model (--model "
        "then only names its model); start it with --api-key or on a loopback address",
    )
    llama_server_bin: str | None = Field(
        None,
        description="start llama.cpp's llama-server from this binary on a loopback port, serving --model with "
        "--slots, --ctx-size, --threads and the GPU and KV cache flags, restart it if it dies, stop it with the "
        "node; more llama-server flags go after --",
    )
    llama_server_api_key: str | None = Field(
        None, min_length=1, description="the --api-key of the llama-server given by --llama-server"
    )
    llama_server_args: tuple[str, ...] = Field(
        (), description="more llama-server flags for --llama-server-bin (what follows -- on the command line)"
    )

    @field_validator("gpu_layers", mode="before")
    @classmethod
    def _layers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "all":
            return "all"
        if isinstance(value, str) and value.strip().isdecimal():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError(f"give a number of layers (0 or more) or all; got {value!r}")

    @field_validator("tensor_split", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(float(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"expected comma-separated numbers, one per GPU, such as 3,1; got {value!r}") from None
        return value

    @field_validator("tensor_split")
    @classmethod
    def _split_shares(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (not value or any(v < 0 for v in value) or not any(v > 0 for v in value)):
            raise ValueError("give a share of zero or more per GPU, at least one of them above zero, such as 3,1")
        return value

    @field_validator("llama_server")
    @classmethod
    def _llama_server_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"give the llama-server's URL, such as http://127.0.0.1:8080; got {value!r}")
        return value.rstrip("/") if value is not None else None

    @field_validator("llama_server_args", mode="before")
    @classmethod
    def _split_args(cls, value: object) -> object:
        return tuple(shlex.split(value)) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_llama_server(self) -> NodeSettings:
        if self.llama_server is not None and self.llama_server_bin is not None:
            raise ValueError(
                "give --llama-server (a running llama-server to front) or --llama-server-bin (one to start), not both"
            )
        if self.llama_server_args and self.llama_server_bin is None:
            raise ValueError(
                "llama-server flags after -- need --llama-server-bin: they are for the llama-server it starts"
            )
        if self.llama_server_api_key is not None and self.llama_server is None:
            raise ValueError("--llama-server-api-key is the key of the llama-server given by --llama-server")
        return self

    @property
    def fronts_llama_server(self) -> bool:
        """Whether llama.cpp's llama-server does the inference (running at a URL, or started by this node)."""
        return self.llama_server is not None or self.llama_server_bin is not None

    @model_validator(mode="after")
    def _quantized_values_need_flash_attention(self) -> NodeSettings:
        if self.flash_attn == "off" and self.cache_type_v not in ("f32", "f16", "bf16"):
            raise ValueError(
                f"--cache-type-v {self.cache_type_v} needs flash attention: llama.cpp keeps quantized values only "
                "with it; use --flash-attn auto or on, or --cache-type-v f16"
            )
        return self

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
    Flag("flash_attn", "--flash-attn", "LLAMAKIT_FLASH_ATTN"),
    Flag("cache_type_k", "--cache-type-k", "LLAMAKIT_CACHE_TYPE_K"),
    Flag("cache_type_v", "--cache-type-v", "LLAMAKIT_CACHE_TYPE_V"),
    Flag("gpu_layers", "--gpu-layers", "LLAMAKIT_GPU_LAYERS"),
    Flag("main_gpu", "--main-gpu", "LLAMAKIT_MAIN_GPU", int),
    Flag("split_mode", "--split-mode", "LLAMAKIT_SPLIT_MODE"),
    Flag("tensor_split", "--tensor-split", "LLAMAKIT_TENSOR_SPLIT"),
    Flag("llama_server", "--llama-server", "LLAMAKIT_LLAMA_SERVER"),
    Flag("llama_server_bin", "--llama-server-bin", "LLAMAKIT_LLAMA_SERVER_BIN"),
    Flag("llama_server_api_key", "--llama-server-api-key", "LLAMAKIT_LLAMA_SERVER_API_KEY"),
    Flag("log_format", "--log-format", "LLAMAKIT_LOG_FORMAT"),
    *SERVING_FLAGS,
]


def settings_from_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> NodeSettings:
    """The node's settings from `argv` (default: the command line); what follows `--` is llama-server's flags
    (`llama_server_args`, else LLAMAKIT_LLAMA_SERVER_ARGS split as a shell would)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    server_args: tuple[str, ...] | None = None
    if "--" in argv:
        at = argv.index("--")
        argv, server_args = argv[:at], tuple(argv[at + 1 :])
    elif env.get("LLAMAKIT_LLAMA_SERVER_ARGS"):
        server_args = tuple(shlex.split(env["LLAMAKIT_LLAMA_SERVER_ARGS"]))
    settings = parse_settings(
        NodeSettings,
        FLAGS,
        argv,
        env,
        prog="python -m llamakit.node",
        description="A llamakit inference node: llama-cpp-python in this process, or llama.cpp's own llama-server "
        "behind it (--llama-server URL, or --llama-server-bin PATH --model FILE [-- llama-server flags]).",
    )
    if server_args is None:
        return settings
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    try:
        return NodeSettings.model_validate({**values, "llama_server_args": server_args})
    except ValidationError as exc:
        print(
            f"python -m llamakit.node: error: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr
        )
        raise SystemExit(2) from None
