"""`python -m llamakit.node`: serve one GGUF model to the herd."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence

from llamakit.catalog import ModelNotAvailable, resolve_model
from llamakit.logs import configure_logging
from llamakit.node.settings import NodeSettings, settings_from_args
from llamakit.server import serve

# Node flags that llama-server's own flags decide for a llama-server the node fronts (but does not start).
_LLAMA_SERVER_DECIDES = (
    "engine", "slots", "threads", "n_ctx", "cache_ram", "prefill_chunk", "flash_attn", "cache_type_k",
    "cache_type_v", "gpu_layers", "main_gpu", "split_mode", "tensor_split", "llama_log",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(argv)
    configure_logging(settings.log_format)
    if settings.fronts_llama_server:
        _front_llama_server(settings, argv)
        return
    try:
        resolve_model(settings.model)  # fail here, with the reason, rather than after the server is up
    except ModelNotAvailable as exc:
        print(f"python -m llamakit.node: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from llamakit.node.app import create_app
    from llamakit.node.cores import available_cores, oversubscription, running_nodes

    warning = oversubscription(settings.threads, running_nodes(exclude=os.getpid()), available_cores())
    if warning is not None:
        logging.getLogger("llamakit.node").warning("%s", warning)

    if "LLAMAKIT_HERD_TOKEN" not in os.environ and not any(a.startswith("--herd-token") for a in argv):
        # Nobody else knows a generated token: print it once so the operator can give it to the router.
        print(f"herd token (generated): {settings.herd_token}", file=sys.stderr)
    try:
        app = create_app(settings)
    except ValueError as exc:  # OTEL_* variables asking for traces it cannot send
        print(f"python -m llamakit.node: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(
        app,
        host=settings.host,
        port=settings.port,
        program="python -m llamakit.node",
        started=f"llamakit node {settings.name!r} serving on http://{settings.host}:{settings.port}",
        limits=settings.request_limits,
    )


def _front_llama_server(settings: NodeSettings, argv: list[str]) -> None:
    """Serve the herd with llama.cpp's llama-server as the engine (docs/node.md, "Fronting llama-server")."""
    from llamakit.node.llama_server_app import create_app

    program = "python -m llamakit.node"
    if settings.llama_server_bin is not None:
        binary = shutil.which(settings.llama_server_bin)
        if binary is None:
            print(f"{program}: error: --llama-server-bin {settings.llama_server_bin}: no such program", file=sys.stderr)
            raise SystemExit(2)
        try:
            resolve_model(settings.model)
        except ModelNotAvailable as exc:
            print(f"{program}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        engine = f"supervising llama-server {binary}"
    else:
        ignored = [name for name in _LLAMA_SERVER_DECIDES if name in settings.model_fields_set]
        if ignored:
            logging.getLogger("llamakit.node").warning(
                "%s: llama-server's own flags decide these for the llama-server at %s; the node's are not used",
                ", ".join(ignored),
                settings.llama_server,
            )
        engine = f"fronting llama-server at {settings.llama_server}"
    if "LLAMAKIT_HERD_TOKEN" not in os.environ and not any(a.startswith("--herd-token") for a in argv):
        print(f"herd token (generated): {settings.herd_token}", file=sys.stderr)
    try:
        app = create_app(settings)
    except ValueError as exc:  # a flag after -- that the node gives llama-server itself
        print(f"{program}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(
        app,
        host=settings.host,
        port=settings.port,
        program=program,
        started=f"llamakit node {settings.name!r} serving on http://{settings.host}:{settings.port}, {engine}",
        limits=settings.request_limits,
    )


if __name__ == "__main__":
    main()
