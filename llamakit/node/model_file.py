"""The loaded model's file, watched: a node whose model file goes away (deleted, its disk unmounted or failing)
keeps serving from the memory it was loaded into for as long as it can, but could not load it again (a restart,
a swap back): its /health says so (`model_file`) and its log says it once, and once more when the file is back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from llamakit.node.host import ModelHost
from llamakit.outage import Outage

__all__ = ["watch_model_file"]

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0


def _readable(path: Path) -> None:
    with path.open("rb") as file:  # OSError when it is gone or cannot be read
        file.read(1)


async def watch_model_file(host: ModelHost, *, every: float | None = None) -> None:
    """Check the loaded model's file every `every` seconds (CHECK_SECONDS), setting `host.file_error` (None while
    it is there). A check that hangs (a disk that does not answer) counts as failed; no second one starts
    meanwhile."""
    every = CHECK_SECONDS if every is None else every
    outage: Outage | None = None
    check: asyncio.Future[None] | None = None
    while True:
        model = host.model
        if model is not None:
            path = Path(model.path)
            if outage is None or outage.what != f"the model file {path}":
                outage = Outage(log, f"the model file {path}", cost="checks failed")
            if check is None or check.done():
                check = asyncio.ensure_future(asyncio.to_thread(_readable, path))
            try:
                await asyncio.wait_for(asyncio.shield(check), timeout=every)
            except (OSError, TimeoutError) as exc:
                reason = str(exc) or f"it did not answer within {every:g} s"
                host.file_error = f"{path}: {reason}"
                outage.failed(reason, consequence="this node serves from memory while it can, but cannot load "
                                                  "the model again; its /health says so")  # fmt: skip
                outage.count()
            else:
                host.file_error = None
                outage.ended()
        await asyncio.sleep(every)
