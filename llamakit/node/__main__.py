"""`python -m llamakit.node`: serve one GGUF model to the herd."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from llamakit.node.settings import settings_from_args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(argv)
    from llamakit.node.app import create_app

    print(f"llamakit node {settings.name!r} on http://{settings.host}:{settings.port}", file=sys.stderr)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None)


if __name__ == "__main__":
    main()
