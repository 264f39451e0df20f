"""`RouteCache` and `Closer`, the per-proxy cache and the background thread the doors share.

Real objects throughout: urllib3 connection pools as the cached values (closing one sets
its `pool` to None), real threads, a real garbage-collected object for the finalizer.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
from urllib3 import HTTPConnectionPool

from pharox_integrations.routes import CLOSER, Closer, RouteCache

TIMEOUT = 5


def pool(port: int = 1) -> HTTPConnectionPool:
    return HTTPConnectionPool("127.0.0.1", port)


def is_closed(value: HTTPConnectionPool) -> bool:
    return value.pool is None


@pytest.fixture
def closer() -> Iterator[Closer]:
    """A closer of the test's own (its thread idles forever once the test is done)."""
    yield Closer(batch_seconds=0.01, name="pharox-test-closer")


def ran_on(closer: Closer, job: Callable[[], object]) -> threading.Event:
    done = threading.Event()

    def run() -> None:
        job()
        done.set()

    closer.put(run)
    return done


# ---------------------------------------------------------------------- RouteCache


def test_a_hit_reuses_the_route_and_moves_it_to_the_end() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(2)
    a, _ = cache.checkout("a", pool)
    b, _ = cache.checkout("b", pool)
    again, stale = cache.checkout("a", lambda: pytest.fail("a hit builds nothing"))
    assert again is a and stale == () and a.users == 2
    for route in (a, b, a):
        assert cache.checkin(route) is None
    # "a" was used last: "b" is the one a third key pushes out.
    c, stale = cache.checkout("c", pool)
    assert list(stale) == [b.value] and list(cache) == ["a", "c"]
    assert cache.checkin(c) is None and cache.in_use == 0


def test_eviction_never_hands_back_a_route_in_use() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(1)
    busy, _ = cache.checkout("busy", pool)
    other, stale = cache.checkout("other", pool)
    assert stale == [] and len(cache) == 1 and "busy" not in cache  # evicted, but in use
    assert busy.evicted and cache.in_use == 2
    assert cache.checkin(busy) is busy.value  # its last user: now it is due for closing
    assert cache.checkin(other) is None  # still cached
    assert cache.in_use == 0


def test_an_evicted_route_is_handed_back_once_after_its_last_user() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(1)
    first, _ = cache.checkout("k", pool)
    second, _ = cache.checkout("k", pool)
    assert second is first
    other, stale = cache.checkout("other", pool)
    assert stale == []
    assert cache.checkin(first) is None  # one user left
    assert cache.checkin(second) is first.value
    assert cache.checkin(other) is None
    # Checked out again, "k" is a new route; the old value never comes back.
    fresh, stale = cache.checkout("k", pool)
    assert fresh is not first and list(stale) == [other.value]
    assert cache.checkin(fresh) is None and cache.in_use == 0


def test_drain_hands_back_every_cached_value_once() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(2)
    evicted_in_use, _ = cache.checkout("a", pool)
    cached_in_use, _ = cache.checkout("b", pool)
    idle, _ = cache.checkout("c", pool)
    cache.checkin(idle)
    assert cache.drain() == [cached_in_use.value, idle.value] and len(cache) == 0
    assert cache.checkin(cached_in_use) is None  # drained already
    assert cache.checkin(evicted_in_use) is evicted_in_use.value  # evicted before the drain
    assert cache.drain() == [] and cache.in_use == 0


def test_a_route_built_twice_at_once_keeps_one_and_hands_back_the_other() -> None:
    """Two threads miss the same key together: both build (outside the lock), one value
    is cached and used by both, the other comes back to be closed."""
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(4)
    both_building = threading.Barrier(2, timeout=TIMEOUT)
    results: list[tuple[object, list[HTTPConnectionPool]]] = []

    def build() -> HTTPConnectionPool:
        both_building.wait()
        return pool()

    def work() -> None:
        route, stale = cache.checkout("k", build)
        results.append((route, list(stale)))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    (route_a, stale_a), (route_b, stale_b) = results
    assert route_a is route_b and cache.in_use == 2 and len(cache) == 1
    assert stale_a == [] and len(stale_b) == 1 and stale_b[0] is not cache["k"]


def test_a_failing_build_counts_no_user() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(1)

    def broken() -> HTTPConnectionPool:
        raise ValueError("bad proxy URL")

    with pytest.raises(ValueError, match="bad proxy URL"):
        cache.checkout("k", broken)
    assert len(cache) == 0 and cache.in_use == 0


