"""Running a coroutine from a test, whatever loop pytest-twisted runs in the main thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


def run_in_fresh_loop(coro: Any) -> Any:
    """asyncio.run in a thread of its own: pytest-twisted may run an asyncio loop in the
    main thread (Scrapy's tests install the asyncio reactor), where asyncio.run refuses."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
