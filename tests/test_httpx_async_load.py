"""AsyncPharoxTransport under load: 200 concurrent requests with faults, cancellations,
a banned and a dead proxy; every lease comes back and the event loop is never blocked.

Every loop callback is timed net of CPU waits (see `LoopBlocks`): any synchronous
work on the loop (a storage call, loading a certificate bundle, a blocking socket)
shows up.  The targets run in a subprocess here so their threads do not compete
with the loop for the GIL and blur the measurement.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pharox_integrations import LeaseBroker
from pharox_integrations.httpx import AsyncPharoxTransport
from pharox_integrations.storage import storage_from_url

if not __package__:
    from brokerhelpers import give_back_kept_slots
    from servers import SPECIAL_AUTH, KitProxy, ProxyKit
    from sqlhelpers import private_database
else:  # tests/ became a package
    from .brokerhelpers import give_back_kept_slots  # type: ignore[import-not-found,no-redef]
    from .servers import SPECIAL_AUTH, KitProxy, ProxyKit  # type: ignore[import-not-found,no-redef]
    from .sqlhelpers import private_database  # type: ignore[import-not-found,no-redef]

TIMEOUT = 10
MAX_BLOCK_S = 0.010
HERE = Path(__file__).resolve().parent

_TARGET_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    sys.path.insert(0, sys.argv[1])
    from servers import TargetServer
    server = TargetServer()
    for ip in json.loads(sys.argv[2]):
        server.ban(ip)
    print(json.dumps({"url": server.url}), flush=True)
    sys.stdin.read()  # runs until the test closes our stdin
    server.close()
    """
)


@dataclass
class RemoteTarget:
    """The kit's target server in its own process (bans given at start)."""

    url: str
    proc: subprocess.Popen[str]


