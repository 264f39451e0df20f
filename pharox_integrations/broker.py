"""The leasing core's facade: acquire → (send) → report → release, shared by every door.

`LeaseBroker` holds the configuration and the leases handed out, and delegates each
idea to its own module: `selection` (which proxy), `leases` (the leases handed out:
reported, released), `ledger` (health and revival), `pools` (administration and
explanations), `exchange` (one request's life cycle), `bridge` (waiting off an event
loop), `internals` (what we use of pharox's insides).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Collection, Generator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypedDict
from uuid import UUID

from pharox import (
    IStorage,
    Proxy,
    ProxyFilters,
    ProxyManager,
    ProxyProtocol,
    ProxyStatus,
    SelectorStrategy,
)

from . import bridge, building
from .errors import NoProxyAvailable
from .exchange import CORE_ERRORS, DEFAULT_MAX_MOVES, DoorErrors, Exchange
from .health import HealthPolicy, Verdict
from .internals import storage_of
from .lease import PoolHealth, ProxyLease, ProxyView, _Endpoint
from .leases import HeldLeases
from .ledger import HealthLedger
from .pools import PoolAdmin
from .selection import Selection
from .settings import PharoxSettings, ProxySpec, SettingsSource

if TYPE_CHECKING:
    from typing_extensions import Unpack

logger = logging.getLogger("pharox_integrations")


class LeaseOptions(TypedDict, total=False):
    """The per-request choices, with one meaning in every door."""

    pool: str | None  # the pool to lease from (default: the broker's)
    filters: ProxyFilters | None  # pharox filters (default: the broker's)
    session: str | None  # sticky session key: the same proxy while it stays healthy
    protocols: Collection[ProxyProtocol | str] | None  # what the calling client can speak


class ExchangeOptions(LeaseOptions, total=False):
    max_moves: int | None  # other proxies the request may move to (default: the broker's)
    body: Any  # the request body, for the replay rule
    timeout: float | None  # the caller's own timeout: bounds the wait for a lease
    host: str | None  # the request's host, for a door that has it without a URL string


#: Protocols each client can speak through a proxy (doors pass one of these).
HTTP_PROTOCOLS = frozenset({ProxyProtocol.HTTP, ProxyProtocol.HTTPS})
ALL_PROTOCOLS = frozenset(ProxyProtocol)


class LeaseBroker:
    """Leases proxies from a `pharox.ProxyManager`, judges their health, brings them back.

    Thread-safe.  Every door drives an `exchange()` per request (or calls `acquire`,
    `report` and `release` itself); policy lives in the core so no door decides.
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
        max_moves: int = DEFAULT_MAX_MOVES,
        site_scope: str = "domain",
        site_delay: float = 0.0,
        site_bans_to_bench: int = 3,
        lease_blocks: bool = True,
    ) -> None:
        building.check(lease_seconds=lease_seconds, max_moves=max_moves, acquire_timeout=acquire_timeout)
        self.lease_manager = manager
        self.storage: IStorage = storage_of(manager)
        self.pool = pool
        self.filters = filters
        self.policy = policy or HealthPolicy()
        self.acquire_timeout = float(acquire_timeout)
        self.max_moves = max_moves  # other proxies one request may move to (see Exchange)
        self.storage_blocks = building.storage_blocks(self.storage) if storage_blocks is None else storage_blocks
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "acquired", "released", "bans", "cooldowns", "failures", "benched", "revived",
                "no_proxy_available", "races", "site_bans", "site_cooldowns",
            ),
            0,
        )
        self._lock = threading.RLock()
        endpoints: dict[UUID, _Endpoint] = {}  # of proxies added here, until first leased
        self._closed = False
        self._ledger = HealthLedger(
            self.storage, self.policy, self._lock, self.counters, self._pool_record, revive_scan_seconds
        )
        self.sites = building.site_book(
            self.storage, self.policy, site_scope, site_delay, site_bans_to_bench, self.acquire_timeout
        )
        self._leases = leases = HeldLeases(
            manager, self.storage, self.policy, self._ledger, self.sites, self._lock, self.counters, endpoints
        )
        # Bound once: `report`, `finish` and `release` are on every request's path.
        self._report = leases.report
        self._release = leases.release
        self._pools = PoolAdmin(self.storage, self._lock, self._ledger, endpoints, leases.count, self.sites)
        self._selection = Selection(
            manager,
            self.storage,
            self._pools,
            self._ledger,
            self.sites,
            self._lock,
            leases.wrap,
            leases.release_in_storage,
            leases.release,
            consumer=consumer,
            selector=SelectorStrategy(selector) if selector else SelectorStrategy.ROUND_ROBIN,
            lease_seconds=int(lease_seconds),
            # On a shared storage: slots of a few storage leases, lent locally (blocks.py).
            lease_blocks=lease_blocks,
        )
        leases.remember = self._selection.remember

    @property
    def consumer(self) -> str | None:
        return self._selection.consumer

    @property
    def selector(self) -> SelectorStrategy:
        return self._selection.selector

    @property
    def lease_seconds(self) -> int:
        return self._selection.lease_seconds

    # ------------------------------------------------------------------ builders (see building.py)

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
        return building.from_proxies(cls, proxies, pool, storage, max_concurrency, kwargs)

    @classmethod
    def from_settings(cls, source: SettingsSource | Mapping[str, Any] | PharoxSettings | None = None) -> LeaseBroker:
        """Build from `PHAROX_*` keys of a dict, Scrapy `Settings` or (None) the environment."""
        return building.from_settings(cls, source)

    # ------------------------------------------------------------------ pools (see pools.py)

    def _pool_record(self, name: str) -> Any:
        return self._pools.record(name)

    def pools(self) -> list[str]:
        return self._pools.names()

    def proxies(self, pool: str | None = None) -> list[ProxyView]:
        """Every proxy of `pool`, as read-only views that never print credentials."""
        return self._pools.proxies(pool or self.pool)

    def add_proxies(
        self,
        proxies: Iterable[str | ProxySpec],
        *,
        pool: str | None = None,
        max_concurrency: int | None = None,
        status: ProxyStatus = ProxyStatus.ACTIVE,
        **fields: Any,
    ) -> list[ProxyView]:
        """Add proxies to a pool (created if missing); entries already there are skipped.

        Idempotent, so every process of a fleet may seed the same list at start-up.
        """
        return self._pools.add(pool or self.pool, proxies, max_concurrency=max_concurrency, status=status, **fields)

    def remove_proxy(self, proxy: str | UUID | Proxy | ProxyView, *, pool: str | None = None) -> bool:
        """Remove a proxy by id, `Proxy` or URL; False when it was not there."""
        return self._pools.remove(proxy, pool or self.pool)

    def purge(
        self,
        statuses: Collection[ProxyStatus | str] = (ProxyStatus.BANNED, ProxyStatus.INACTIVE),
        *,
        pool: str | None = None,
    ) -> int:
        """Remove the proxies of `pool` whose status is in `statuses`; returns how many."""
        return self._pools.purge(statuses, pool or self.pool)

    def health(self, pool: str | None = None, *, site: str | None = None) -> PoolHealth:
        """Pool counts from the storage plus this process's request statistics; with
        `site` (a domain, host or URL), also how many proxies that site bans or cools."""
        return self._pools.health(pool or self.pool, site)

    def proxy_stats(self, proxy_id: UUID) -> dict[str, Any]:
        """This process's counters for one proxy (requests, successes, bans, failures, median latency)."""
        return self._ledger.stats(proxy_id)

    def explain(
        self,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
        *,
        avoid: Collection[UUID] = (),
        site: str | None = None,
    ) -> NoProxyAvailable:
        """Why nothing can be leased right now, as the exception to raise (`avoid`: the
        proxies this request already tried; `site`: the request's site, a domain, host or URL)."""
        named = None if site is None else self.sites.site_of_name(site)
        return self._pools.explain(pool or self.pool, filters, protocols, avoid, named)

    # ------------------------------------------------------------------ acquire

    def exchange(
        self, url: str | None = None, *, errors: DoorErrors = CORE_ERRORS, **options: Unpack[ExchangeOptions]
    ) -> Exchange:
        """The step object a door drives for one request (see `pharox_integrations.exchange`)."""
        return Exchange(self, url, errors=errors, **options)

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
        site: str | None = None,
    ) -> ProxyLease:
        """Lease a proxy, waiting with backoff up to `timeout` (default: the acquire timeout).

        `url` is the request's: its site (or `site`, already worked out) decides which
        proxies that site holds off (bans, cool-downs, politeness).  `protocols` limits
        the proxies to those the calling client can speak; `session` keeps one proxy for
        a sticky session while it stays healthy; `avoid` names proxies this request
        already tried (never handed out again).
        """
        if site is None and url is not None:
            site = self.sites.site_of(url)
        if session is None and not avoid:
            fast = self.acquire_nowait(pool=pool, filters=filters, protocols=protocols, site=site)
            if fast is not None:
                return fast
        steps = self._waits(pool, filters, session, protocols, timeout, avoid, site)
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
        site: str | None = None,
        waiter: bridge.Waiter = bridge.ASYNCIO,
    ) -> ProxyLease:
        """`acquire` for an event loop: waits with `waiter.sleep` (asyncio's, or Twisted's
        from the Scrapy door), a blocking storage's steps in a worker thread."""
        if site is None and url is not None:
            site = self.sites.site_of(url)
        if session is None and not avoid:
            fast = self.acquire_nowait(pool=pool, filters=filters, protocols=protocols, site=site, inline=True)
            if fast is not None:
                return fast
        steps = self._waits(pool, filters, session, protocols, timeout, avoid, site)
        while True:
            if self.storage_blocks:
                finished, value = await bridge.step_off_loop(steps, self.release, waiter)
            else:
                finished, value = bridge.step(steps)
            if finished:
                return value  # type: ignore[no-any-return]
            await waiter.sleep(value)

    def acquire_nowait(
        self,
        *,
        pool: str | None = None,
        filters: ProxyFilters | None = None,
        protocols: Collection[ProxyProtocol | str] | None = None,
        site: str | None = None,
        inline: bool = False,
    ) -> ProxyLease | None:
        """One attempt without waiting: a lease, or None when no proxy is free right now
        (or the broker is closed: `acquire` says why).  `site`: see `acquire`.

        The first attempt of every common acquire (no session, nothing to avoid),
        without the waiting generator.  It calls the storage on this thread; `inline`
        (an event loop's first try) never calls a storage that blocks: there only a slot
        of this process's lease block is lent, without I/O, or None.
        """
        if self._closed:
            return None  # the full path says why
        wanted = filters if filters is not None else self.filters
        if inline and self.storage_blocks:
            return self._selection.local(pool or self.pool, wanted, protocols, site)
        return self._selection.nowait(pool or self.pool, wanted, protocols, site)

    def _waits(
        self,
        pool: str | None,
        filters: ProxyFilters | None,
        session: str | None,
        protocols: Collection[ProxyProtocol | str] | None,
        timeout: float | None,
        avoid: Collection[UUID],
        site: str | None,
    ) -> Generator[float, None, ProxyLease]:
        if self._closed:
            raise RuntimeError("LeaseBroker is closed")
        wanted = filters if filters is not None else self.filters
        deadline = time.monotonic() + (self.acquire_timeout if timeout is None else timeout)
        return self._selection.waits(pool or self.pool, wanted, protocols, session, avoid, deadline, site)

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
        return self._report(lease, status_code, error, latency_ms, response, verdict, False)

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
        """`report` then `release`, as a request ends, in one trip through the broker's
        lock.  The proxy is released even when the report fails."""
        return self._report(lease, status_code, error, latency_ms, response, verdict, True)

    def quiet(self, lease: ProxyLease, verdict: Verdict) -> bool:
        """Whether `finish(lease, verdict=verdict)` does no I/O, so an event loop may
        call it inline on a storage that blocks (a routine answer on a lease-block slot)."""
        return self._leases.quiet(lease, verdict)

    async def report_async(self, lease: ProxyLease, *args: Any, **kwargs: Any) -> Verdict:
        return await bridge.run(self.storage_blocks, lambda: self.report(lease, *args, **kwargs))

    # ------------------------------------------------------------------ release

    def release(self, lease: ProxyLease) -> bool:
        """Return the proxy to the pool.  Idempotent: True only the first time."""
        return self._release(lease)

    async def release_async(self, lease: ProxyLease) -> bool:
        return await bridge.run(self.storage_blocks, self.release, lease)

    @contextmanager
    def lease(self, url: str | None = None, **options: Unpack[LeaseOptions]) -> Iterator[ProxyLease]:
        """`with broker.lease(url) as lease:` — released on exit, whatever happens.

        Options as `acquire`'s.  Report inside the block (`broker.report(lease,
        status_code=...)`); an exception escaping the block without a report is
        reported as an error.
        """
        held = self.acquire(url, **options)
        try:
            yield held
        except BaseException as exc:
            if not held.reported and isinstance(exc, Exception):
                self.report(held, error=exc)
            raise
        finally:
            self.release(held)

    @asynccontextmanager
    async def lease_async(self, url: str | None = None, **options: Unpack[LeaseOptions]) -> AsyncIterator[ProxyLease]:
        """Async form of `lease()`; also released when the task is cancelled."""
        held = await self.acquire_async(url, **options)
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
        return self._leases.count()

    @property
    def peak_held(self) -> int:
        """Most leases handed out at once."""
        return self._leases.peak

    def held_leases(self) -> list[ProxyLease]:
        return self._leases.leases()

    def close(self) -> int:
        """Release every lease still held; returns how many.  Safe to call twice."""
        self._closed = True
        released = self._leases.release_all()
        for block in self._selection.blocks():
            try:
                block.close()  # the slots kept for the next requests go back to the storage
            except Exception:
                logger.exception("could not give back the lease block of pool %(pool)s", {"pool": block.pool})
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


__all__ = ["ALL_PROTOCOLS", "HTTP_PROTOCOLS", "LeaseBroker", "PoolHealth", "ProxyLease", "ProxyView"]
