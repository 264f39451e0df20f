"""The leasing core: acquire → (send) → report → release, shared by every door."""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import statistics
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from typing import Any, TypeVar
from uuid import UUID

from pharox import (
    AcquireEventPayload,
    HealthCheckResult,
    InMemoryStorage,
    IStorage,
    Lease,
    PharoxError,
    Proxy,
    ProxyFilters,
    ProxyManager,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)

from .errors import ConfigurationError, NoProxyAvailable
from .filters import ProtocolFilter, with_protocols
from .health import BENCHED, HealthPolicy, Verdict, strikes_from_records
from .lease import LeaseHandle, PoolHealth, ProxyLease, _Endpoint
from .settings import (
    PharoxSettings,
    ProxySpec,
    SettingsSource,
    describe_filters,
    parse_proxy,
)

logger = logging.getLogger("pharox_integrations")

T = TypeVar("T")

#: Protocols each client can speak through a proxy (doors pass one of these).
HTTP_PROTOCOLS = frozenset({ProxyProtocol.HTTP, ProxyProtocol.HTTPS})
ALL_PROTOCOLS = frozenset(ProxyProtocol)

_REVIVED = "revived after cool-down"
_RACE_RETRIES = 8  # ProxyUnavailableError races retried at once before waiting
_SESSIONS_MAX = 10_000
_DEFAULT_CONSUMER = ProxyManager.DEFAULT_CONSUMER_NAME


_DOUBLE = struct.Struct("d")


class _ProxyState:
    """Per-proxy health memory of this process (bounded: one per proxy).

    Slotted, with latencies packed as doubles in a `bytearray` ring: a broker keeps
    one per proxy for as long as it runs, and each object the garbage collector tracks
    is walked again by every full collection (a dataclass and a deque per proxy made a
    10,000-proxy pool's first lap cost twice what later laps do; an `array` is tracked,
    a `bytearray` is not).
    """

    __slots__ = (
        "_lat",
        "_next",
        "bans",
        "benched",
        "endpoint",
        "errors",
        "failures",
        "last_flush",
        "requests",
        "revived",
        "successes",
    )

    WINDOW = 64  # latencies kept

    def __init__(self, last_flush: float = 0.0) -> None:
        self.endpoint: _Endpoint | None = None  # what clients need of the proxy, once leased here
        self.failures = 0  # in a row
        self.requests = 0
        self.successes = 0
        self.bans = 0
        self.errors = 0
        self.benched = False
        self.revived = False  # came back from a cool-down; first success writes a record
        self.last_flush = last_flush
        self._lat = bytearray()  # up to WINDOW doubles
        self._next = 0  # where the next latency goes once the ring is full

    def add_latency(self, ms: float) -> None:
        if len(self._lat) < _DOUBLE.size * self.WINDOW:
            self._lat += _DOUBLE.pack(ms)
        else:
            _DOUBLE.pack_into(self._lat, _DOUBLE.size * self._next, ms)
            self._next = (self._next + 1) % self.WINDOW

    def kept(self) -> int:
        """How many latencies are kept."""
        return len(self._lat) // _DOUBLE.size

    def latencies(self, last: int | None = None) -> list[float]:
        """Kept latencies, oldest first (the `last` ones only, when given)."""
        values = [v for (v,) in _DOUBLE.iter_unpack(self._lat)]
        cut = self._next
        ordered = values[cut:] + values[:cut]
        return ordered if last is None else ordered[-last:]

    def clear_latencies(self) -> None:
        del self._lat[:]
        self._next = 0


