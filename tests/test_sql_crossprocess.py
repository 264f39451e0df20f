"""SqlStorage shared by real processes, a killed worker, and a PostgreSQL restart.

Run as a script, this file is the worker process (see `_worker_main`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pharox import (
    Proxy,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)

from pharox_integrations.errors import StorageUnavailable
from pharox_integrations.storage.sql import SqlStorage, init_schema

if __package__:
    from .sqlhelpers import backend_params, postgres_binaries, private_database, unavailable
else:
    from sqlhelpers import backend_params, postgres_binaries, private_database, unavailable

POOL = "fleet"
PROXIES = 16
PROCESSES = 4
THREADS = 8
LEASE_SECONDS = 2
RUN_SECONDS = 8.0


def _seed(url: str, n: int) -> SqlStorage:
    init_schema(url)
    store = SqlStorage(url, pool_size=4)
    pool = ProxyPool(name=POOL)
    store.add_pool(pool)
    store.add_proxies_bulk(
        [
            Proxy(
                host=f"127.0.0.{i + 1}",
                port=3128,
                protocol=ProxyProtocol.HTTP,
                pool_id=pool.id,
                status=ProxyStatus.ACTIVE,
                max_concurrency=1,
            )
            for i in range(n)
        ]
    )
    return store


def _spawn(url: str, role: str, start_at: float, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, url, role, repr(start_at), str(out)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("backend", backend_params())
def test_processes_share_one_pool_and_a_killed_worker_leases_expire(
    backend: str, tmp_path: Path
) -> None:
    with private_database(backend, tmp_path) as url:
        store = _seed(url, PROXIES)
        spawned: list[subprocess.Popen[str]] = []
        try:
            start_at = time.time() + 3.0  # after every interpreter has imported
            victim = _spawn(url, "victim", start_at, tmp_path / "victim.json")
            spawned.append(victim)
            workers = [
                _spawn(url, "worker", start_at, tmp_path / f"worker{i}.json")
                for i in range(PROCESSES - 1)
            ]
            spawned.extend(workers)
            assert victim.stdout is not None
            line = victim.stdout.readline()  # the victim says when it holds its leases
            assert line.startswith("HOLDING"), victim.stderr.read() if victim.stderr else line
            read_at = time.time()  # every victim lease exists by now (it holds all it wants)
            held = [
                lease
                for lease in store.list_leases()
                if lease.status.value == "active"
                and lease.consumer_id == store.ensure_consumer("victim")
            ]
            assert held, "the victim should hold leases when it is killed"
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            results = []
            for proc, i in zip(workers, range(PROCESSES - 1), strict=True):
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                results.append(json.loads((tmp_path / f"worker{i}.json").read_text()))

            intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for result in results:
                assert result["errors"] == []
                assert result["leases"] > 0
                for proxy_id, t0, t1 in result["intervals"]:
                    intervals[proxy_id].append((t0, t1))
            for proxy_id, spans in intervals.items():
                spans.sort()
                for (a0, a1), (b0, b1) in itertools.pairwise(spans):
                    assert a1 <= b0, f"proxy {proxy_id} leased twice at once: {a0}-{a1} / {b0}-{b1}"
            # The killed worker's proxies stayed out of the pool until its leases
            # expired, then came back and were leased by the others.
            for lease in held:
                expires = lease.expires_at.timestamp()
                spans = intervals[str(lease.proxy_id)]
                early = [
                    s for s in spans if read_at < s[1] and s[0] < expires - 0.05
                ]  # held by someone else while the database had it leased to the victim
                assert not early, "a proxy of the killed worker was leased before its lease expired"
                last = max(t0 for spans_ in intervals.values() for t0, _ in spans_)
                assert [s for s in spans if s[0] >= expires - 0.05], (
                    "a proxy of the killed worker never came back to the pool "
                    f"(expired {expires - start_at:.2f} s into the run, last lease of the run "
                    f"{last - start_at:.2f} s, {len(spans)} leases of that proxy)"
                )
            store.cleanup_expired_leases(force=True)
            assert store.count_active_leases(POOL) == 0
            pool = store.get_pool_by_name(POOL)
            assert pool is not None
            assert all(p.current_leases == 0 for p in store.list_proxies(str(pool.id)))
        finally:
            for proc in spawned:  # never leave a worker behind when an assertion fails
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            store.close()


# -------------------------------------------------------------------- restart


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PrivatePostgres:
    """A throw-away PostgreSQL cluster, so restarting it disturbs nobody else."""

    def __init__(self) -> None:
        bindir = postgres_binaries()
        if bindir is None:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) not installed")
            raise AssertionError("unreachable")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pxi-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bindir / tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[_PrivatePostgres]:
    server = _PrivatePostgres()
    yield server
    server.destroy()


@pytest.mark.postgres
def test_postgres_restart_mid_run(private_postgres: _PrivatePostgres) -> None:
    url = private_postgres.url
    store = _seed(url, 4)
    store.close()
    storage = SqlStorage(url, pool_size=4)
    stop = threading.Event()
    down_errors: list[str] = []
    other_errors: list[BaseException] = []
    ok_at: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            try:
                lease = storage.acquire_lease(POOL, "restart", 3, selector=SelectorStrategy.ROUND_ROBIN)
            except StorageUnavailable as exc:
                with lock:
                    down_errors.append(str(exc))
                time.sleep(0.05)
                continue
            except BaseException as exc:
                other_errors.append(exc)
                return
            if lease is None:
                time.sleep(0.005)
                continue
            time.sleep(0.005)
            while True:  # what the broker does: a release is retried until it lands
                try:
                    storage.release_lease(lease)
                    break
                except StorageUnavailable as exc:
                    with lock:
                        down_errors.append(str(exc))
                    time.sleep(0.05)
            with lock:
                ok_at.append(time.monotonic())

    threads = [threading.Thread(target=work) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        before = len(ok_at)
        assert before > 0
        private_postgres.stop()
        time.sleep(1.5)
        assert down_errors, "no clear error while the database was down"
        private_postgres.start()
        restarted = time.monotonic()
        deadline = restarted + 20
        while time.monotonic() < deadline and not [t for t in ok_at if t > restarted]:
            time.sleep(0.1)
        assert [t for t in ok_at if t > restarted], "leasing did not recover after the restart"
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not other_errors, other_errors
    message = down_errors[0]
    assert f"127.0.0.1:{private_postgres.port}" in message and "unavailable" in message
    # Counters agree with the lease rows, and nothing stays leased once orphans
    # (acquires whose commit reply was lost in the restart) have expired.
    pool = storage.get_pool_by_name(POOL)
    assert pool is not None
    counters = sum(p.current_leases for p in storage.list_proxies(str(pool.id)))
    assert counters == storage.count_active_leases(POOL)
    time.sleep(3.1)
    storage.cleanup_expired_leases(force=True)
    assert storage.count_active_leases(POOL) == 0
    assert all(p.current_leases == 0 for p in storage.list_proxies(str(pool.id)))
    storage.close()


# -------------------------------------------------------------------- worker process


def _worker_main(url: str, role: str, start_at: float, out: str) -> None:
    storage = SqlStorage(url, pool_size=THREADS + 2)
    manager = ProxyManager(storage)
    intervals: list[tuple[str, float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    held = threading.Semaphore(0)
    deadline = max(start_at, time.time()) + RUN_SECONDS  # a late start (busy box) still runs

    def acquire(index: int, consumer: str, seconds: int) -> Any:
        if index % 2:  # half the threads take the one-transaction path the core prefers
            return storage.acquire_lease(POOL, consumer, seconds, selector=SelectorStrategy.ROUND_ROBIN)
        return manager.acquire_proxy(POOL, consumer, seconds, selector=SelectorStrategy.ROUND_ROBIN)

    def victim(index: int) -> None:
        while True:
            try:
                lease = acquire(index, "victim", LEASE_SECONDS)
            except ProxyUnavailableError:
                continue
            if lease is not None:
                held.release()
                time.sleep(3600)  # hold it until SIGKILL
            time.sleep(0.01)

    def worker(index: int) -> None:
        rng = random.Random(index)
        while time.time() < deadline:
            try:
                lease = acquire(index, "worker", 30)
            except ProxyUnavailableError:
                continue  # lost the find/create race: the core retries the same way
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            if lease is None:
                time.sleep(0.005)
                continue
            t0 = time.time()
            time.sleep(rng.uniform(0, 0.004))
            t1 = time.time()
            manager.release_proxy(lease)
            with lock:
                intervals.append((str(lease.proxy_id), t0, t1))

    time.sleep(max(0.0, start_at - time.time()))
    target = victim if role == "victim" else worker
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    if role == "victim":
        for _ in range(THREADS):  # all of them, so no victim lease starts after HOLDING
            held.acquire(timeout=20)
        print("HOLDING", flush=True)
        time.sleep(3600)
    for t in threads:
        t.join()
    Path(out).write_text(
        json.dumps({"intervals": intervals, "errors": errors, "leases": len(intervals)})
    )
    storage.close()


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
