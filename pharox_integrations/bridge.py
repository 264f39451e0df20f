"""The off-loop bridge: acquisition steps in a worker thread, safe against cancellation.

An acquisition is a generator of waits (`Selection.waits`): the sync form sleeps between
steps, an event loop awaits its `Waiter`'s sleep (asyncio's here, Twisted's in
`scrapy_support`), and a storage that blocks runs each step in a worker thread.
Cancelling the awaiting task cannot stop that thread, so a lease it obtains for a task
that is gone is released, not lost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Waiter(Protocol):
    """How an event loop waits between acquisition steps and runs a blocking call off
    itself; `orphaned` gets a result whose awaiting task was cancelled meanwhile."""

    def sleep(self, seconds: float) -> Awaitable[object]: ...

    def in_thread(self, fn: Callable[[], T], orphaned: Callable[[T], object]) -> Awaitable[T]: ...


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


class _Asyncio:
    """asyncio's `Waiter`."""

    @staticmethod
    def sleep(seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)

    @staticmethod
    def in_thread(fn: Callable[[], T], orphaned: Callable[[T], object]) -> Awaitable[T]:
        return in_thread(fn, orphaned)


ASYNCIO: Waiter = _Asyncio()


async def step_off_loop(
    steps: Generator[float, None, T], release: Callable[[T], object], waiter: Waiter = ASYNCIO
) -> tuple[bool, Any]:
    """One acquisition step in a worker thread; a lease nobody receives goes to `release`."""

    def orphaned(result: tuple[bool, Any]) -> None:
        if result[0]:
            release(result[1])

    return await waiter.in_thread(lambda: step(steps), orphaned)


async def run(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` inline, or in a worker thread when it may block."""
    if blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


class Claim:
    """Upkeep an event loop found due (a refresh, a revival scan), left to the first
    request that finds it: that one goes off the loop and does it, the requests after
    it stay on the loop.  Should the first never do it, the claim lapses after `seconds`
    and the next request takes it.  Without this, every request of a busy loop went off
    the loop until a worker thread got round to the work."""

    __slots__ = ("_until", "seconds")

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds
        self._until = 0.0

    def take(self) -> bool:
        """True for the request that goes off the loop to do the work, False meanwhile."""
        now = time.monotonic()
        if now < self._until:
            return False
        self._until = now + self.seconds
        return True
