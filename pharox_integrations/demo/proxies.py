"""Real local proxies for the demo: proxy.py processes and a port that refuses connections.

Each proxy runs in its own process group so the demo can stop it cleanly, and each
connects out from its own 127.0.0.x address (see `outbound.py`).
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from . import SOURCE_IP_ENV, VIA_ENV

_START_TIMEOUT = 20.0


class DemoProxyError(RuntimeError):
    """A demo proxy did not start; the message carries the end of its log."""


@dataclass
class DemoProxy:
    """One proxy of the demo pool.  `url` carries credentials; `safe_url` never does."""

    role: str
    source_ip: str | None = None
    auth: tuple[str, str] | None = field(default=None, repr=False)
    dead: bool = False
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)
    _started: float = 0.0

    @property
    def safe_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        if self.auth is None:
            return self.safe_url
        user, password = (quote(part, safe="") for part in self.auth)
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def spawn(self, workdir: Path) -> None:
        """Start the process (or bind the dead port) without waiting for it."""
        if self.dead:
            # Bound but never listening: connections are refused, and no other
            # program can take the port while the demo runs.
            self._sock = socket.socket()
            self._sock.bind(("127.0.0.1", 0))
            self.port = int(self._sock.getsockname()[1])
            return
        name = f"{self.role.replace(' ', '-')}-{self.source_ip}"
        port_file = workdir / f"{name}.port"
        self._log = workdir / f"{name}.log"
        argv = [
            sys.executable, "-m", "proxy",
            "--hostname", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--num-workers", "1", "--num-acceptors", "1", "--log-level", "WARNING",
            "--plugins", "pharox_integrations.demo.outbound.SourceAddressPlugin",
        ]  # fmt: skip
        if self.auth is not None:
            argv += ["--basic-auth", ":".join(self.auth)]
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        if self.source_ip:
            env[VIA_ENV] = self.source_ip
            if loopback_aliases_work():
                env[SOURCE_IP_ENV] = self.source_ip
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        self._port_file = port_file
        self._started = time.monotonic()

    def wait_ready(self) -> None:
        if self.dead or self._proc is None:
            return
        deadline = self._started + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DemoProxyError(f"proxy.py ({self.role}) exited during start-up:\n{self.log_tail()}")
            if not self.port and self._port_file.exists():
                text = self._port_file.read_text().strip()
                self.port = int(text) if text else 0
            if self.port and _accepts(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise DemoProxyError(f"proxy.py ({self.role}) did not start within {_START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self._log.read_bytes()[-size:].decode("utf-8", "replace") if self._log else ""
        except OSError:
            return ""

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@functools.cache
def loopback_aliases_work() -> bool:
    """True where 127.0.0.x (x > 1) can be bound without configuration (Linux, not macOS)."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.21", 0))
    except OSError:
        return False
    return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class DemoProxies:
    """The demo pool: plain proxies, one with credentials, one the site bans, one dead port."""

    def __init__(self, auth: tuple[str, str] = ("demo", "s3cret-pass")) -> None:
        self.items = [
            DemoProxy("plain", source_ip="127.0.0.21"),
            DemoProxy("plain", source_ip="127.0.0.22"),
            DemoProxy("credentials", source_ip="127.0.0.23", auth=auth),
            DemoProxy("banned by the site", source_ip="127.0.0.24"),
            DemoProxy("dead port", dead=True),
        ]
        self._tmp = tempfile.TemporaryDirectory(prefix="pharox-demo-")

    @property
    def banned_ips(self) -> set[str]:
        return {p.source_ip for p in self.items if p.role.startswith("banned") and p.source_ip}

    def start(self) -> DemoProxies:
        workdir = Path(self._tmp.name)
        try:
            for proxy in self.items:  # all at once: start-up of N costs about one
                proxy.spawn(workdir)
            for proxy in self.items:
                proxy.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proxy in self.items:
            proxy.stop()
        self._tmp.cleanup()

    def __enter__(self) -> DemoProxies:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