class LeaseBroker:
    """Leases proxies from a `pharox.ProxyManager`, judges their health, brings them back.

    Thread-safe.  Every door calls `acquire` (or `acquire_async`), `report` and
    `release`; policy lives here so no door has to decide anything.
    """

    def __init__(
        self,
        manager: ProxyManager,
        *,
        pool: str = "default",
        consumer: str | None = None,
        selector: SelectorStrategy | str | None = SelectorStrategy.ROUND_ROBIN,
        filters: ProxyFilters | None = None,
        lease_seconds: int = 300,
        policy: HealthPolicy | None = None,
        acquire_timeout: float = 30.0,
        storage_blocks: bool | None = None,
        revive_scan_seconds: float = 5.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ConfigurationError(f"lease_seconds={lease_seconds!r}: expected an integer > 0")
        if acquire_timeout < 0:
            raise ConfigurationError(f"acquire_timeout={acquire_timeout!r}: expected a number >= 0")
        self.lease_manager = manager
        self.storage: IStorage = manager._storage  # pharox exposes no public accessor
        self.pool = pool
        self.consumer = consumer
        self.selector = SelectorStrategy(selector) if selector else SelectorStrategy.ROUND_ROBIN
        self.filters = filters
        self.lease_seconds = int(lease_seconds)
        self.policy = policy or HealthPolicy()
        self.acquire_timeout = float(acquire_timeout)
        self.storage_blocks = _storage_blocks(self.storage) if storage_blocks is None else storage_blocks
        self.revive_scan_seconds = revive_scan_seconds
        self._lock = threading.RLock()
        self._held: set[ProxyLease] = set()
        self._endpoints: dict[UUID, _Endpoint] = {}  # of proxies added here, until first leased
        self._states: dict[UUID, _ProxyState] = {}
        self._sessions: OrderedDict[tuple[str, str], UUID] = OrderedDict()
        self._revivals: list[tuple[float, UUID, str]] = []  # (wall time, proxy id, pool) heap
        self._last_scan: dict[str, float] = {}
        self._consumer_ready = consumer is None
        self._default_consumer_ready = False
        self._filter_cache: dict[tuple[int, int], tuple[Any, Any, ProxyFilters | None]] = {}
        self._last_filters: tuple[Any, Any, ProxyFilters | None] = (object(), object(), None)
        self._closed = False
        # The storage's find-and-lease in one step (ours have it), for the common acquire.
        one_step = getattr(self.storage, "acquire_lease", None)
        self._one_step: Callable[..., Lease | LeaseHandle | None] | None = one_step if callable(one_step) else None
        self.counters: dict[str, int] = {
            "acquired": 0,
            "released": 0,
            "bans": 0,
            "failures": 0,
            "benched": 0,
            "revived": 0,
            "no_proxy_available": 0,
            "races": 0,
        }
        self.peak_held = 0  # most leases handed out at once
        self._passing = 0  # leases held for a moment so the selector passes a tried proxy

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_proxies(
        cls,
        proxies: Iterable[str | ProxySpec],
        *,
        pool: str = "default",
        storage: IStorage | str | None = None,
        max_concurrency: int | None = None,
        **kwargs: Any,
    ) -> LeaseBroker:
        """The embedded default: a (memory) storage seeded with `proxies`."""
        from .storage import storage_from_url

        specs = [
            p if isinstance(p, ProxySpec) else parse_proxy(p, where=f"proxies[{i}]") for i, p in enumerate(proxies)
        ]
        store = storage_from_url(storage or "memory://") if not isinstance(storage, IStorage) else storage
        broker = cls(ProxyManager(store), pool=pool, **kwargs)
        broker.add_proxies(specs, max_concurrency=max_concurrency)
        return broker

    @classmethod
    def from_settings(cls, source: SettingsSource | Mapping[str, Any] | PharoxSettings | None = None) -> LeaseBroker:
        """Build from `PHAROX_*` keys of a dict, Scrapy `Settings` or (None) the environment."""
        settings = source if isinstance(source, PharoxSettings) else PharoxSettings.from_mapping(source)
        if settings.broker:
            return _load_broker(settings.broker) if isinstance(settings.broker, str) else _as_broker(settings.broker)
        from .storage import storage_from_url

        storage = storage_from_url(settings.storage_url)
        broker = cls(
            ProxyManager(storage),
            pool=settings.pool,
            consumer=settings.consumer,
            selector=settings.selector,
            filters=settings.filters,
            lease_seconds=settings.lease_seconds,
            acquire_timeout=settings.acquire_timeout,
            policy=HealthPolicy(
                ban_codes=frozenset(settings.ban_codes),
                max_failures=settings.max_failures,
                slow_ms=settings.slow_ms,
                backoff_base=settings.backoff_base,
                backoff_cap=settings.backoff_cap,
            ),
        )
        if settings.proxies:
            broker.add_proxies(settings.proxies, max_concurrency=settings.max_concurrency)
        return broker

    # ------------------------------------------------------------------ pool management

    def _pool_record(self, name: str, *, create: bool = False) -> ProxyPool | None:
        finder = getattr(self.storage, "get_pool_by_name", None)
        if callable(finder):
            found: ProxyPool | None = finder(name)
        else:
            found = next((p for p in self.storage.list_pools() if p.name == name), None)
        if found is None and create:
            found = ProxyPool(name=name)
            self.storage.save_pool(found)
        return found

    def pools(self) -> list[str]:
        return sorted(p.name for p in self.storage.list_pools())

    def proxies(self, pool: str | None = None) -> list[Proxy]:
        """Every proxy of `pool` (a copy, from the storage)."""
        record = self._pool_record(pool or self.pool)
        if record is None:
            raise self._unknown_pool(pool or self.pool)
        return list(self.storage.list_proxies(str(record.id)))

    def add_proxies(
        self,
        proxies: Iterable[str | ProxySpec],
        *,
        pool: str | None = None,
        max_concurrency: int | None = None,
        status: ProxyStatus = ProxyStatus.ACTIVE,
        **fields: Any,
    ) -> list[Proxy]:
        """Add proxies to a pool (created if missing); entries already there are skipped.

        Idempotent, so every process of a fleet may seed the same list at start-up.
        """
        name = pool or self.pool
        record = self._pool_record(name, create=True)
        assert record is not None
        existing = {_identity(p) for p in self.storage.list_proxies(str(record.id))}
        new: list[Proxy] = []
        for i, entry in enumerate(proxies):
            spec = entry if isinstance(entry, ProxySpec) else parse_proxy(entry, where=f"proxies[{i}]")
            if spec.identity in existing:
                continue
            existing.add(spec.identity)
            credentials = None
            if spec.username is not None:
                credentials = {"user": spec.username, "password": spec.password or ""}
            new.append(
                Proxy(
                    host=spec.host,
                    port=spec.port,
                    protocol=spec.protocol,
                    pool_id=record.id,
                    status=status,
                    credentials=credentials,
                    max_concurrency=max_concurrency,
                    **fields,
                )
            )
        if new:
            self.storage.add_proxies_bulk(new)
            # What clients need of each proxy, made now rather than on its first
            # lease (where it cost ~30 µs with cold caches).
            endpoints = {proxy.id: _Endpoint.of(proxy) for proxy in new}
            with self._lock:
                self._endpoints.update(endpoints)
        return new

    def remove_proxy(self, proxy: str | UUID | Proxy, *, pool: str | None = None) -> bool:
        """Remove a proxy by id, `Proxy` or URL; False when it was not there."""
        target_id: UUID | None = None
        if isinstance(proxy, Proxy):
            target_id = proxy.id
        elif isinstance(proxy, UUID):
            target_id = proxy
        else:
            try:
                target_id = UUID(str(proxy))
            except ValueError:
                spec = parse_proxy(str(proxy), where="remove_proxy")
                match = [p for p in self.proxies(pool) if _identity(p) == spec.identity]
                if not match:
                    return False
                target_id = match[0].id
        try:
            self.storage.delete_proxy(str(target_id))
        except PharoxError:
            return False
        with self._lock:
            self._endpoints.pop(target_id, None)
            self._states.pop(target_id, None)
        return True

    def purge(
        self,
        statuses: Collection[ProxyStatus | str] = (ProxyStatus.BANNED, ProxyStatus.INACTIVE),
        *,
        pool: str | None = None,
    ) -> int:
        """Remove the proxies of `pool` whose status is in `statuses`; returns how many."""
        wanted = {ProxyStatus(s) for s in statuses}
        removed = 0
        for proxy in self.proxies(pool):
            if ProxyStatus(proxy.status) in wanted and self.remove_proxy(proxy.id):
                removed += 1
        return removed

    def health(self, pool: str | None = None) -> PoolHealth:
        """Pool counts from the storage plus this process's request statistics."""
        name = pool or self.pool
        proxies = self.proxies(name)
        by_status = {s: 0 for s in ProxyStatus}
        leased = 0
        for p in proxies:
            by_status[ProxyStatus(p.status)] += 1
            leased += p.current_leases > 0
        ids = {p.id for p in proxies}
        with self._lock:
            states = [s for pid, s in self._states.items() if pid in ids]
            held = sum(1 for lease in self._held if lease.pool == name)
            latencies = [x for s in states for x in s.latencies()]
        requests = sum(s.requests for s in states)
        successes = sum(s.successes for s in states)
        return PoolHealth(
            pool=name,
            total=len(proxies),
            active=by_status[ProxyStatus.ACTIVE],
            banned=by_status[ProxyStatus.BANNED],
            inactive=by_status[ProxyStatus.INACTIVE],
            slow=by_status[ProxyStatus.SLOW],
            leased=leased,
            held_here=held,
            requests=requests,
            success_rate=successes / requests if requests else None,
            median_latency_ms=statistics.median(latencies) if latencies else None,
        )

    def proxy_stats(self, proxy_id: UUID) -> dict[str, Any]:
        """This process's counters for one proxy (requests, successes, bans, failures, median latency)."""
        with self._lock:
            state = self._states.get(proxy_id) or _ProxyState()
            lat = state.latencies()
        return {
            "requests": state.requests,
            "successes": state.successes,
            "bans": state.bans,
            "failures": state.errors,
            "median_latency_ms": statistics.median(lat) if lat else None,
        }

    # ------------------------------------------------------------------ acquire

    def acquire(
        self,
        url: str | None = None,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
        timeout: float | None = None,
        avoid: Collection[UUID] = (),
    ) -> ProxyLease:
        """Lease a proxy, waiting with backoff up to the acquire timeout.

        `url` is the target (kept for future per-host policies); `protocols` limits
        the proxies to those the calling client can speak; `session` keeps one proxy
        for a sticky session while it stays healthy.
        """
        if session is None and not avoid:
            fast = self.acquire_nowait(pool=pool, filters=filters, protocols=protocols)
            if fast is not None:
                return fast
        steps = self._acquire_steps(pool, filters, session, protocols, timeout, avoid)
        try:
            while True:
                time.sleep(next(steps))
        except StopIteration as done:
            result: ProxyLease = done.value
            return result

    async def acquire_async(
        self,
        url: str | None = None,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
        timeout: float | None = None,
        avoid: Collection[UUID] = (),
    ) -> ProxyLease:
        """`acquire` for asyncio: waits with `asyncio.sleep`, blocking storages off the loop."""
        if session is None and not avoid and not self.storage_blocks:
            fast = self.acquire_nowait(pool=pool, filters=filters, protocols=protocols)
            if fast is not None:
                return fast
        steps = self._acquire_steps(pool, filters, session, protocols, timeout, avoid)
        while True:
            if self.storage_blocks:
                finished, value = await self._step_off_loop(steps)
            else:
                finished, value = _step(steps)
            if finished:
                return value  # type: ignore[no-any-return]
            await asyncio.sleep(value)

    async def _step_off_loop(self, steps: Generator[float, None, ProxyLease]) -> tuple[bool, Any]:
        """One acquisition step in a worker thread, cancellation-safe.

        Cancelling the awaiting task cannot stop the thread: a lease it obtains after
        (or while) the task was cancelled is released instead of being lost.
        """
        lock = threading.Lock()
        state: dict[str, Any] = {"cancelled": False, "result": None}

        def work() -> tuple[bool, Any]:
            result = _step(steps)
            with lock:
                orphan = state["cancelled"]
                state["result"] = result
            if orphan and result[0]:
                self.release(result[1])
            return result

        try:
            return await asyncio.to_thread(work)
        except asyncio.CancelledError:
            with lock:
                state["cancelled"] = True
                result = state["result"]
            if result is not None and result[0]:  # finished, but never delivered
                threading.Thread(target=self.release, args=(result[1],), daemon=True).start()
            raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.storage_blocks:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def acquire_nowait(
        self,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
    ) -> ProxyLease | None:
        """One attempt without waiting: a lease, or None when no proxy is free right now
        (or the broker is closed: `acquire` says why).

        It calls the storage on this thread: an event loop should use it only when
        `storage_blocks` is false.  The first attempt of every common acquire (no
        session, nothing to avoid), without the waiting generator.
        """
        if self._closed:
            return None  # the full path says why
        name = pool or self.pool
        effective = self._effective_filters(filters if filters is not None else self.filters, protocols)
        self._revive_due(name)
        self._ensure_consumer()
        try:
            found = self._acquire_once(name, effective)
        except ProxyUnavailableError:
            return None
        return None if found is None else self._wrap(found, name, None)

    def _acquire_steps(
        self,
        pool: str | None,
        filters: ProxyFilters | None,
        session: str | None,
        protocols: Collection[ProxyProtocol | str] | None,
        timeout: float | None,
        avoid: Collection[UUID] = (),
    ) -> Generator[float, None, ProxyLease]:
        """One acquisition as a generator of waits, shared by the sync and async forms."""
        if self._closed:
            raise RuntimeError("LeaseBroker is closed")
        name = pool or self.pool
        wanted = filters if filters is not None else self.filters
        effective = self._effective_filters(wanted, protocols)
        deadline = time.monotonic() + (self.acquire_timeout if timeout is None else timeout)
        delay = 0.005
        while True:
            self._revive_due(name)
            lease = self._try_acquire(name, effective, session, avoid)
            if lease is not None:
                return lease
            now = time.monotonic()
            if now >= deadline:
                with self._lock:
                    self.counters["no_proxy_available"] += 1
                raise self.explain(name, wanted, protocols)
            self._revive_due(name, scan=True)
            wait = min(delay * (0.5 + random.random()), deadline - now)
            delay = min(delay * 2, 0.25)
            yield max(wait, 0.0)

    def _effective_filters(
        self, filters: ProxyFilters | None, protocols: Collection[ProxyProtocol | str] | None
    ) -> ProxyFilters | None:
        """Caller filters plus the protocol restriction, built once per combination
        (a pydantic model per request would cost more than the memory lease itself)."""
        if protocols is None:
            return filters
        last = self._last_filters
        if last[0] is filters and last[1] is protocols:
            return last[2]
        # Keyed by identity: callers pass the same filters and protocol set (a module
        # constant) on every request; the kept references make a stale id impossible.
        key = (id(filters), id(protocols))
        cached = self._filter_cache.get(key)
        if cached is None or cached[0] is not filters or cached[1] is not protocols:
            allowed = frozenset(ProxyProtocol(p) for p in protocols)
            cached = (filters, protocols, with_protocols(filters, allowed))
            if len(self._filter_cache) >= 256:
                self._filter_cache.clear()
            self._filter_cache[key] = cached
        self._last_filters = cached  # a door passes the same pair on every request
        return cached[2]

    def _ensure_consumer(self) -> None:
        if not self._consumer_ready and self.consumer:
            self.storage.ensure_consumer(self.consumer)
            self._consumer_ready = True

    def _try_acquire(
        self, pool: str, filters: ProxyFilters | None, session: str | None, avoid: Collection[UUID] = ()
    ) -> ProxyLease | None:
        self._ensure_consumer()
        if session is not None:
            try:
                sticky = self._try_sticky(pool, filters, session)
            except _StickyBusy:
                return None  # sticky means this proxy: wait for a free slot on it
            if sticky is not None:
                return sticky
        skipped: list[ProxyLease] = []
        chosen: ProxyLease | None = None
        races = 0
        # A proxy in `avoid` (already tried for this request) is passed over while the
        # pool has others; held meanwhile so the selector moves on, released after (also
        # when the storage fails), and not counted as handed out.
        try:
            while chosen is None and races < _RACE_RETRIES and len(skipped) <= len(avoid):
                try:
                    lease = self._acquire_once(pool, filters)
                except ProxyUnavailableError:
                    # find and create_lease are separate steps in pharox's storages; the
                    # proxy was taken in between.  Not an error for our callers: try again.
                    races += 1
                    with self._lock:
                        self.counters["races"] += 1
                    continue
                if lease is None:
                    break
                if lease.proxy_id in avoid and len(skipped) < len(avoid):
                    skipped.append(self._wrap(lease, pool, session, passing=True))
                else:
                    chosen = self._wrap(lease, pool, session)
            if chosen is None and skipped:
                chosen = skipped.pop(0)  # only tried proxies are left: better than none
                with self._lock:
                    self._passing -= 1
                    self._note_peak()
        finally:
            if skipped:
                with self._lock:
                    self._passing -= len(skipped)
                    gone = [extra for extra in skipped if self._unhold(extra)]
                for extra in gone:
                    self._give_back(extra)
        return chosen

    def _acquire_once(self, pool: str, filters: ProxyFilters | None) -> Lease | LeaseHandle | None:
        """One acquisition attempt, through pharox's manager or the storage's one-step path.

        A storage with `acquire_lease` (our SQL storage) finds and leases in one
        transaction, where pharox's manager needs several and races between them.  The
        manager's acquire callbacks are still called, so pharox's observability holds.
        """
        watched = bool(getattr(self.lease_manager, "_acquire_callbacks", True))
        one_step = self._one_step
        if one_step is None:
            if watched:
                return self.lease_manager.acquire_proxy(
                    pool,
                    consumer_name=self.consumer,
                    duration_seconds=self.lease_seconds,
                    filters=filters,
                    selector=self.selector,
                )
            one_step = self._find_and_lease
        consumer = self.consumer or _DEFAULT_CONSUMER
        if not watched:
            found: Lease | LeaseHandle | None = one_step(pool, consumer, self.lease_seconds, filters, self.selector)
            return found
        started = datetime.now(timezone.utc)
        lease = one_step(pool, consumer, self.lease_seconds, filters, self.selector)
        if lease is not None and not isinstance(lease, Lease):
            lease = lease.to_lease()  # the storage's own record: listeners get a pharox Lease
        if getattr(self.lease_manager, "_acquire_callbacks", None):
            completed = datetime.now(timezone.utc)
            self.lease_manager._notify_acquire(
                AcquireEventPayload(
                    lease=lease,
                    pool_name=pool,
                    consumer_name=consumer,
                    filters=filters,
                    selector=self.selector,
                    started_at=started,
                    completed_at=completed,
                    duration_ms=max(0, int((completed - started).total_seconds() * 1000)),
                    pool_stats=self.storage.get_pool_stats(pool),
                )
            )
        return lease

    def _find_and_lease(
        self, pool: str, consumer: str, duration: int, filters: ProxyFilters | None, selector: SelectorStrategy
    ) -> Lease | None:
        """pharox's manager steps without its event payloads and pool-stats calls, used
        when nobody registered a callback to receive them (they cost more than the
        lease itself on a memory storage)."""
        if consumer == _DEFAULT_CONSUMER and not self._default_consumer_ready:
            self.storage.ensure_consumer(consumer)
            self._default_consumer_ready = True
        self.storage.cleanup_expired_leases()
        proxy = self.storage.find_available_proxy(pool, filters, selector)
        return self.storage.create_lease(proxy, consumer, duration) if proxy is not None else None

    def _try_sticky(self, pool: str, filters: ProxyFilters | None, session: str) -> ProxyLease | None:
        key = (pool, session)
        with self._lock:
            proxy_id = self._sessions.get(key)
        if proxy_id is None:
            return None
        try:
            proxy = self.storage.get_proxy(str(proxy_id))
        except PharoxError:
            proxy = None
        if proxy is None or proxy.status != ProxyStatus.ACTIVE or (filters and not filters.matches(proxy)):
            with self._lock:
                self._sessions.pop(key, None)
            return None
        try:
            lease = self.storage.create_lease(
                proxy, self.consumer or _DEFAULT_CONSUMER, self.lease_seconds
            )
        except ProxyUnavailableError:
            raise _StickyBusy() from None
        return self._wrap(lease, pool, session, proxy)

    def _wrap(
        self,
        lease: Lease | LeaseHandle,
        pool: str,
        session: str | None,
        proxy: Proxy | None = None,
        *,
        passing: bool = False,
    ) -> ProxyLease:
        pid = lease.proxy_id
        # The proxy's health record carries its endpoint: one lookup (of a UUID, hashed
        # in Python) per lease.  Read without the lock: a dict read is atomic.
        state = self._states.get(pid)
        endpoint = None if state is None else state.endpoint
        if endpoint is None:
            endpoint = self._endpoints.get(pid)  # made when the proxy was added here
            if endpoint is None:
                # Only the endpoint is kept, not the proxy: a storage that can show its
                # stored proxy without a copy (memory) spares one model copy per proxy.
                peek = getattr(self.storage, "peek_proxy", None)
                found = proxy or (peek(pid) if peek is not None else None) or self.storage.get_proxy(str(pid))
                endpoint = _Endpoint.of(found)
        held = ProxyLease(lease, endpoint, pool, session)
        with self._lock:
            self._held.add(held)
            self.counters["acquired"] += 1
            if passing:
                self._passing += 1
            else:
                self._note_peak()
            if state is None or state.endpoint is None:
                state = self._states.get(pid)
                if state is None:
                    state = self._states[pid] = _ProxyState(last_flush=held.started)
                state.endpoint = endpoint
                self._endpoints.pop(pid, None)  # kept on the state from now on
            if state.benched:
                state.benched = False  # someone revived it, or it would not be leased
                state.revived = True
                state.failures = 0
            held._state = state  # what `report` updates, without looking it up again
            if session is not None:
                self._sessions[(pool, session)] = pid
                self._sessions.move_to_end((pool, session))
                while len(self._sessions) > _SESSIONS_MAX:
                    self._sessions.popitem(last=False)
        return held

    # ------------------------------------------------------------------ report

    def report(
        self,
        lease: ProxyLease,
        status_code: int | None = None,
        error: BaseException | None = None,
        latency_ms: float | None = None,
        *,
        response: Any = None,
        verdict: Verdict | None = None,
    ) -> Verdict:
        """Turn one answer or error into a verdict and apply it to the proxy.

        Status changes reach the storage at once; routine successes only update this
        process's counters and are written at most every `policy.flush_seconds`.
        """
        return self._conclude(lease, status_code, error, latency_ms, response, verdict, release=False)

    def finish(
        self,
        lease: ProxyLease,
        status_code: int | None = None,
        error: BaseException | None = None,
        latency_ms: float | None = None,
        *,
        response: Any = None,
        verdict: Verdict | None = None,
    ) -> Verdict:
        """`report` then `release`, as every door does when a request ends, in one trip
        through the broker's lock.  The proxy goes back even when the report fails."""
        return self._conclude(lease, status_code, error, latency_ms, response, verdict, release=True)

    def _conclude(
        self,
        lease: ProxyLease,
        status_code: int | None,
        error: BaseException | None,
        latency_ms: float | None,
        response: Any,
        verdict: Verdict | None,
        *,
        release: bool,
    ) -> Verdict:
        try:
            if latency_ms is None:
                latency_ms = lease.elapsed_ms()
            if verdict is None:
                verdict = self.policy.judge(status_code, error, response)  # a ban detector may raise
        except BaseException:
            if release:
                self.release(lease)
            raise
        lease.verdict = verdict
        lease.reported = True
        with self._lock:
            change = self._record(lease, verdict, latency_ms)
            first = release and self._unhold(lease)
        try:
            if change is not None:
                self._apply(lease, change, status_code, error, latency_ms)
        finally:
            if first:
                self._give_back(lease)
        return verdict

    def _record(self, lease: ProxyLease, verdict: Verdict, latency_ms: float) -> ProxyStatus | None:
        """Count the outcome against the proxy (caller holds the lock).  Returns the status
        to write: a bench, ACTIVE for a periodic flush of successes, or None."""
        now = time.monotonic()
        new_status: ProxyStatus | None = None
        state: _ProxyState | None = lease._state
        if state is None:
            state = self._states.get(lease.proxy_id)
            if state is None:
                state = self._states[lease.proxy_id] = _ProxyState(last_flush=now)
        state.requests += 1
        if verdict is Verdict.BAN:
            state.bans += 1
            self.counters["bans"] += 1
            if not state.benched:
                new_status = ProxyStatus.BANNED
        elif verdict is Verdict.FAILURE:
            state.errors += 1
            state.failures += 1
            self.counters["failures"] += 1
            if not state.benched and state.failures >= self.policy.max_failures:
                new_status = ProxyStatus.INACTIVE
        else:
            state.successes += 1
            state.failures = 0
            state.add_latency(latency_ms)
            slow = self.policy.slow_ms
            window = self.policy.slow_window
            if (
                slow is not None
                and not state.benched
                and state.kept() >= window
                and statistics.median(state.latencies(window)) > slow
            ):
                new_status = ProxyStatus.SLOW
            elif state.revived or now - state.last_flush >= self.policy.flush_seconds:
                state.revived = False
                state.last_flush = now
                return None if state.benched else ProxyStatus.ACTIVE
        if new_status is not None:
            state.benched = True
            state.failures = 0
            state.clear_latencies()
        return new_status

    def _apply(
        self,
        lease: ProxyLease,
        status: ProxyStatus,
        status_code: int | None,
        error: BaseException | None,
        latency_ms: float,
    ) -> None:
        if status is ProxyStatus.ACTIVE:
            self._write(lease.proxy_id, lease.protocol, ProxyStatus.ACTIVE, int(latency_ms), status_code, None)
        else:
            self._bench(lease, status, status_code, error)

    def _write(
        self,
        proxy_id: UUID,
        protocol: ProxyProtocol | str,
        status: ProxyStatus,
        latency_ms: int,
        status_code: int | None,
        message: str | None,
    ) -> Proxy | None:
        result = HealthCheckResult(
            proxy_id=proxy_id,
            status=status,
            latency_ms=max(0, latency_ms),
            protocol=protocol,
            status_code=status_code,
            error_message=message,
        )
        return self.storage.apply_health_check_result(result)

    def _bench(
        self, lease: ProxyLease, status: ProxyStatus, status_code: int | None, error: BaseException | None
    ) -> None:
        pid = lease.proxy_id
        strikes = 1 + strikes_from_records(self.storage.list_health_records(pid, limit=32))
        reason = f"HTTP {status_code}" if status_code is not None else type(error).__name__ if error else status.value
        message = f"{status.value}: {reason}"
        updated = self._write(pid, lease.protocol, status, int(lease.elapsed_ms()), status_code, message)
        benched_at = updated.checked_at if updated is not None else datetime.now(timezone.utc)
        cooldown = self.policy.cooldown(strikes, pid, benched_at)
        with self._lock:
            self.counters["benched"] += 1
            heapq.heappush(self._revivals, (benched_at.timestamp() + cooldown, pid, lease.pool))
        logger.warning(
            "proxy %(proxy)s %(status)s after %(reason)s; back in %(cooldown).0f s (strike %(strikes)d)",
            {
                "proxy": lease.safe_url,
                "status": status.value,
                "reason": reason,
                "cooldown": cooldown,
                "strikes": strikes,
            },
        )

    # ------------------------------------------------------------------ revival

    def _revive_due(self, pool: str, *, scan: bool = False) -> None:
        """Bring back proxies whose cool-down is over.

        Proxies this process benched are in a heap (O(1) when nothing is due).  Proxies
        benched by another process sharing the storage are found by a rate-limited scan
        of the benched ones, their return time derived from the storage's records.
        """
        if not scan and not (self._revivals and self._revivals[0][0] <= time.time()):
            # The common case (every acquire), decided without the lock (reads of a list
            # and a dict are atomic in CPython; a stale answer only delays a revival to
            # the next call), and without a wall-clock read while nothing is benched.
            last = self._last_scan.get(pool)
            if last is not None and time.monotonic() - last < self.revive_scan_seconds:
                return
        now = time.time()
        mono = time.monotonic()
        due: list[UUID] = []
        with self._lock:
            while self._revivals and self._revivals[0][0] <= now:
                _, pid, _pool = heapq.heappop(self._revivals)
                due.append(pid)
            last = self._last_scan.get(pool)
            interval = 1.0 if scan else self.revive_scan_seconds
            do_scan = last is None or mono - last >= interval
            if do_scan:
                self._last_scan[pool] = mono
        for pid in due:
            self._revive(pid, expected=None)
        if do_scan:
            for proxy, back_at in self._benched(pool, skip_own=True):
                if back_at <= now:
                    self._revive(proxy.id, expected=proxy)

    def _benched(self, pool: str, *, skip_own: bool = False) -> list[tuple[Proxy, float]]:
        """Benched proxies of `pool` with the wall time each comes back.

        `skip_own` leaves out those this process benched (their time is in the heap).
        """
        finder = getattr(self.storage, "list_proxies_by_status", None)
        if callable(finder):
            benched: list[Proxy] = list(finder(pool, BENCHED))
        else:
            record = self._pool_record(pool)
            if record is None:
                return []
            benched = [p for p in self.storage.list_proxies(str(record.id)) if p.status in BENCHED]
        if skip_own:
            with self._lock:
                own = {pid for pid, state in self._states.items() if state.benched}
            benched = [p for p in benched if p.id not in own]
        out = []
        for proxy in benched:
            strikes = max(1, strikes_from_records(self.storage.list_health_records(proxy.id, limit=32)))
            out.append(
                (proxy, proxy.checked_at.timestamp() + self.policy.cooldown(strikes, proxy.id, proxy.checked_at))
            )
        return out

    def _revive(self, proxy_id: UUID, expected: Proxy | None) -> None:
        try:
            current = self.storage.get_proxy(str(proxy_id))
        except PharoxError:
            return
        if current.status not in BENCHED:
            return  # another process revived it already
        if expected is not None and current.checked_at != expected.checked_at:
            return  # benched again since we looked
        self._write(current.id, current.protocol, ProxyStatus.ACTIVE, 0, None, _REVIVED)
        with self._lock:
            self.counters["revived"] += 1
            state = self._states.get(proxy_id)
            if state is not None:
                state.benched = False
                state.revived = True
                state.failures = 0
        logger.info("proxy %(proxy)s back in the pool after its cool-down", {"proxy": _Endpoint.of(current).safe_url})

    # ------------------------------------------------------------------ release

    def _note_peak(self) -> None:
        """Caller holds the lock.  Leases held only while passing over tried proxies
        are not handed out, so they do not count."""
        handed = len(self._held) - self._passing
        if handed > self.peak_held:
            self.peak_held = handed

    def release(self, lease: ProxyLease) -> bool:
        """Return the proxy to the pool.  Idempotent: True only the first time."""
        if lease.released:  # only ever goes from False to True: no lock needed to see it
            return False
        with self._lock:
            first = self._unhold(lease)
        if first:
            self._give_back(lease)
        return first

    def _unhold(self, lease: ProxyLease) -> bool:
        """Mark `lease` released (caller holds the lock); False when it already was."""
        if lease.released:
            return False
        lease.released = True
        self._held.discard(lease)
        self.counters["released"] += 1
        return True

    def _give_back(self, lease: ProxyLease) -> None:
        if getattr(self.lease_manager, "_release_callbacks", True):
            self.lease_manager.release_proxy(lease.lease)
            return
        # The manager's steps without the event payload nobody listens to.
        handle = lease._handle
        if isinstance(handle, Lease):
            handle.released_at = handle.released_at or datetime.now(timezone.utc)
        self.storage.release_lease(handle)  # type: ignore[arg-type]  # or the storage's own record

    async def report_async(self, lease: ProxyLease, *args: Any, **kwargs: Any) -> Verdict:
        return await self._run(lambda: self.report(lease, *args, **kwargs))

    async def release_async(self, lease: ProxyLease) -> bool:
        return await self._run(self.release, lease)

    @contextmanager
    def lease(
        self,
        url: str | None = None,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
    ) -> Iterator[ProxyLease]:
        """`with broker.lease(url) as lease:` — released on exit, whatever happens.

        Report inside the block (`broker.report(lease, status_code=...)`); an exception
        escaping the block without a report is reported as an error.
        """
        held = self.acquire(url, pool=pool, filters=filters, session=session, protocols=protocols)
        try:
            yield held
        except BaseException as exc:
            if not held.reported and isinstance(exc, Exception):
                self.report(held, error=exc)
            raise
        finally:
            self.release(held)

    @asynccontextmanager
    async def lease_async(
        self,
        url: str | None = None,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        session: str | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
    ) -> AsyncIterator[ProxyLease]:
        """Async form of `lease()`; also released when the task is cancelled."""
        held = await self.acquire_async(url, pool=pool, filters=filters, session=session, protocols=protocols)
        try:
            yield held
        except Exception as exc:
            if not held.reported:
                await self.report_async(held, error=exc)
            raise
        finally:
            await asyncio.shield(self.release_async(held))

    @property
    def held(self) -> int:
        """Leases acquired through this broker and not yet released."""
        with self._lock:
            return len(self._held)

    def held_leases(self) -> list[ProxyLease]:
        with self._lock:
            return list(self._held)

    def close(self) -> int:
        """Release every lease still held; returns how many.  Safe to call twice."""
        self._closed = True
        released = 0
        for held in self.held_leases():
            try:
                released += self.release(held)
            except Exception:  # keep releasing the others; the storage logged it
                logger.exception("could not release a lease of %(proxy)s", {"proxy": held.safe_url})
        if released:
            logger.info("released %(n)d lease(s) still held at close", {"n": released})
        return released

    def __copy__(self) -> LeaseBroker:
        return self  # a broker is a shared service (Scrapy copies its settings)

    def __deepcopy__(self, memo: dict[int, Any]) -> LeaseBroker:
        return self

    def __enter__(self) -> LeaseBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<LeaseBroker pool={self.pool!r} storage={type(self.storage).__name__} "
            f"selector={self.selector.value} held={self.held}>"
        )

    # ------------------------------------------------------------------ explanations

    def _unknown_pool(self, name: str) -> NoProxyAvailable:
        known = self.pools()
        listed = ", ".join(repr(p) for p in known) if known else "none"
        return NoProxyAvailable(f"pool {name!r} does not exist (pools in this storage: {listed})", pool=name)

    def explain(
        self,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
    ) -> NoProxyAvailable:
        """Why nothing can be leased right now, as the exception to raise."""
        name = pool or self.pool
        record = self._pool_record(name)
        if record is None:
            return self._unknown_pool(name)
        proxies = list(self.storage.list_proxies(str(record.id)))
        speakable = ProtocolFilter(protocols) if protocols is not None else None
        counts: dict[str, int] = {"total": len(proxies)}
        unspeakable: set[str] = set()
        for p in proxies:
            status = ProxyStatus(p.status)
            if speakable is not None and not speakable(p):
                key = "wrong_protocol"
                unspeakable.add(ProxyProtocol(p.protocol).value)
            elif status != ProxyStatus.ACTIVE:
                key = status.value
            elif filters is not None and not filters.matches(p):
                key = "filtered_out"
            elif p.max_concurrency is not None and p.current_leases >= p.max_concurrency:
                key = "leased"
            else:
                key = "available"
            counts[key] = counts.get(key, 0) + 1
        benched_times = [t for _, t in self._benched(name)]
        next_in = max(0.0, min(benched_times) - time.time()) if benched_times else None
        described = describe_filters(filters)
        where = f"pool {name!r}"
        if described:
            where += f" (filters: {described})"
        labels = {
            "banned": "banned",
            "inactive": "inactive",
            "slow": "slow",
            "leased": "leased to capacity",
            "filtered_out": "filtered out",
            "available": "free but taken before we got them",
        }
        parts = [f"{counts[k]} {v}" for k, v in labels.items() if counts.get(k)]
        if counts.get("wrong_protocol"):
            can = ", ".join(sorted(ProxyProtocol(p).value for p in speakable.protocols)) if speakable else ""
            parts.append(
                f"{counts['wrong_protocol']} use a protocol this client cannot speak "
                f"({', '.join(sorted(unspeakable))}; it speaks {can})"
            )
        benched = sum(counts.get(k, 0) for k in ("banned", "inactive", "slow"))
        total = counts["total"]
        if total == 0:
            message = f"{where} has no proxies"
        elif benched == total:
            message = f"all {total} proxies of {where} benched: {', '.join(parts)}"
        else:
            message = f"0 of {total} proxies available in {where}: {', '.join(parts)}"
        if next_in is not None:
            message += f"; next back in {next_in:.0f} s"
        return NoProxyAvailable(message, pool=name, filters=described, counts=counts, next_revival_in=next_in)


