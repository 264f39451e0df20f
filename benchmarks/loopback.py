"""Loopback servers shared by the door benchmarks: a target that is never the limit, and pproxy.

The target answers every request on a kept-alive connection with the whole answer in
one write (a header write then a body write meets Nagle + delayed ACK: ~40 ms a
request).  It runs in its own process and exits when its stdin closes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TARGET = """
import asyncio, os, sys
BODY = {body!r}
ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: {ctype}\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(BODY)) + BODY

async def serve(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    os._exit(0)  # stdin closed: the benchmark is done

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_target(body: bytes = b"ok\n", content_type: str = "text/plain") -> tuple[subprocess.Popen[str], str]:
    """(process, base URL without a trailing slash)."""
    script = _TARGET.format(body=body, ctype=content_type)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}"


def start_pproxy() -> tuple[subprocess.Popen[str], int]:
    """An HTTP pproxy listener (no auth) on a free loopback port, through the test kit's launcher."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "servers"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pproxy_main", f"http://127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # pproxy reports every torn-down connection
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        raise SystemExit(f"pproxy did not start: {line!r}")
    return proc, port


def entries(port: int, n: int) -> list[str]:
    """`n` pool entries on one proxy server, told apart by their credentials (pproxy has no auth set)."""
    return [f"http://u{i}:p{i}@127.0.0.1:{port}" for i in range(n)]
