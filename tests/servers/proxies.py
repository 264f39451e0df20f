"""Real proxy servers (proxy.py, pproxy) in their own subprocesses on loopback.

One subprocess per proxy, in its own process group, so a test can stop or
SIGKILL one proxy without touching the others, and so the proxies' event loops
never share a process with the Twisted/asyncio loops under test.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

Auth = tuple[str, str]

#: Credentials with every character that tends to break URL and header handling.
SPECIAL_AUTH: Auth = ("us@r:na/me", "p@ss:w/rd %+ x")

_HERE = Path(__file__).resolve().parent
_PROXY_ENV_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
_START_TIMEOUT = 15.0
# Read by proxypy_plugin.py in the proxy.py subprocess (kept in sync by hand:
# importing that module here would import proxy.py into the test process).
OUTBOUND_IP_ENV = "PHAROX_KIT_OUTBOUND_IP"


class ProxyStartError(RuntimeError):
    """A kit proxy did not start; the message carries the proxy's own log."""


_ip_lock = threading.Lock()
_ip_next = 0


def next_outbound_ip() -> str:
    """A loopback address no other kit proxy in this process uses (127.0.0.2 on)."""
    global _ip_next
    with _ip_lock:
        n = _ip_next
        _ip_next += 1
    return f"127.0.{n // 250}.{2 + n % 250}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _child_env(outbound_ip: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_HERE), env.get("PYTHONPATH")]))
    env[OUTBOUND_IP_ENV] = outbound_ip
    env["PYTHONUNBUFFERED"] = "1"  # start-up lines must reach the log at once
    return env


@dataclass(frozen=True)
class _Spec:
    kind: str  # "http" (proxy.py), "socks5" or "socks4" (pproxy)
    auth: Auth | None
    outbound_ip: str


