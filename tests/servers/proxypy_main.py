"""Runs proxy.py in a kit subprocess (not imported by tests): proxy.py's own
command line, plus the orphan guard.

Usage: ``python -m proxypy_main <proxy.py flags>``
"""

from __future__ import annotations

from orphan_guard import guard_parent  # type: ignore[import-not-found,unused-ignore]
from proxy.proxy import main

if __name__ == "__main__":
    # Before main(): proxy.py forks its workers there, into the same group.
    guard_parent()
    main()
