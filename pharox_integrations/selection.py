"""Selection: which proxy a request gets, and the wait for one.

The caller's filters plus the protocols its client speaks, the selector strategy,
sticky sessions, passing over the proxies a moving request already tried, and waiting
with backoff until a deadline.  The broker turns the storage's leases into
`ProxyLease`s (`wrap`).
"""

from __future__ import annotations

import functools
import inspect
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Generator
from datetime import datetime, timezone
from uuid import UUID

from pharox import (
    AcquireEventPayload,
    IStorage,
    Lease,
    PharoxError,
    Proxy,
    ProxyFilters,
    ProxyManager,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)

from .blocks import Blocks, LeaseBlock, Slot, supports_blocks
from .filters import EffectiveFilters
from .internals import DEFAULT_CONSUMER, has_acquire_listeners, has_release_listeners, notify_acquire
from .lease import LeaseHandle, ProxyLease
from .ledger import HealthLedger
from .pools import PoolAdmin
from .sites import DELAY, SiteBook

_SESSIONS_MAX = 10_000
_RACE_RETRIES = 8  # ProxyUnavailableError races retried at once before waiting

Found = tuple[Lease | LeaseHandle, Proxy | None]


class StickyBusy(Exception):
    """The sticky proxy is at capacity: wait for it rather than switching."""