class _StickyBusy(Exception):
    """The sticky proxy is at capacity: wait for it rather than switching."""


def _step(steps: Generator[float, None, T]) -> tuple[bool, Any]:
    """Advance an acquisition generator; StopIteration cannot cross a thread future."""
    try:
        return False, next(steps)
    except StopIteration as done:
        return True, done.value


def _identity(proxy: Proxy) -> tuple[str, str, int, str | None, str | None]:
    return ProxySpec.from_proxy(proxy).identity


def _storage_blocks(storage: IStorage) -> bool:
    """Memory storages answer inline; anything else may block on I/O."""
    from .storage import is_memory_storage

    return not (isinstance(storage, InMemoryStorage) or is_memory_storage(storage))


def _load_broker(path: str) -> LeaseBroker:
    from importlib import import_module

    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        obj: Any = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"PHAROX_BROKER={path!r}: cannot import it ({exc}); expected 'package.module.name' of a LeaseBroker"
        ) from None
    return _as_broker(obj, path)


def _as_broker(obj: Any, path: str | None = None) -> LeaseBroker:
    """A ready broker, or what a factory returns."""
    if not isinstance(obj, LeaseBroker) and callable(obj):
        obj = obj()
    if not isinstance(obj, LeaseBroker):
        shown = repr(path) if path is not None else "<object>"
        raise ConfigurationError(
            f"PHAROX_BROKER={shown}: found {type(obj).__name__}; expected a LeaseBroker or a callable returning one"
        )
    return obj


__all__ = ["ALL_PROTOCOLS", "HTTP_PROTOCOLS", "LeaseBroker", "PoolHealth", "ProxyLease"]
