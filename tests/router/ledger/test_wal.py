"""The SQLite ledger's WAL stays bounded under sustained writes, with readers about: it is reset, not left to grow."""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import suppress
from pathlib import Path

from llamakit.router.ledger import ledger_at
from llamakit.router.ledger._sqlite import WAL_RESET_BYTES, SqliteLedger

MIB = 1024 * 1024


class LargestFile:
    """The largest size a file reaches, sampled in a thread every few milliseconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            with suppress(OSError):
                self.largest = max(self.largest, os.stat(self.path).st_size)

    def __enter__(self) -> LargestFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wal_left(path: Path) -> int:
    try:
        return os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        return 0


async def test_the_wal_stays_under_its_bound_under_sustained_writes_and_audits(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    requests = 0
    with LargestFile(Path(f"{path}-wal")) as wal:
        async with ledger_at(path) as ledger:
            assert isinstance(ledger, SqliteLedger)
            account = await ledger.create_account("busy")
            await ledger.deposit(account.id, 10**12)
            stop = asyncio.Event()

            async def auditor() -> None:  # a reader now and then, as the router's scheduled audit is
                while not stop.is_set():
                    assert (await ledger.audit()).ok
                    await asyncio.sleep(0.05)

            async def dashboard() -> None:  # and the reads a dashboard makes
                while not stop.is_set():
                    await ledger.totals()
                    await ledger.top_accounts()
                    await asyncio.sleep(0.01)

            readers = [asyncio.create_task(auditor()), asyncio.create_task(dashboard())]
            # Small batches, as a router at concurrency 8 makes them: every commit rewrites its pages, so the WAL
            # grows by kilobytes a request. Until it has been filled and reset a few times over.
            while ledger.wal_resets < 4:
                ids = [f"r{requests + i}" for i in range(8)]
                await asyncio.gather(*(ledger.hold(account.id, 100, request_id=r, model="m") for r in ids))
                await asyncio.gather(
                    *(ledger.settle(r, charge=7, node="n", prompt_tokens=1, completion_tokens=1) for r in ids)
                )
                requests += len(ids)
            stop.set()
            await asyncio.gather(*readers)
            assert (await ledger.books()).charges == 7 * requests
            assert (await ledger.audit()).ok
    # Written: at least four times WAL_RESET_BYTES; on disk at any moment: far less.
    assert wal.largest > WAL_RESET_BYTES // 2
    assert wal.largest < 64 * MIB, f"the WAL reached {wal.largest / MIB:.1f} MiB after {requests} requests"
    assert wal_left(path) == 0  # folded in at close
