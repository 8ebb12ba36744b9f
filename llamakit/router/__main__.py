"""`python -m llamakit.router`: run the router in the foreground."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from llamakit.logs import configure_logging
from llamakit.router.app import create_app
from llamakit.router.ledger import LedgerError, redacted
from llamakit.router.paid.record import REQUEST_LOG
from llamakit.router.settings import settings_from_args
from llamakit.server import serve


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of `kind`: "uvloop" (libuv's, where uvloop is installed: the router's HTTP, its node
    client and its thread hand-offs cost about a fifth less CPU per request) or "asyncio" (the standard one)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # a platform without uvloop (Windows): the standard loop does the same work
            logging.getLogger(__name__).warning("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = settings_from_args(argv)
    configure_logging(settings.log_format)
    REQUEST_LOG.setLevel(logging.INFO if settings.log_requests else logging.WARNING)
    try:
        app = create_app(settings)
    except ValueError as exc:  # an unreadable fee file, or OTEL_* variables asking for traces it cannot send
        print(f"python -m llamakit.router: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for flag, env, what, value in (
        ("--admin-key", "LLAMAKIT_ADMIN_KEY", "admin key", settings.admin_key),
        ("--herd-token", "LLAMAKIT_HERD_TOKEN", "herd token", settings.herd_token),
    ):
        if env not in os.environ and not any(a.startswith(flag) for a in argv):
            # Nobody else knows a generated secret: print it once, to the operator's terminal only.
            print(f"{what} (generated): {value}", file=sys.stderr)
    started = (
        f"llamakit router on http://{settings.host}:{settings.port} (ledger {redacted(settings.db)}, "
        f"{settings.event_loop} event loop)"
    )
    # The access log costs a tenth of the router's time per request; the usage log already has each one.
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    serve(
        app,
        host=settings.host,
        port=settings.port,
        program="python -m llamakit.router",
        started=started,
        limits=settings.request_limits,
        # The database cannot be reached, its schema is newer than this llamakit, or another router has it.
        refusals=(LedgerError,),
        access_log=access_log,
        loop=new_event_loop(settings.event_loop),
    )


if __name__ == "__main__":
    main()
