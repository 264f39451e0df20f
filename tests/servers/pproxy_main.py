"""Runs one pproxy listener in a kit subprocess (not imported by tests).

pproxy's own command line installs uvloop whenever it is importable, and with
uvloop 0.22+ its ``asyncio.get_event_loop()`` call fails at start-up. This
launcher uses pproxy's documented library API (``pproxy.Server(uri)`` then
``start_server(args)``) on the standard asyncio loop instead, and prints one
line the kit waits for once the socket listens.

Usage: ``python -m pproxy_main <listen-uri>``
"""

from __future__ import annotations

import asyncio
import sys

import pproxy
from orphan_guard import guard_parent  # type: ignore[import-not-found,unused-ignore]


async def _serve(uri: str) -> None:
    server = pproxy.Server(uri)
    # authtime=-1: pproxy otherwise trusts a client IP for 30 days after one good
    # login, and every test client is 127.0.0.1.
    listener = await server.start_server({"rserver": [], "authtime": -1})
    for sock in listener.sockets:
        host, port = sock.getsockname()[:2]
        print(f"pharox-kit listening {host}:{port}", flush=True)
    await listener.serve_forever()


def main() -> None:
    guard_parent()
    try:
        asyncio.run(_serve(sys.argv[1]))
    except OSError as exc:
        print(f"Start server failed: {exc}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
