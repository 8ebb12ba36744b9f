"""The inbox that hands text from the generating threads to the node's event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from llamakit.node.loop_inbox import LoopInbox, one_wakeup_per_inbox


def counting_wakeups(loop: asyncio.AbstractEventLoop, inbox: LoopInbox) -> list[int]:
    """Count the inbox's `call_soon_threadsafe` calls on the loop (each one a write to its self-pipe)."""
    wakeups = [0]
    real = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        wakeups[0] += callback == inbox.run_posted
        return real(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counted  # type: ignore[assignment,method-assign]
    return wakeups


async def test_posts_from_a_thread_run_on_the_loop_in_order() -> None:
    loop = asyncio.get_running_loop()
    inbox, seen, on_loop = LoopInbox(loop), list[int](), list[bool]()

    def take(item: int) -> None:
        seen.append(item)
        on_loop.append(threading.current_thread() is threading.main_thread())

    def produce() -> None:
        for i in range(500):
            inbox.post(take, i)

    await asyncio.to_thread(produce)
    await asyncio.sleep(0.05)
    inbox.run_posted()
    assert seen == list(range(500))
    assert all(on_loop)


async def test_a_held_batch_wakes_the_loop_once_and_runs_at_the_end() -> None:
    loop = asyncio.get_running_loop()
    inbox, seen = LoopInbox(loop), list[int]()
    wakeups = counting_wakeups(loop, inbox)
    ran_inside: list[bool] = []

    def step() -> None:
        with one_wakeup_per_inbox():
            for i in range(8):
                inbox.post(seen.append, i)
            ran_inside.append(bool(seen))

    await asyncio.to_thread(step)
    await asyncio.sleep(0.05)
    assert seen == list(range(8))
    assert ran_inside == [False]
    assert wakeups[0] == 1


async def test_run_posted_takes_what_a_held_wakeup_has_not_yet_delivered() -> None:
    """A generation's end runs the inbox first, so its last text reaches the stream before the end does."""
    loop = asyncio.get_running_loop()
    inbox, seen = LoopInbox(loop), list[str]()
    with one_wakeup_per_inbox():
        inbox.post(seen.append, "last piece")
        inbox.run_posted()
        seen.append("end")
    assert seen == ["last piece", "end"]


async def test_a_failing_call_does_not_keep_the_others_from_running() -> None:
    inbox, seen = LoopInbox(asyncio.get_running_loop()), list[int]()

    def fail(_: object) -> None:
        raise ValueError("boom")

    inbox.post(seen.append, 1)
    inbox.post(fail, None)
    inbox.post(seen.append, 2)
    inbox.run_posted()
    assert seen == [1, 2]
