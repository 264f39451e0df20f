"""Kit proxies die with the test run that started them (used inside the proxy
subprocesses, not by tests).

Each proxy runs in its own session so that a test can signal it alone; the flip
side is that nothing kills it if pytest itself is killed (a hard timeout, a
crash). This guard notices the parent going away and ends the proxy's own
process group.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def guard_parent(interval: float = 0.5) -> None:
    """Start a daemon thread that kills this process group once the parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="kit-orphan-guard", daemon=True).start()