class Selection:
    """Leases from the storage for one broker's consumer, selector and lease duration."""

    def __init__(
        self,
        lease_manager: ProxyManager,
        storage: IStorage,
        pools: PoolAdmin,
        ledger: HealthLedger,
        sites: SiteBook,
        lock: threading.RLock,
        wrap: Callable[[Lease | LeaseHandle, str, str | None, Proxy | None, str | None], ProxyLease],
        release: Callable[[Lease | LeaseHandle], None],
        release_held: Callable[[ProxyLease], object],
        *,
        consumer: str | None,
        selector: SelectorStrategy,
        lease_seconds: int,
        lease_blocks: bool = False,
    ) -> None:
        self.lease_manager = lease_manager
        self.storage = storage
        self._pools = pools
        self._ledger = ledger
        self.sites = sites
        self._lock = lock
        self._wrap = wrap  # the broker's: a storage lease becomes a ProxyLease it holds
        self._release = release  # the broker's storage-side release, for a lease never handed out
        self._release_held = release_held  # the broker's release, for a lease wrapped but not handed out
        self.consumer = consumer
        self.selector = selector
        self.lease_seconds = lease_seconds
        self.sessions: OrderedDict[tuple[str, str], UUID] = OrderedDict()
        self._consumer_ready = consumer is None
        self._default_consumer_ready = False
        self.effective_filters = EffectiveFilters()  # the caller's filters plus its protocols
        # The storage's find-and-lease in one step (ours have it), for the common acquire;
        # the memory storage also passes over proxies to avoid as it walks.
        one_step = getattr(storage, "acquire_lease", None)
        self._one_step = one_step if callable(one_step) else None
        self._excludes = self._one_step is not None and "exclude" in inspect.signature(self._one_step).parameters
        # A shared storage: leases taken a few at a time and lent locally (see blocks.py).
        self._blocks = Blocks(self._new_block, lock) if lease_blocks and supports_blocks(storage) else None
        self._early = 0  # requests an event loop sent off it before any block existed

    def waits(
        self,
        pool: str,
        filters: ProxyFilters | None,
        protocols: Collection[ProxyProtocol | str] | None,
        session: str | None,
        avoid: Collection[UUID],
        deadline: float,
        site: str | None = None,
    ) -> Generator[float, None, ProxyLease]:
        """One acquisition as a generator of waits (seconds), shared by the sync and async
        forms; its value is the lease, or it raises `NoProxyAvailable` saying why.

        `site`: the request's site; proxies it holds off (bans, cool-downs, politeness)
        are passed over, and waited for when one is usable there before the deadline."""
        effective = self.effective_filters(filters, protocols)
        delay = 0.005
        next_check = 0.0
        while True:
            self._ledger.revive_due(pool)
            lease = self.try_lease(pool, effective, session, avoid, site)
            if lease is not None:
                return lease
            now = time.monotonic()
            hopeless = False
            if now >= next_check:  # at the first miss, then once a second
                hopeless = not self.worth_waiting(pool, effective, avoid, deadline, site)
                next_check = now + 1.0
            if now >= deadline or hopeless:
                with self._lock:
                    self._ledger.counters["no_proxy_available"] += 1
                raise self._pools.explain(pool, filters, protocols, avoid, site)
            self._ledger.revive_due(pool, scan=True)
            wait = min(delay * (0.5 + random.random()), deadline - now)
            delay = min(delay * 2, 0.25)
            yield max(wait, 0.0)

    def nowait(
        self,
        pool: str,
        filters: ProxyFilters | None,
        protocols: Collection[ProxyProtocol | str] | None,
        site: str | None,
    ) -> ProxyLease | None:
        """The broker's `acquire_nowait`: the first attempt of every common acquire (no
        session, nothing tried yet), without the waiting generator."""
        effective = self.effective_filters(filters, protocols)
        self._ledger.revive_due(pool)
        if site is not None:  # the site's holds to pass over, a politeness slot to claim
            return self.try_lease(pool, effective, None, (), site)
        self.ensure_consumer()
        try:
            found = self.take(pool, effective)
        except ProxyUnavailableError:
            return None
        return None if found is None else self._wrap(found, pool, None, _read_with(found), None)

    def local(
        self,
        pool: str,
        filters: ProxyFilters | None,
        protocols: Collection[ProxyProtocol | str] | None,
        site: str | None,
    ) -> ProxyLease | None:
        """A lease lent from this process's lease block without any I/O, or None when
        that is not possible right now (no block yet, the block would grow, a revival or
        a site refresh is due, a politeness claim is needed, the proxy's endpoint is not
        known yet).  An event loop on a shared storage calls this inline and goes off the
        loop only on None: with blocks, most requests never leave the loop."""
        if self._blocks is None:
            return None
        block = self._blocks.find(pool, self.effective_filters(filters, protocols))
        if block is None:
            self._early += 1  # a crawl's first burst: the block, once made, leases for it at once
            return None
        if self._ledger.due_inline(pool):
            return None
        avoid: Collection[UUID] = ()
        if site is not None:
            if not self.sites.quiet():
                return None
            avoid = self.sites.holds(site, inline=True)
        slot = block.lend(avoid)
        if slot is None:
            return None
        state = self._ledger.states.get(slot.proxy_id)
        if slot.proxy is None and (state is None or state.endpoint is None):
            block.unlend(slot)  # its endpoint is read from the storage: off the loop
            return None
        return self._wrap(slot, pool, None, _read_with(slot), site)

    def try_lease(
        self,
        pool: str,
        filters: ProxyFilters | None,
        session: str | None,
        avoid: Collection[UUID] = (),
        site: str | None = None,
    ) -> ProxyLease | None:
        """One attempt: the session's proxy, else the selector's pick, else (when the pick
        was already tried or is held off the site) the least busy other proxy; None when
        nothing is free.  With a politeness delay the pair's visit slot is claimed too."""
        self.ensure_consumer()
        if site is not None:
            self.sites.maintain()  # the minute's purge: an event loop's inline leases wait for it
            held = self.sites.holds(site)
            if held:
                if session is not None:
                    hold = held.get(self.sessions.get((pool, session)))  # type: ignore[arg-type]
                    if hold is not None and hold.kind == DELAY:
                        return None  # sticky: wait for its proxy's next polite visit
                avoid = {*avoid, *held} if avoid else held
        if session is not None and (pool, session) not in self.sessions:
            # A session's first lease, one at a time: requests of a new session racing
            # here would each pick a proxy, and the session would not stick to one.
            with self._lock:
                lease = self._try_lease(pool, filters, session, avoid, site)
        else:
            lease = self._try_lease(pool, filters, session, avoid, site)
        if lease is not None and site is not None and self.sites.delay:
            if not self.sites.claim(lease.proxy_id, site, self.lease_seconds):
                self._release_held(lease)  # another request took this pair's visit slot first
                return None
            lease.polite = True  # its release starts the pair's next `site_delay`
        return lease

    def _try_lease(
        self, pool: str, filters: ProxyFilters | None, session: str | None, avoid: Collection[UUID], site: str | None
    ) -> ProxyLease | None:
        if session is not None and self.sessions.get((pool, session)) not in avoid:
            try:
                sticky = self.sticky(pool, filters, session)
            except StickyBusy:
                return None  # sticky means this proxy: wait for a free slot on it
            if sticky is not None:
                return self._wrap(sticky[0], pool, session, sticky[1], site)
        for _ in range(_RACE_RETRIES):
            try:
                lease = self.take(pool, filters, avoid)
            except ProxyUnavailableError:
                # find and create_lease are separate steps in pharox's storages; the
                # proxy was taken in between.  Not an error for our callers: try again.
                with self._lock:
                    self._ledger.counters["races"] += 1
                continue
            if lease is None:
                return None
            if lease.proxy_id not in avoid:
                return self._wrap(lease, pool, session, _read_with(lease), site)
            # The selector picked a proxy this request already tried or the site holds
            # off (first_available and least_used pick the same one every time): give
            # it back, and choose among the others.
            self._release(lease)
            found = self.untried(pool, filters, avoid)
            return None if found is None else self._wrap(found[0], pool, session, found[1], site)
        return None

    def prepare(self, pool: str) -> None:
        """At start-up, the I/O a shared storage's first requests would otherwise wait
        for (25-45 ms each in a crawl's first burst, 4 crawlers starting at once): the
        consumer's row and the first revival scan of `pool`.  (Not the site book's first
        refresh: its mirror would then be a refresh older when the first request reads
        it, and a ban another process records meanwhile is seen at once today.)"""
        self.ensure_consumer()
        if self.consumer is None:
            self._ensure_default_consumer()
        self._ledger.revive_due(pool)

    def ensure_consumer(self) -> None:
        if not self._consumer_ready and self.consumer:
            self.storage.ensure_consumer(self.consumer)
            self._consumer_ready = True

    def _ensure_default_consumer(self) -> None:
        if not self._default_consumer_ready:
            self.storage.ensure_consumer(DEFAULT_CONSUMER)
            self._default_consumer_ready = True

    def take(
        self, pool: str, filters: ProxyFilters | None, avoid: Collection[UUID] = ()
    ) -> Lease | LeaseHandle | None:
        """One acquisition attempt, through pharox's manager or the storage's one-step path.

        A storage with `acquire_lease` (ours) finds and leases in one step (one
        transaction on SQL), where pharox's manager needs several and races between
        them.  The manager's acquire listeners are still called, so pharox's
        observability holds.
        """
        watched = has_acquire_listeners(self.lease_manager)
        if self._blocks is not None and not watched and not has_release_listeners(self.lease_manager):
            return self._blocks.get(pool, filters).take(avoid)
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
        consumer = self.consumer or DEFAULT_CONSUMER
        if avoid and self._excludes:
            one_step = functools.partial(one_step, exclude=avoid)  # type: ignore[call-arg]
        if not watched:
            found: Lease | LeaseHandle | None = one_step(pool, consumer, self.lease_seconds, filters, self.selector)
            return found
        started = datetime.now(timezone.utc)
        lease = one_step(pool, consumer, self.lease_seconds, filters, self.selector)
        if lease is not None and not isinstance(lease, Lease):
            lease = lease.to_lease()  # the storage's own record: listeners get a pharox Lease
        completed = datetime.now(timezone.utc)
        notify_acquire(
            self.lease_manager,
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
            ),
        )
        return lease

    def _new_block(self, pool: str, filters: ProxyFilters | None) -> LeaseBlock:
        self.ensure_consumer()
        consumer = self.consumer or DEFAULT_CONSUMER
        block = LeaseBlock(
            self.storage, consumer, self.lease_seconds, pool, filters, self.selector, self._ledger.benched_now
        )
        block.announce(self._early)
        self._early = 0
        return block

    def blocks(self) -> list[LeaseBlock]:
        return self._blocks.all() if self._blocks else []

    def _find_and_lease(
        self, pool: str, consumer: str, duration: int, filters: ProxyFilters | None, selector: SelectorStrategy
    ) -> Lease | None:
        """pharox's manager steps without its event payloads and pool-stats calls, used
        when nobody listens to them (they cost more than the lease itself on a memory
        storage)."""
        if consumer == DEFAULT_CONSUMER:
            self._ensure_default_consumer()
        self.storage.cleanup_expired_leases()
        proxy = self.storage.find_available_proxy(pool, filters, selector)
        return self.storage.create_lease(proxy, consumer, duration) if proxy is not None else None

    # ------------------------------------------------------------------ sessions

    def sticky(self, pool: str, filters: ProxyFilters | None, session: str) -> Found | None:
        """The session's proxy while it stays usable (StickyBusy while it is at capacity)."""
        key = (pool, session)
        with self._lock:
            proxy_id = self.sessions.get(key)
        if proxy_id is None:
            return None
        try:
            proxy = self.storage.get_proxy(str(proxy_id))
        except PharoxError:
            proxy = None
        if proxy is None or proxy.status != ProxyStatus.ACTIVE or (filters and not filters.matches(proxy)):
            with self._lock:
                self.sessions.pop(key, None)
            return None
        try:
            lease = self.storage.create_lease(proxy, self.consumer or DEFAULT_CONSUMER, self.lease_seconds)
        except ProxyUnavailableError:
            raise StickyBusy() from None
        return lease, proxy

    def remember(self, pool: str, session: str, proxy_id: UUID) -> None:
        """The session keeps this proxy from now on (caller holds the lock)."""
        self.sessions[(pool, session)] = proxy_id
        self.sessions.move_to_end((pool, session))
        while len(self.sessions) > _SESSIONS_MAX:
            self.sessions.popitem(last=False)

    # ------------------------------------------------------------------ moving requests

    def untried(self, pool: str, filters: ProxyFilters | None, avoid: Collection[UUID]) -> Found | None:
        """Lease the least busy active proxy outside `avoid` (a request that moves).

        A scan of the pool, on the path of moves only: the storages' selectors cannot
        be told which proxies to pass over.
        """
        candidates = [p for p in self._candidates(pool, filters, avoid) if not _full(p)]
        candidates.sort(key=lambda p: p.current_leases)
        for proxy in candidates:
            try:
                return self.storage.create_lease(proxy, self.consumer or DEFAULT_CONSUMER, self.lease_seconds), proxy
            except ProxyUnavailableError:
                continue
        return None

    def worth_waiting(
        self,
        pool: str,
        filters: ProxyFilters | None,
        avoid: Collection[UUID],
        deadline: float,
        site: str | None = None,
    ) -> bool:
        """Whether a proxy could be leased before `deadline`: an active one outside
        `avoid` and the site's holds (a busy one may be released), one whose hold on
        the site ends in time, or a benched one whose cool-down ends in time.  When none
        can, the caller hears so at once instead of at the deadline; a proxy this
        request already tried is never waited for."""
        back_by = time.time() + (deadline - time.monotonic())
        held = self.sites.holds(site) if site is not None else {}
        candidates = self._candidates(pool, filters, avoid)
        # A politeness hold ends when its request does (`visited`): always worth waiting for.
        if any(p.id not in held or held[p.id].until <= back_by or held[p.id].kind == DELAY for p in candidates):
            return True
        return any(
            back_at <= back_by
            for proxy, back_at in self._ledger.benched(pool)
            if proxy.id not in avoid and (filters is None or filters.matches(proxy))
        )

    def _candidates(self, pool: str, filters: ProxyFilters | None, avoid: Collection[UUID]) -> list[Proxy]:
        record = self._pools.record(pool)
        if record is None:
            return []
        return [
            p
            for p in self.storage.list_proxies(str(record.id))
            if p.status == ProxyStatus.ACTIVE and p.id not in avoid and (filters is None or filters.matches(p))
        ]


def _full(proxy: Proxy) -> bool:
    return proxy.max_concurrency is not None and proxy.current_leases >= proxy.max_concurrency


def _read_with(lease: Lease | LeaseHandle) -> Proxy | None:
    """The proxy a lease block read when it first leased it here: its first `ProxyLease`
    is made from it, without another read (then dropped: the endpoint is kept instead)."""
    if isinstance(lease, Slot):
        proxy, lease.proxy = lease.proxy, None
        return proxy
    return None
