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


async def step_off_loop(steps: Generator[float, None, T], release: Callable[[T], object]) -> tuple[bool, Any]:
    """One step in a worker thread; a result nobody receives any more goes to `release`."""
    lock = threading.Lock()
    state: dict[str, Any] = {"cancelled": False, "result": None}

    def work() -> tuple[bool, Any]:
        result = step(steps)
        with lock:
            orphan = state["cancelled"]
            state["result"] = result
        if orphan and result[0]:
            release(result[1])
        return result

    try:
        return await asyncio.to_thread(work)
    except asyncio.CancelledError:
        with lock:
            state["cancelled"] = True
            result = state["result"]
        if result is not None and result[0]:  # finished, but never delivered
            threading.Thread(target=release, args=(result[1],), daemon=True).start()
        raise


async def run(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline, or in a worker thread when it may block."""
    if blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