def test_the_cache_reads_as_a_mapping_without_credentials_in_its_repr() -> None:
    cache: RouteCache[str, HTTPConnectionPool] = RouteCache(2, setting="pool_connections")
    route, _ = cache.checkout("http://user:secret@10.0.0.1:3128", pool)
    assert dict(cache.items()) == {"http://user:secret@10.0.0.1:3128": route.value}
    assert list(cache.values()) == [route.value] and len(cache) == 1
    assert "secret" not in repr(cache) and "secret" not in repr(route)
    with pytest.raises(ValueError, match=r"pool_connections=0: expected an integer >= 1"):
        RouteCache(0, setting="pool_connections")


def test_threads_rotating_through_a_small_cache_close_nothing_in_use(closer: Closer) -> None:
    """8 threads over 20 keys through 3 routes: every value handed back is idle and
    handed back once; the closer closes each; what is left is cached or closed."""
    cache: RouteCache[int, HTTPConnectionPool] = RouteCache(3)
    closer.start()
    handed_back: list[HTTPConnectionPool] = []
    lock = threading.Lock()
    errors: list[str] = []

    def work(seed: int) -> None:
        for i in range(300):
            route, stale = cache.checkout((seed * 7 + i) % 20, pool)
            if is_closed(route.value):
                errors.append(f"route {route.key} closed while in use")
            idle = cache.checkin(route)
            with lock:
                for value in [*stale, *([idle] if idle is not None else [])]:
                    handed_back.append(value)
                    closer.put(value.close)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len({id(v) for v in handed_back}) == len(handed_back)  # each once
    assert ran_on(closer, lambda: None).wait(TIMEOUT)  # runs after every close queued before
    assert all(is_closed(v) for v in handed_back)
    assert not any(is_closed(v) for v in cache.values()) and cache.in_use == 0


# ---------------------------------------------------------------------- Closer


def test_the_closer_runs_jobs_queued_before_and_after_it_starts(closer: Closer) -> None:
    early = ran_on(closer, lambda: None)
    assert not early.wait(0.05)  # queued; nothing runs them yet
    closer.start()
    closer.start()  # idempotent
    late = ran_on(closer, lambda: None)
    assert early.wait(TIMEOUT) and late.wait(TIMEOUT)


def test_a_failing_job_is_logged_and_the_next_one_runs(closer: Closer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pharox_integrations")
    closer.start()

    def fail() -> None:
        raise OSError("socket already gone")

    closer.put(fail)
    assert ran_on(closer, lambda: None).wait(TIMEOUT)
    assert "a background close or release failed" in caplog.text and "socket already gone" in caplog.text


def test_put_from_a_finalizer_runs_the_job_on_the_closer_thread(closer: Closer) -> None:
    closer.start()
    seen: list[str] = []
    done = threading.Event()

    def job() -> None:
        seen.append(threading.current_thread().name)
        done.set()

    class Response:  # stands for a streamed response dropped unread
        pass

    dropped = Response()
    weakref.finalize(dropped, closer.put, job)
    del dropped
    gc.collect()
    assert done.wait(TIMEOUT)
    assert seen == ["pharox-test-closer"]


def test_jobs_queued_together_run_in_one_batch() -> None:
    """A burst of jobs costs the thread one wake-up: it waits `batch_seconds` after the
    first, then runs them all."""
    closer = Closer(batch_seconds=0.2, name="pharox-test-batch")
    closer.start()
    ran: list[float] = []
    last = threading.Event()
    queued = time.monotonic()

    def job() -> None:
        ran.append(time.monotonic())
        if len(ran) == 20:
            last.set()

    for _ in range(20):
        closer.put(job)
    assert last.wait(TIMEOUT)
    assert ran[0] - queued >= 0.15  # nothing ran before the batch window closed
    assert ran[-1] - ran[0] < 0.1  # then everything at once


def test_the_doors_share_one_closer_thread() -> None:
    from pharox_integrations import LeaseBroker
    from pharox_integrations.requests import PharoxAdapter
    from pharox_integrations.urllib3 import PharoxProxyManager

    broker = LeaseBroker.from_proxies(["http://127.0.0.1:9"])
    try:
        PharoxAdapter(broker).close()
        PharoxProxyManager(broker).clear()
        ours = [t.name for t in threading.enumerate() if t.name.startswith("pharox-")]
        assert [name for name in ours if not name.startswith("pharox-test")] == [CLOSER.name]
        assert ran_on(CLOSER, lambda: None).wait(TIMEOUT)
    finally:
        broker.close()