@pytest.fixture
def remote_target(request: pytest.FixtureRequest) -> Iterator[Any]:
    started: list[RemoteTarget] = []

    def start(banned_ips: list[str]) -> RemoteTarget:
        proc = subprocess.Popen(
            [sys.executable, "-c", _TARGET_SCRIPT, str(HERE), json.dumps(banned_ips)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        target = RemoteTarget(json.loads(line)["url"], proc)
        started.append(target)
        return target

    yield start
    for target in started:
        assert target.proc.stdin is not None
        target.proc.stdin.close()
        try:
            target.proc.wait(10)
        except subprocess.TimeoutExpired:
            target.proc.kill()
            target.proc.wait()


def _runqueue_wait_s() -> float:
    """Seconds the threads of this process spent runnable but waiting for a CPU (Linux).

    Summed over every thread: a worker thread descheduled while it holds the GIL
    stalls the loop thread just as much as the loop's own wait for a CPU does."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


@dataclass
class LoopBlocks:
    """How long each event-loop callback (one step of one task) blocked the loop: its
    CPU time, or its wall time minus the time the kernel kept this process's threads
    waiting for a CPU meanwhile, whichever is larger.

    A gap probe (a task sleeping 1 ms and timing its wake-up) cannot tell "a call
    blocked the loop" from "200 tasks each did 0.5 ms of work in one loop turn" nor
    from "the shared machine descheduled us for 300 ms", and all three happen here.
    A callback that runs long, net of CPU waits, is exactly a blocked loop: a storage
    query, a certificate load or a sleep on the loop shows up (see the self-test).
    Pauses of Python's cyclic garbage collector (up to ~10 ms here, whoever allocated)
    are taken out of the callback they interrupt and reported separately.
    """

    worst: float = 0.0
    worst_what: str = ""
    count: int = 0
    gc_pauses: list[float] = field(default_factory=list)
    gc_total: float = 0.0

    def record(self, took: float, cpu: float, handle: asyncio.Handle) -> None:
        self.count += 1
        if took > self.worst:
            self.worst, self.worst_what = took, f"{repr(handle)[:300]} ({cpu * 1000:.1f} ms CPU)"

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            pause = time.thread_time() - self._gc_start
            self.gc_pauses.append(pause)
            self.gc_total += pause

    def summary(self) -> str:
        return (
            f"{self.count} callbacks, longest {self.worst * 1000:.1f} ms net of CPU waits: {self.worst_what}; "
            f"longest GC pause {max(self.gc_pauses, default=0) * 1000:.1f} ms CPU"
        )


@contextmanager
def timing_callbacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopBlocks]:
    """Time every callback the loop runs.  asyncio has no public per-callback hook (its
    debug mode logs slow callbacks in wall time, preemption included), so this wraps
    `Handle._run` for the duration: instrumentation only, the callback itself runs as is."""
    blocks = LoopBlocks()
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.Handle) -> None:
        # CPU waits read outside the timed span: a preemption between the two reads
        # then lands in the waits, never in the callback's time alone.
        waited, collected = _runqueue_wait_s(), blocks.gc_total
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            run(handle)
        finally:
            took, cpu = time.perf_counter() - start, time.thread_time() - cpu
            collecting = blocks.gc_total - collected  # the collector's, reported on its own
            # CPU time spent in the callback is loop time whatever else ran meanwhile;
            # wall time net of CPU waits adds what it spent blocked (sleeping, I/O).
            net = max(cpu, took - (_runqueue_wait_s() - waited)) - collecting
            blocks.record(net, cpu, handle)

    gc.callbacks.append(blocks.on_gc)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(asyncio.events.Handle, "_run", timed)
            yield blocks
    finally:
        gc.callbacks.remove(blocks.on_gc)


def assert_all_returned(broker: LeaseBroker) -> None:
    assert broker.held == 0, broker.held_leases()
    give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
    leftover = {p.port: p.current_leases for p in broker.proxies() if p.current_leases}
    assert not leftover, leftover
    assert broker.counters["acquired"] == broker.counters["released"]


async def one_request(client: httpx.AsyncClient, base: str, i: int) -> str:
    """One of several request shapes, chosen by `i`; returns what happened."""
    shape = i % 8
    try:
        if shape == 0:
            r = await client.get(f"{base}/status/500")
        elif shape == 1:
            r = await client.get(f"{base}/drop")
        elif shape == 2:  # streamed, closed after the first chunk
            async with client.stream("GET", f"{base}/bytes?n=200000&chunk=2000") as s:
                async for _ in s.aiter_bytes():
                    break
            return "stream-closed-early"
        elif shape == 3:
            r = await client.get(f"{base}/bytes?n=100000&chunk=5000")
        elif shape == 4:  # cancelled while the proxy is still waiting for the target
            task = asyncio.ensure_future(client.get(f"{base}/slow?ms=300"))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "not-cancelled"
        else:
            r = await client.post(f"{base}/echo", json={"i": i})
        return str(r.status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def load(
    broker: LeaseBroker, base: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Counter[str], LoopBlocks]:
    transport = AsyncPharoxTransport(broker, max_proxy_transports=3)
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT) as client:
        # Once per process, httpcore imports anyio's asyncio backend on the first
        # connection (tens of ms, on the loop, for any AsyncClient): warm up first.
        assert (await client.get(f"{base}/status/204")).status_code == 204
        # A full collection of the pytest process's heap (modules, fixtures) takes
        # 100-250 ms here; freezing it leaves the collector with what the load allocates.
        gc.collect()
        gc.freeze()
        try:
            with timing_callbacks(monkeypatch) as blocks:
                outcomes = Counter(await asyncio.gather(*(one_request(client, base, i) for i in range(n))))
        finally:
            gc.unfreeze()
    return outcomes, blocks


@pytest.fixture
def faulty_pool(proxy_trio: list[KitProxy], proxy_kit: ProxyKit) -> tuple[list[str], str]:
    """Three good HTTP proxies with credentials, one SOCKS5, one dead; the first is banned."""
    socks = proxy_kit.socks5(auth=SPECIAL_AUTH)
    dead = proxy_kit.dead()
    return [*(p.url for p in proxy_trio), socks.url, dead.url], proxy_trio[0].outbound_ip


def check(outcomes: Counter[str], n: int, blocks: LoopBlocks, broker: LeaseBroker) -> None:
    assert sum(outcomes.values()) == n, outcomes
    assert outcomes["cancelled"] == n // 8, outcomes
    assert outcomes["200"] > 0 and outcomes["stream-closed-early"] > 0, outcomes
    assert_all_returned(broker)
    assert blocks.count > n
    print(blocks.summary())
    assert blocks.worst < MAX_BLOCK_S, f"event loop blocked: {blocks.summary()}; outcomes {dict(outcomes)}"


@pytest.mark.asyncio
async def test_200_concurrent_requests_with_faults_memory_storage(
    faulty_pool: tuple[list[str], str], remote_target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, banned_ip = faulty_pool
    site = remote_target([banned_ip])
    broker = LeaseBroker.from_proxies(urls, acquire_timeout=5)
    try:
        outcomes, blocks = await load(broker, site.url, 200, monkeypatch)
        check(outcomes, 200, blocks, broker)
        assert broker.counters["bans"] >= 1
        assert broker.health(site=site.url).site_banned == 1  # the site's verdict; still active elsewhere
    finally:
        broker.close()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_concurrent_requests_with_faults_postgres_storage(
    faulty_pool: tuple[list[str], str], remote_target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls, banned_ip = faulty_pool
    site = remote_target([banned_ip])
    with private_database("postgres", tmp_path) as url:
        broker = LeaseBroker.from_proxies(urls, storage=storage_from_url(url, create_schema=True), acquire_timeout=10)
        assert broker.storage_blocks
        try:
            outcomes, blocks = await load(broker, site.url, 200, monkeypatch)
            check(outcomes, 200, blocks, broker)
            # Another broker on the same database sees what this one did.
            other = LeaseBroker.from_proxies([], storage=url)
            try:
                assert other.health(site=site.url).site_banned == 1 and other.health().leased == 0
            finally:
                other.storage.close()  # type: ignore[attr-defined]
        finally:
            broker.close()
            broker.storage.close()  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_callback_timing_sees_a_blocked_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement itself: 50 ms of blocking sleep or of CPU work on the loop shows
    up (other threads' CPU waits meanwhile are subtracted from a sleep, so an idle
    server thread waking up on a loaded machine can hide a few ms of it)."""
    for block in (time.sleep, spin):
        with timing_callbacks(monkeypatch) as blocks:
            await asyncio.sleep(0.01)
            block(0.05)  # in this test's own step
            await asyncio.sleep(0.01)
        assert blocks.worst >= 0.025, (block, blocks.summary())


def spin(seconds: float) -> None:
    """Burn `seconds` of this thread's CPU time (however long the machine makes it take)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
