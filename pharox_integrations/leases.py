"""The leases a broker has handed out: made, reported, released.

A lease's life after selection lives here, in one place: a storage lease becomes a
`ProxyLease` the broker holds (`wrap`), a request's answer or error becomes a verdict
applied to its proxy (`report`), and the lease is released to the storage exactly once
(`release`), also when judging or writing the verdict fails.  The broker binds these
methods once, so a request's path through them is no longer than before the split.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from pharox import IStorage, Lease, Proxy, ProxyManager

from .blocks import Slot
from .health import HealthPolicy, Verdict
from .internals import has_release_listeners
from .lease import LeaseHandle, ProxyLease, _Endpoint
from .ledger import HealthLedger
from .sites import SiteBook

logger = logging.getLogger("pharox_integrations")


def _no_sessions(pool: str, session: str, proxy_id: UUID) -> None:
    raise RuntimeError("HeldLeases.remember is set by the broker once its selection exists")


class HeldLeases:
    """The leases handed out and not yet released, with the broker's lock and counters.

    Thread-safe through the broker's lock; the storage is only called without it.
    """

    def __init__(
        self,
        lease_manager: ProxyManager,
        storage: IStorage,
        policy: HealthPolicy,
        ledger: HealthLedger,
        sites: SiteBook,
        lock: threading.RLock,
        counters: dict[str, int],
        endpoints: dict[UUID, _Endpoint],
    ) -> None:
        self.lease_manager = lease_manager
        self.storage = storage
        self.policy = policy
        self.sites = sites
        self._ledger = ledger
        self._lock = lock
        self.counters = counters
        self._endpoints = endpoints  # of proxies added by this broker, until first leased
        self._held: set[ProxyLease] = set()
        self.peak = 0  # most leases handed out at once
        # The selection's sticky-session memory (the selection is built after us).
        self.remember: Callable[[str, str, UUID], None] = _no_sessions

    # ------------------------------------------------------------------ made

    def wrap(
        self, lease: Lease | LeaseHandle, pool: str, session: str | None, proxy: Proxy | None, site: str | None
    ) -> ProxyLease:
        """A storage lease as the `ProxyLease` a door holds, counted as handed out."""
        pid = lease.proxy_id
        # The proxy's health record carries its endpoint: one lookup (of a UUID, hashed
        # in Python) per lease.  Read without the lock: a dict read is atomic.
        state = self._ledger.states.get(pid)
        endpoint = None if state is None else state.endpoint
        if endpoint is None:
            endpoint = self._endpoints.pop(pid, None)  # made when the proxy was added here
            if endpoint is None:
                # Only the endpoint is kept, not the proxy: a storage that can show its
                # stored proxy without a copy (memory) spares one model copy per proxy.
                peek = getattr(self.storage, "peek_proxy", None)
                found = proxy or (peek(pid) if peek is not None else None) or self.storage.get_proxy(str(pid))
                endpoint = _Endpoint.of(found)
        held = ProxyLease(lease, endpoint, pool, session, site)
        with self._lock:
            self._held.add(held)
            self.counters["acquired"] += 1
            if len(self._held) > self.peak:
                self.peak = len(self._held)
            held._state = self._ledger.adopt(held, state)  # what `report` updates, without a lookup
            if session is not None:
                self.remember(pool, session, pid)
        return held

    # ------------------------------------------------------------------ reported

    def report(
        self,
        lease: ProxyLease,
        status_code: int | None,
        error: BaseException | None,
        latency_ms: float | None,
        response: Any,
        verdict: Verdict | None,
        release: bool,
    ) -> Verdict:
        """`LeaseBroker.report` (and, with `release`, its `finish`): judge, count, write,
        and release the lease even when judging or writing fails."""
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
        wide = True  # a ban without a site: the proxy's, everywhere (as before sites)
        held = verdict.site_refusal and lease.site is not None
        if held:
            try:  # the site holds the pair; the proxy goes everywhere only when burned
                wide = self.sites.refuse(lease.proxy_id, lease.site, verdict, response, lease.safe_url)  # type: ignore[arg-type]
            except BaseException:
                if release:
                    self.release(lease)
                raise
        with self._lock:
            if held:
                self.counters["site_bans" if verdict is Verdict.BAN else "site_cooldowns"] += 1
            change = self._ledger.record(lease, verdict, latency_ms, wide=wide)
            first = release and self._mark_released(lease)
        try:
            if change is not None:
                self._ledger.apply(lease, change, status_code, error, latency_ms)
        finally:
            if first:
                self._release_handed_out(lease)
        return verdict

    def quiet(self, lease: ProxyLease, verdict: Verdict) -> bool:
        """`LeaseBroker.quiet`: a slot that goes back to its block without I/O, no
        politeness to restart, no site hold and nothing the ledger must write."""
        handle = lease._handle
        return (
            isinstance(handle, Slot)
            and not lease.polite
            and handle.block.quiet(handle)
            and self._ledger.quiet(lease, verdict)
        )

    # ------------------------------------------------------------------ released

    def release(self, lease: ProxyLease) -> bool:
        """`LeaseBroker.release`: idempotent, True only the first time."""
        if lease.released:  # only ever goes from False to True: no lock needed to see it
            return False
        with self._lock:  # `_mark_released`, inline: this is on every request's path
            if lease.released:
                return False
            lease.released = True
            self._held.discard(lease)
            self.counters["released"] += 1
        self._release_handed_out(lease)
        return True

    def release_all(self) -> int:
        """Release every lease still held (a broker closing); returns how many."""
        released = 0
        for held in self.leases():
            try:
                released += self.release(held)
            except Exception:  # keep releasing the others; the storage logged it
                logger.exception("could not release a lease of %(proxy)s", {"proxy": held.safe_url})
        if released:
            logger.info("released %(n)d lease(s) still held at close", {"n": released})
        return released

    def _mark_released(self, lease: ProxyLease) -> bool:
        """Mark `lease` released (caller holds the lock); False when it already was."""
        if lease.released:
            return False
        lease.released = True
        self._held.discard(lease)
        self.counters["released"] += 1
        return True

    def _release_handed_out(self, lease: ProxyLease) -> None:
        """The storage's half of releasing a lease a request used; a visit that claimed
        its pair's politeness slot starts the pair's `site_delay` now that it is over."""
        self.release_in_storage(lease._handle)
        if lease.polite:
            self.sites.visited(lease.proxy_id, lease.site)  # type: ignore[arg-type]

    def release_in_storage(self, handle: Lease | LeaseHandle) -> None:
        """The storage's half of a release (the lease may never have been handed out)."""
        if isinstance(handle, Slot):
            handle.block.give_back(handle)  # kept for the next request, or released in a batch
            return
        if has_release_listeners(self.lease_manager):
            self.lease_manager.release_proxy(handle if isinstance(handle, Lease) else handle.to_lease())
            return
        # The manager's steps without the event payload nobody listens to.
        if isinstance(handle, Lease):
            handle.released_at = handle.released_at or datetime.now(timezone.utc)
        self.storage.release_lease(handle)  # type: ignore[arg-type]  # or the storage's own record

    # ------------------------------------------------------------------ counted

    def count(self, pool: str | None = None) -> int:
        """Leases held (of `pool`, when given)."""
        with self._lock:
            if pool is None:
                return len(self._held)
            return sum(1 for lease in self._held if lease.pool == pool)

    def leases(self) -> list[ProxyLease]:
        with self._lock:
            return list(self._held)
