"""Calls handed from the node's generating threads to its event loop, with one wake-up per batch of them."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LoopInbox", "one_wakeup_per_inbox"]

log = logging.getLogger(__name__)

_holding = threading.local()  # .inboxes: the inboxes this thread posted to inside one_wakeup_per_inbox


@contextmanager
def one_wakeup_per_inbox() -> Iterator[None]:
    """Inside it, what this thread posts to any `LoopInbox` waits for the end of the block, which wakes each
    inbox's loop once: for a thread that hands over a batch of results at a time (the decode loop, one piece of
    text per stream per step)."""
    posted: set[LoopInbox] = set()
    _holding.inboxes = posted
    try:
        yield
    finally:
        _holding.inboxes = None
        for inbox in posted:
            inbox.wake()


class LoopInbox:
    """Calls from other threads to run on one event loop, in the order posted, with one wake-up of the loop for
    however many are posted before it gets to them.

    `loop.call_soon_threadsafe` writes to the loop's self-pipe on every call: a system call on the calling thread.
    The batched engine's decode loop hands each stream its text after every step, and every stream waits for that
    thread: with a write per stream that was about 1 % of the thread's time at 4 streams
    (`bench/node_throughput.py --cold`, sampled with py-spy); inside `one_wakeup_per_inbox` a step makes one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: collections.deque[tuple[Callable[[Any], object], Any]] = collections.deque()
        self._lock = threading.Lock()
        self._woken = False  # a drain is scheduled and has not yet begun taking calls

    def post(self, call: Callable[[Any], object], arg: Any) -> None:
        """Run `call(arg)` on the loop soon; from any thread. Dropped once the loop is closed."""
        self._calls.append((call, arg))
        posted = getattr(_holding, "inboxes", None)
        if posted is not None:
            posted.add(self)
        else:
            self.wake()

    def wake(self) -> None:
        """Have the loop run what was posted, unless it is about to."""
        with self._lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._loop.call_soon_threadsafe(self.run_posted)
        except RuntimeError:  # the loop is closed: nobody is left to hand the call to
            self._calls.clear()

    def run_posted(self) -> None:
        """Run every call posted so far, in order; on the loop's thread. A generation's end runs it before it
        ends the stream: its last text may still wait here, behind a wake-up held by `one_wakeup_per_inbox`."""
        # Cleared before taking calls: a call posted from now on either is taken below or schedules a drain.
        with self._lock:
            self._woken = False
        calls = self._calls
        while calls:
            call, arg = calls.popleft()
            try:
                call(arg)
            except Exception:  # one failed hand-over must not keep the others' text from their streams
                log.exception("a call handed to the event loop failed")
