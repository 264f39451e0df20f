"""Pool administration and explanations: what is in a pool, and why nothing could be leased.

Everything here reads or changes the storage's pools and proxies outside the request
path (seeding, `pool stats`, removing dead entries, the text of `NoProxyAvailable`).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any
from uuid import UUID

from pharox import IStorage, PharoxError, Proxy, ProxyFilters, ProxyPool, ProxyProtocol, ProxyStatus

from .errors import NoProxyAvailable
from .filters import ProtocolFilter
from .lease import PoolHealth, ProxyView, _Endpoint
from .ledger import HealthLedger
from .settings import ProxySpec, describe_filters, parse_proxy
from .sites import BAN, DELAY, SiteBook

_LABELS = {
    "banned": "banned",
    "inactive": "inactive",
    "slow": "slow",
    "leased": "leased to capacity",
    "filtered_out": "filtered out",
    "tried": "already tried by this request",
    "available": "free but taken before we got them",
}


class PoolAdmin:
    """The pools of one storage, as the broker's users see them."""

    def __init__(
        self,
        storage: IStorage,
        lock: threading.RLock,
        ledger: HealthLedger,
        endpoints: dict[UUID, _Endpoint],
        held_in: Callable[[str], int],
        sites: SiteBook,
    ) -> None:
        self.sites = sites
        self.storage = storage
        self._lock = lock
        self._ledger = ledger
        self._endpoints = endpoints  # made when proxies are added, read by the broker's first lease
        self._held_in = held_in  # leases of a pool held by this broker

    def record(self, name: str, *, create: bool = False) -> ProxyPool | None:
        finder = getattr(self.storage, "get_pool_by_name", None)
        if callable(finder):
            found: ProxyPool | None = finder(name)
        else:
            found = next((p for p in self.storage.list_pools() if p.name == name), None)
        if found is None and create:
            found = ProxyPool(name=name)
            self.storage.save_pool(found)
        return found

    def names(self) -> list[str]:
        return sorted(p.name for p in self.storage.list_pools())

    def proxies(self, pool: str) -> list[ProxyView]:
        record = self.record(pool)
        if record is None:
            raise self.unknown(pool)
        return [ProxyView(p) for p in self.storage.list_proxies(str(record.id))]

    def add(
        self,
        pool: str,
        proxies: Iterable[str | ProxySpec],
        *,
        max_concurrency: int | None,
        status: ProxyStatus,
        **fields: Any,
    ) -> list[ProxyView]:
        record = self.record(pool, create=True)
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
        return [ProxyView(p) for p in new]

    def remove(self, proxy: str | UUID | Proxy | ProxyView, pool: str) -> bool:
        target_id: UUID | None = None
        if isinstance(proxy, (Proxy, ProxyView)):
            target_id = proxy.id
        elif isinstance(proxy, UUID):
            target_id = proxy
        else:
            try:
                target_id = UUID(str(proxy))
            except ValueError:
                spec = parse_proxy(str(proxy), where="remove_proxy")
                match = [p for p in self.proxies(pool) if _identity(p.to_pharox()) == spec.identity]
                if not match:
                    return False
                target_id = match[0].id
        try:
            self.storage.delete_proxy(str(target_id))
        except PharoxError:
            return False
        with self._lock:
            self._endpoints.pop(target_id, None)
        self._ledger.forget(target_id)
        return True

    def purge(self, statuses: Collection[ProxyStatus | str], pool: str) -> int:
        wanted = {ProxyStatus(s) for s in statuses}
        return sum(
            1 for proxy in self.proxies(pool) if ProxyStatus(proxy.status) in wanted and self.remove(proxy.id, pool)
        )

    def health(self, pool: str, site: str | None = None) -> PoolHealth:
        proxies = self.proxies(pool)
        by_status = {s: 0 for s in ProxyStatus}
        leased = 0
        for p in proxies:
            by_status[ProxyStatus(p.status)] += 1
            leased += p.current_leases > 0
        requests, successes, latencies = self._ledger.totals({p.id for p in proxies})
        site_counts: dict[str, Any] = {}
        if site is not None:
            site = self.sites.site_of_name(site)
            holds = self.sites.holds(site)
            active = {p.id for p in proxies if p.status == ProxyStatus.ACTIVE}
            banned = sum(1 for pid, h in holds.items() if pid in active and h.kind == BAN)
            cooling = sum(1 for pid, h in holds.items() if pid in active and h.kind != BAN)
            site_counts = {
                "site": site,
                "site_banned": banned,
                "site_cooling": cooling,
                "site_usable": len(active) - banned - cooling,
            }
        return PoolHealth(
            pool=pool,
            total=len(proxies),
            active=by_status[ProxyStatus.ACTIVE],
            banned=by_status[ProxyStatus.BANNED],
            inactive=by_status[ProxyStatus.INACTIVE],
            slow=by_status[ProxyStatus.SLOW],
            leased=leased,
            held_here=self._held_in(pool),
            requests=requests,
            success_rate=successes / requests if requests else None,
            median_latency_ms=statistics.median(latencies) if latencies else None,
            **site_counts,
        )

    # ------------------------------------------------------------------ explanations

    def unknown(self, name: str) -> NoProxyAvailable:
        known = self.names()
        listed = ", ".join(repr(p) for p in known) if known else "none"
        return NoProxyAvailable(f"pool {name!r} does not exist (pools in this storage: {listed})", pool=name)

    def explain(
        self,
        name: str,
        filters: ProxyFilters | None,
        protocols: Collection[ProxyProtocol | str] | None,
        avoid: Collection[UUID],
        site: str | None = None,
    ) -> NoProxyAvailable:
        record = self.record(name)
        if record is None:
            return self.unknown(name)
        proxies = list(self.storage.list_proxies(str(record.id)))
        speakable = ProtocolFilter(protocols) if protocols is not None else None
        counts: dict[str, int] = {"total": len(proxies)}
        unspeakable: set[str] = set()
        holds = self.sites.holds(site) if site is not None else {}
        back: dict[str, float] = {}  # site_banned / site_cooling: the first one usable there again
        for p in proxies:
            status = ProxyStatus(p.status)
            hold = holds.get(p.id)
            if p.id in avoid:
                key = "tried"
            elif speakable is not None and not speakable(p):
                key = "wrong_protocol"
                unspeakable.add(ProxyProtocol(p.protocol).value)
            elif status != ProxyStatus.ACTIVE:
                key = status.value
            elif filters is not None and not filters.matches(p):
                key = "filtered_out"
            elif hold is not None:
                key = "site_banned" if hold.kind == BAN else "site_cooling"
                # A politeness hold lasts while its request is in flight, then site_delay.
                until = min(hold.until, time.time() + self.sites.delay) if hold.kind == DELAY else hold.until
                back[key] = min(back.get(key, until), until)
            elif p.max_concurrency is not None and p.current_leases >= p.max_concurrency:
                key = "leased"
            else:
                key = "available"
            counts[key] = counts.get(key, 0) + 1
        benched_times = [t for _, t in self._ledger.benched(name)]
        next_in = max(0.0, min(benched_times) - time.time()) if benched_times else None
        described = describe_filters(filters)
        where = f"pool {name!r}"
        if described:
            where += f" (filters: {described})"
        now = time.time()
        parts = [
            f"{counts[k]} {label}, next in {max(0.0, back[k] - now):.1f} s"
            for k, label in (("site_banned", "banned there"), ("site_cooling", "cooling"))
            if counts.get(k)
        ]
        parts += [f"{counts[k]} {v}" for k, v in _LABELS.items() if counts.get(k)]
        if counts.get("wrong_protocol"):
            can = ", ".join(sorted(ProxyProtocol(p).value for p in speakable.protocols)) if speakable else ""
            parts.append(
                f"{counts['wrong_protocol']} use a protocol this client cannot speak "
                f"({', '.join(sorted(unspeakable))}; it speaks {can})"
            )
        benched = sum(counts.get(k, 0) for k in ("banned", "inactive", "slow"))
        total = counts["total"]
        usable_in = max(0.0, min(back.values()) - now) if back else None
        if total == 0:
            message = f"{where} has no proxies"
        elif site is not None and back:
            message = f"0 of {total} proxies usable for site {site!r} in {where}: {'; '.join(parts)}"
        elif benched == total:
            message = f"all {total} proxies of {where} benched: {', '.join(parts)}"
        else:
            message = f"0 of {total} proxies available in {where}: {', '.join(parts)}"
        if next_in is not None:
            message += f"; next back in {next_in:.0f} s"
        return NoProxyAvailable(
            message,
            pool=name,
            filters=described,
            counts=counts,
            next_revival_in=next_in,
            site=site,
            next_usable_in=usable_in,
        )


def _identity(proxy: Proxy) -> tuple[str, str, int, str | None, str | None]:
    return ProxySpec.from_proxy(proxy).identity
