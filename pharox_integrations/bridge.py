"""The off-loop bridge: acquisition steps in a worker thread, safe against cancellation.

An acquisition is a generator of waits (`LeaseBroker._acquire_steps`): the sync form
sleeps between steps, the async form awaits `asyncio.sleep`, and a storage that blocks
runs each step in a worker thread.  Cancelling the awaiting task cannot stop that
thread, so a lease it obtains for a task that is gone is released, not lost.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def step(steps: Generator[float, None, T]) -> tuple[bool, Any]:
    """Advance an acquisition generator: (finished, wait or result).  StopIteration
    cannot cross a thread's future, so it is turned into a value here."""
    try:
        return False, next(steps)
    except StopIteration as done:
        return True, done.value


async def in_thread(fn: Callable[[], T], orphaned: Callable[[T], object]) -> T:
    """`fn()` in a worker thread, awaited.  Cancelling the awaiting task cannot stop the
    thread: a result that nobody receives any more goes to `orphaned` (from the worker
    thread when it finishes later, or from a new one when it was already in)."""
    lock = threading.Lock()
    state: dict[str, Any] = {"cancelled": False, "done": False, "result": None}

    def work() -> T:
        result = fn()
        with lock:
            state["done"], state["result"] = True, result
            orphan = state["cancelled"]
        if orphan:
            orphaned(result)
        return result

    try:
        return await asyncio.to_thread(work)
    except asyncio.CancelledError:
        with lock:
            state["cancelled"] = True
            done, result = state["done"], state["result"]
        if done:  # finished, but never delivered
            threading.Thread(target=orphaned, args=(result,), daemon=True).start()
        raise


async def step_off_loop(steps: Generator[float, None, T], release: Callable[[T], object]) -> tuple[bool, Any]:
    """One acquisition step in a worker thread; a lease nobody receives goes to `release`."""

    def orphaned(result: tuple[bool, Any]) -> None:
        if result[0]:
            release(result[1])

    return await in_thread(lambda: step(steps), orphaned)


async def run(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline, or in a worker thread when it may block."""
    if blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
