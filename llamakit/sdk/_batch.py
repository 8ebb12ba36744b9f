"""`generate_many`: a batch of prompts on a few threads, with a progress bar, as one DataFrame.

Threads rather than asyncio so it works the same in a script and inside a notebook's running loop.
tqdm draws the bar when it is installed; otherwise a one-line text counter does, with no new dependency.
"""

from __future__ import annotations

import contextvars
import importlib
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any, Protocol, TextIO, Unpack

from llamakit.sdk._calls import GenerateOptions
from llamakit.sdk._exceptions import LlamakitError
from llamakit.sdk._types import Messages
from llamakit.sdk._usage import FRAME_DTYPES, Meter, UsageRecord, usage_records_frame

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

    from llamakit.sdk._client import Client

__all__ = ["generate_many"]


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...
    def close(self) -> object: ...


class TextProgress:
    """A `\\r`-rewritten "label: done/total" line, at most ten times a second, for when tqdm is absent."""

    def __init__(self, total: int, label: str, file: TextIO | None = None) -> None:
        self.total = total
        self.label = label
        self.file = file if file is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self._draw()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown >= 0.1 or self.done >= self.total:
            self._draw()

    def _draw(self) -> None:
        self._shown = time.monotonic()
        percent = 100 * self.done // self.total if self.total else 100
        elapsed = self._shown - self.started
        self.file.write(f"\r{self.label}: {self.done}/{self.total} ({percent}%) {elapsed:.1f} s")
        self.file.flush()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, label: str, enabled: bool) -> Progress:
    if not enabled:
        return _NoProgress()
    try:
        tqdm_auto = importlib.import_module("tqdm.auto")
    except ImportError:
        return TextProgress(total, label)
    bar: Progress = tqdm_auto.tqdm(total=total, desc=label, unit="call")
    return bar


def _prompt_text(prompt: str | Messages) -> str:
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    return str(messages[-1].get("content", "")) if messages else ""


def generate_many(
    client: Client,
    prompts: Iterable[str | Messages],
    *,
    chat: bool = False,
    system: str | None = None,
    concurrency: int = 4,
    progress: bool = True,
    **options: Unpack[GenerateOptions],
) -> pd.DataFrame:
    """One row per prompt, in the order given: `prompt`, `text` (NA if the call failed) and its usage columns.

    Failures do not stop the batch (the row carries `status`, `error_type` and `error`); wrong arguments
    do, before anything is sent. For a chat, `prompt` shows the last message's content.
    """
    import pandas as pd

    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if options.get("idempotency_key") is not None:
        # One key for many prompts would make the router answer them all with the first one's result.
        raise ValueError("generate_many makes an idempotency key per prompt; do not pass idempotency_key")
    items = list(prompts)
    texts: list[str | None] = [None] * len(items)
    records: list[UsageRecord | None] = [None] * len(items)

    def one(index: int, prompt: str | Messages) -> None:
        # A meter per prompt picks out this call's record, failed or not; meters around the whole
        # batch still see it, because each worker runs in a copy of the caller's context.
        with Meter() as seen:
            try:
                if chat or not isinstance(prompt, str):
                    texts[index] = client.chat(prompt, system=system, **options).text
                else:
                    texts[index] = client.generate(prompt, **options).text
            except LlamakitError:
                pass
        records[index] = seen.records[-1] if seen.records else None

    bar = progress_bar(len(items), label="generate_many", enabled=progress)
    futures: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="llamakit-batch") as pool:
        try:
            for index, prompt in enumerate(items):
                futures.append(pool.submit(contextvars.copy_context().run, one, index, prompt))
            for future in as_completed(futures):
                future.result()  # re-raise what is not a call failure (a wrong argument, say)
                bar.update(1)
        except BaseException:
            # Ctrl-C in a notebook: do not go on to send the prompts that have not started.
            for future in futures:
                future.cancel()
            raise
        finally:
            bar.close()
    usage = usage_records_frame([r for r in records if r is not None])
    if len(usage) != len(items):  # only when a call raised before it was recorded, which re-raised above
        usage = usage.reindex(range(len(items)))
    frame: Any = pd.DataFrame(
        {
            "prompt": pd.Series([_prompt_text(p) for p in items], dtype="string"),
            "text": pd.Series(texts, dtype="string"),
        }
    )
    return pd.concat([frame, usage.reset_index(drop=True)[list(FRAME_DTYPES)]], axis=1)
