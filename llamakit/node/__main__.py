"""`python -m llamakit.node`: serve one GGUF model to the herd."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from llamakit.catalog import ModelNotAvailable, resolve_model
from llamakit.logs import configure_logging
from llamakit.node.settings import settings_from_args
from llamakit.server import serve


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(argv)
    configure_logging(settings.log_format)
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


if __name__ == "__main__":
    main()