class KitProxy:
    """One running proxy server. ``url`` has percent-encoded credentials; ``safe_url``
    and ``repr`` never show them."""

    host = "127.0.0.1"

    def __init__(self, spec: _Spec, workdir: Path, name: str) -> None:
        self.kind = spec.kind
        self.auth = spec.auth
        self.outbound_ip = spec.outbound_ip
        self._spec = spec
        self._workdir = workdir
        self._name = name
        self._log_path = workdir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_at = 0.0
        self._group_gone = False
        self.port = 0

    # -- addresses -------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.kind

    @property
    def safe_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        if self.auth is None:
            return self.safe_url
        user, password = (quote(part, safe="") for part in self.auth)
        return f"{self.scheme}://{user}:{password}@{self.host}:{self.port}"

    @property
    def proxy_headers(self) -> dict[str, str]:
        """``Proxy-Authorization`` for an HTTP proxy with auth (else empty), for
        clients such as urllib3 that do not read credentials from the URL."""
        if self.auth is None or self.kind != "http":
            return {}
        token = base64.b64encode(":".join(self.auth).encode()).decode()
        return {"Proxy-Authorization": f"Basic {token}"}

    # -- life cycle ------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self, port: int) -> list[str]:
        spec = self._spec
        if spec.kind == "http":
            argv = [
                sys.executable,
                "-m",
                "proxypy_main",
                "--hostname",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-file",
                str(self._port_file),
                "--num-workers",
                "1",
                "--num-acceptors",
                "1",
                "--log-level",
                "WARNING",
                "--plugins",
                "proxypy_plugin.BindOutboundPlugin",
            ]
            if spec.auth is not None:
                # proxy.py compares the whole base64("user:pass") token, so any
                # character (':' in the user name too) works.
                argv += ["--basic-auth", ":".join(spec.auth)]
            return argv
        uri = f"{spec.kind}://127.0.0.1:{port}/@{spec.outbound_ip}"
        if spec.auth is not None:
            # pproxy reads "user:pass" lines from a file given as "##path": no URL
            # quoting rules apply to what is in the file.
            auth_file = self._workdir / f"{self._name}.auth"
            auth_file.write_text(":".join(spec.auth) + "\n")
            uri += f"##{auth_file}"
        return [sys.executable, "-m", "pproxy_main", uri]

    def _spawn(self, port: int | None = None) -> None:
        """Start the process without waiting; ``_wait_ready`` finishes the job."""
        if self.kind == "http":
            self._port_file.unlink(missing_ok=True)
            self.port = port or 0
        else:
            self.port = port or _free_port()
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        self._group_gone = False
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_child_env(self.outbound_ip),
                start_new_session=True,
            )
        self._started_at = time.monotonic()

    @property
    def _port_file(self) -> Path:
        return self._workdir / f"{self._name}.port"

    def _listening(self) -> bool:
        """Whether *this* process listens (not merely: something accepts on the port)."""
        if self.kind == "http":
            # proxy.py writes the port file once its listener is bound.
            try:
                first = self._port_file.read_text()
            except FileNotFoundError:
                return False
            if not first.endswith("\n"):
                return False
            self.port = int(first.split()[0])
        else:
            # Printed by pproxy_main.py once its socket listens.
            text = self.log(tail=None, since=self._log_offset)
            if f"pharox-kit listening 127.0.0.1:{self.port}" not in text:
                return False
        return _accepts(self.port)

    def _wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        assert self._proc is not None
        deadline = self._started_at + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None or "Start server failed" in self.log(tail=None, since=self._log_offset):
                self.kill()
                raise ProxyStartError(
                    f"{self.kind} proxy {self.safe_url} failed to start (exit code "
                    f"{self._proc.poll()}); its log:\n{self.log(since=self._log_offset)}"
                )
            if self._listening():
                return
            time.sleep(0.02)
        self.kill()
        raise ProxyStartError(
            f"{self.kind} proxy {self.safe_url} did not accept connections within "
            f"{timeout:.0f}s; its log:\n{self.log(since=self._log_offset)}"
        )

    def start(self, port: int | None = None) -> KitProxy:
        """(Re)start the proxy, on ``port`` if given (``restart`` keeps the old one)."""
        for attempt in range(3):
            self._spawn(port)
            try:
                self._wait_ready()
                return self
            except ProxyStartError:
                # A pre-picked free port can be taken by someone else before
                # pproxy binds it: retry on a fresh one unless the port was fixed.
                if port is not None or attempt == 2 or "in use" not in self.log(since=self._log_offset):
                    raise
        raise AssertionError("unreachable")

    def restart(self) -> KitProxy:
        """Bring a stopped/killed proxy back on the same port and outbound IP."""
        if self.alive:
            return self
        return self.start(self.port)

    def _signal(self, sig: int) -> bool:
        """Signal the whole process group (proxy.py forks workers that hold the
        listening socket too); False once the group is gone."""
        proc = self._proc
        if proc is None or self._group_gone:
            return False
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            self._group_gone = True
            return False
        return True

    def _wait_group(self, timeout: float) -> bool:
        """Reap the leader, then wait for every process of the group to exit."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout)
        while self._signal(0):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop: SIGTERM to its process group, SIGKILL if it lingers.
        Returns once no process of the proxy is left (the port refuses)."""
        if self._signal(signal.SIGTERM) and not self._wait_group(timeout):
            self.kill()

    def kill(self) -> None:
        """Crash it: SIGKILL to its process group, no goodbye."""
        if self._signal(signal.SIGKILL):
            self._wait_group(5.0)

    def log(self, tail: int | None = 4000, since: int = 0) -> str:
        """The proxy's own stdout/stderr (the last ``tail`` bytes), for messages."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return ""
        if tail is not None:
            data = data[-tail:]
        return data.decode("utf-8", "replace")

    def __repr__(self) -> str:
        state = "alive" if self.alive else "down"
        return f"<KitProxy {self.safe_url} out={self.outbound_ip} {state}>"


class DeadProxy:
    """A proxy URL whose port refuses connections.

    The port stays bound (but never listens) until ``close``: the kernel answers
    with a reset, and nobody else can start a server on it meanwhile.
    """

    host = "127.0.0.1"
    auth: Auth | None = None
    outbound_ip: str | None = None
    alive = False
    proxy_headers: dict[str, str] = {}

    def __init__(self, kind: str = "http") -> None:
        self.kind = kind
        self._sock: socket.socket | None = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])

    @property
    def scheme(self) -> str:
        return self.kind

    @property
    def url(self) -> str:
        return f"{self.kind}://{self.host}:{self.port}"

    safe_url = url

    def stop(self) -> None:
        pass

    kill = stop

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"<DeadProxy {self.url}>"


class ProxyKit:
    """Factory for kit proxies; ``close`` stops everything it started."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        if workdir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(prefix="pharox-kit-")
            workdir = self._tmp.name
        else:
            self._tmp = None
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started: list[KitProxy] = []
        self._dead: list[DeadProxy] = []
        self._count = 0

    def _new(self, kind: str, auth: Auth | None, outbound_ip: str | None) -> KitProxy:
        self._count += 1
        spec = _Spec(kind, auth, outbound_ip or next_outbound_ip())
        proxy = KitProxy(spec, self.workdir, f"{kind}-{self._count}")
        self.started.append(proxy)
        return proxy

    def _start_all(self, proxies: Sequence[KitProxy]) -> list[KitProxy]:
        # Spawn all first, then wait: start-up of N proxies costs about one.
        for p in proxies:
            p._spawn()
        failed: list[KitProxy] = []
        for p in proxies:
            try:
                p._wait_ready()
            except ProxyStartError:
                failed.append(p)
        for p in failed:
            p.start()  # retries, and raises with the proxy's log if it still fails
        return list(proxies)

    def http(self, auth: Auth | None = None, outbound_ip: str | None = None) -> KitProxy:
        """proxy.py: HTTP forward proxy with CONNECT, optional basic auth."""
        return self._start_all([self._new("http", auth, outbound_ip)])[0]

    def socks5(self, auth: Auth | None = None, outbound_ip: str | None = None) -> KitProxy:
        """pproxy SOCKS5, optional username/password auth."""
        return self._start_all([self._new("socks5", auth, outbound_ip)])[0]

    def socks4(self, outbound_ip: str | None = None) -> KitProxy:
        """pproxy SOCKS4 (IPv4 addresses only; pproxy does not speak SOCKS4a)."""
        return self._start_all([self._new("socks4", None, outbound_ip)])[0]

    def many(self, kind: str, auths: Iterable[Auth | None]) -> list[KitProxy]:
        """Start one ``kind`` proxy per entry of ``auths``, in parallel."""
        return self._start_all([self._new(kind, auth, None) for auth in auths])

    def dead(self, kind: str = "http") -> DeadProxy:
        """A proxy URL on 127.0.0.1 whose port refuses connections."""
        proxy = DeadProxy(kind)
        self._dead.append(proxy)
        return proxy

    def close(self) -> None:
        # Signal all, then wait for each: stopping N proxies costs about one.
        signalled = [p for p in self.started if p._signal(signal.SIGTERM)]
        for proxy in signalled:
            if not proxy._wait_group(5.0):
                proxy.kill()
        for dead in self._dead:
            dead.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> ProxyKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
