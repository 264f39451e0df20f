"""What the doors share to reach many proxies: per-proxy routes and one background closer.

`RouteCache` keeps a door's per-proxy routes (requests' proxy managers, httpx's inner
transports) in a bounded LRU with in-use counts.  With rotation over a large pool, one
route per proxy forever would grow without bound (requests' own proxy-manager cache
does); here an evicted route leaves the cache at once but is closed only when its last
user checks it in: closing a pool between "get a pool" and "get a connection" would
fail that request.  The cache does no I/O: the values to close come back to the caller,
so a sync door hands them to `CLOSER` and an async one awaits their close.

`CLOSER` is one daemon thread for the whole package that runs jobs off the request
path: closing evicted pools, managers or transports (closing a socket the proxy used a
moment ago waits for the proxy), and releasing the leases of responses dropped without
being closed.  A garbage-collected response is finalized at any allocation, possibly
while its thread is inside the broker or its storage: releasing right there could
re-enter them, so its finalizer only queues the release.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Generic, TypeVar

__all__ = ["CLOSER", "Closer", "Route", "RouteCache"]

logger = logging.getLogger("pharox_integrations")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Route(Generic[K, T]):
    """One proxy's value (a manager, a transport) and how many requests or streams use it."""

    __slots__ = ("evicted", "key", "users", "value")

    def __init__(self, key: K, value: T) -> None:
        self.key = key
        self.value = value
        self.users = 1  # the checkout that built it
        self.evicted = False  # out of the cache: closed when `users` falls to 0

    def __repr__(self) -> str:  # the key may hold credentials (a proxy URL): not shown
        return f"<Route users={self.users} evicted={self.evicted}>"


class RouteCache(Mapping[K, T]):
    """A bounded LRU of per-proxy routes with in-use counts; thread-safe, I/O-free.

    ``route, stale = cache.checkout(key, make)`` is one more user of the route for
    `key` (built by `make()` on a miss); ``cache.checkin(route)`` is one less.  Every
    value that must be closed is handed back exactly once: `stale` from `checkout`
    (routes evicted while idle, or a value built in vain because another thread built
    the same route first), the return value of `checkin` (an evicted route's last
    user), or `drain()`.  As a `Mapping` it reads the cached values by key (a snapshot
    when iterated).
    """

    def __init__(self, size: int, *, setting: str = "size") -> None:
        if size < 1:
            raise ValueError(f"{setting}={size!r}: expected an integer >= 1")
        self.size = size
        self._lock = threading.Lock()
        self._routes: OrderedDict[K, Route[K, T]] = OrderedDict()
        self._in_use = 0

    def checkout(self, key: K, make: Callable[[], T]) -> tuple[Route[K, T], Sequence[T]]:
        """The route for `key`, one more user on it, and the values now due for closing.

        `make` runs outside the lock: threads rotating over many proxies would otherwise
        queue behind each other's construction.
        """
        with self._lock:
            route = self._routes.get(key)
            if route is not None:
                self._routes.move_to_end(key)
                route.users += 1
                self._in_use += 1
                return route, ()
        value = make()
        with self._lock:
            self._in_use += 1
            route = self._routes.get(key)
            if route is not None:  # another thread built it meanwhile: `value` was never used
                self._routes.move_to_end(key)
                route.users += 1
                return route, (value,)
            route = self._routes[key] = Route(key, value)
            stale: list[T] = []
            while len(self._routes) > self.size:
                _, evicted = self._routes.popitem(last=False)
                evicted.evicted = True
                if not evicted.users:
                    stale.append(evicted.value)
        return route, stale

    def checkin(self, route: Route[K, T]) -> T | None:
        """One user less; returns the value when the route was evicted and is now idle."""
        with self._lock:
            route.users -= 1
            self._in_use -= 1
            if route.users or not route.evicted:
                return None
        return route.value

    def drain(self, *, spare_in_use: bool = False) -> list[T]:
        """Empty the cache; every cached value, for closing the door.  Routes evicted
        earlier and still in use come back from their last `checkin` as usual.

        `spare_in_use`: routes in use now are left out too, and come back from their last
        `checkin` (as evicted ones do), for a door that stays open after a clear (urllib3's
        `clear()`): closing a pool under a request in flight would fail that request.
        """
        with self._lock:
            routes = list(self._routes.values())
            self._routes.clear()
            if spare_in_use:
                for route in routes:
                    route.evicted = True
                routes = [route for route in routes if not route.users]
        return [route.value for route in routes]

    @property
    def in_use(self) -> int:
        """Checkouts not checked in yet (evicted routes included)."""
        return self._in_use

    def __getitem__(self, key: K) -> T:
        return self._routes[key].value

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[K]:
        return iter(self._snapshot())

    def values(self) -> ValuesView[T]:
        return self._snapshot().values()

    def items(self) -> ItemsView[K, T]:
        return self._snapshot().items()

    def _snapshot(self) -> dict[K, T]:
        with self._lock:
            return {key: route.value for key, route in self._routes.items()}

    def __repr__(self) -> str:
        return f"<RouteCache {len(self)}/{self.size} routes, {self._in_use} in use>"


class Closer:
    """One daemon thread running jobs off the request path, in batches.

    `put(job)` only queues (a `SimpleQueue.put`), so it is safe from a weakref
    finalizer; `start()` starts the thread, from ordinary code (a door's constructor):
    starting a thread takes locks a finalizer may interrupt.  After a job arrives the
    thread waits `batch_seconds` and runs everything queued meanwhile: a wake-up per
    job would make every request of a rotating client pay a thread switch.
    """

    def __init__(self, batch_seconds: float = 0.05, name: str = "pharox-closer") -> None:
        self.batch_seconds = batch_seconds
        self.name = name
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, job: Callable[[], object]) -> None:
        """Run `job` on the closer thread (once started); safe from finalizers."""
        self._queue.put(job)

    def start(self) -> None:
        """Start the thread unless it runs (again in a forked child, where it does not)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            if self.batch_seconds > 0:
                time.sleep(self.batch_seconds)
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            for job in jobs:
                try:
                    job()
                except Exception:  # keep running the others
                    logger.warning("a background close or release failed", exc_info=True)
            del jobs, job  # hold nothing (a pool, a lease) while waiting for the next


#: The package's one closer, shared by every door.
CLOSER = Closer()
