"""An in-process pharox storage whose cost per lease does not grow with the pool.

pharox's `InMemoryStorage` answers every `find_available_proxy`, `get_pool_stats`
and `cleanup_expired_leases` by scanning the whole pool (and every lease ever made),
and deep-copies pydantic models on the way in and out.  That is fine for a test with
ten proxies and ruinous on a crawler's request path with a hundred thousand.

`MemoryStorage` keeps indexes instead:

* per pool, one ordered index of *available* proxies per selector strategy (and
  per protocol set a client restricts itself to), built the first time it is
  used and maintained from then on:
  FIRST_AVAILABLE in insertion order (as pharox's in-memory storage), ROUND_ROBIN
  by proxy id with a "last id" cursor (the contract suite's order), LEAST_USED by
  ``(current_leases, checked_at, id)`` and LOWEST_LATENCY by the latest reachable
  health latency (proxies never measured last), then id;
* per pool, the proxies of each status, protocol and scalar filter value
  (country, source, city, isp, asn);
* a heap of active leases by expiry time, so cleanup touches only what expired;
* pool statistics kept as counters, so `get_pool_stats` is O(1) (pharox's
  `ProxyManager` calls it on every acquire and every release).

Filters are answered from the indexes when they are conjunctions of scalar
equalities and `ProtocolFilter` predicates (also nested under ``all_of``).  What
an index cannot answer -- a user predicate, a geo radius, ``any_of``/``none_of``
-- is checked only on the candidates the indexes leave, walking them in selector
order; a filter made only of such parts may walk the whole available set.

Released leases are kept only in a small window (for `get_lease`/`list_leases`
right after release) and health records, stored compactly, in a ring buffer per
proxy, so memory and cost stay flat however long the process runs.  Every public method takes one
lock; pharox models handed out are shallow copies (all their fields are immutable apart
from the credentials, which are copied too), never the stored instances.  Two
extensions the core uses are the exceptions, for speed: `acquire_lease` hands out the
storage's own lease record and `peek_proxy` the stored proxy, both read-only.
"""

from __future__ import annotations

import heapq
import threading
import time
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from itertools import chain, count, islice
from math import isclose
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from pharox import (
    Consumer,
    ConsumerNotFoundError,
    HealthCheckResult,
    InvalidLeaseError,
    IStorage,
    Lease,
    LeaseStatus,
    PoolNotFoundError,
    PoolStatsSnapshot,
    Proxy,
    ProxyFilters,
    ProxyHealthRecord,
    ProxyNotFoundError,
    ProxyPool,
    ProxyProtocol,
    ProxyStatus,
    ProxyUnavailableError,
    SelectorStrategy,
)
from pharox.utils import haversine_distance_km

from ..filters import ProtocolFilter

if TYPE_CHECKING:
    from ..sites import MemorySiteStore

__all__ = ["MemoryStorage"]

_ACTIVE = ProxyStatus.ACTIVE
_FIRST = SelectorStrategy.FIRST_AVAILABLE
_ROUND_ROBIN = SelectorStrategy.ROUND_ROBIN
_LEAST_USED = SelectorStrategy.LEAST_USED
_LOWEST_LATENCY = SelectorStrategy.LOWEST_LATENCY

# Scalar filter fields.  pharox ignores a falsy value for the string fields and
# only `None` for `asn`; the indexes follow the same rule.
_TEXT_FIELDS = ("country", "source", "city", "isp")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# Below this many candidates a filtered lookup just scans them.
_SMALL_CANDIDATE_SET = 32

_Key = tuple[Any, ...]
# An ordered index: a selector, optionally restricted to a set of protocols.
_OrderId = tuple[SelectorStrategy, "frozenset[ProxyProtocol] | None"]
_Check = Callable[[Proxy], bool]


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def _copy_proxy(proxy: Proxy) -> Proxy:
    """A copy the caller may mutate freely, at a fraction of a deep copy's cost."""
    if proxy.credentials is None:
        return proxy.model_copy()
    return proxy.model_copy(update={"credentials": proxy.credentials.model_copy()})


def _as_uuid(value: str | UUID) -> UUID | None:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(value)
    except (TypeError, ValueError):
        return None


class _SortedKeys:
    """A sorted set of tuple keys kept as a list of short sorted lists.

    Insert, remove and ordered iteration from any key cost O(log n + chunk) with
    the memmoves done in C; plenty for pools of a few hundred thousand proxies.
    Every key ends with the entry it belongs to and is unique before that last
    element, so entries themselves are never compared.
    """

    __slots__ = ("_chunks", "_maxes")
    _CHUNK = 512

    def __init__(self, keys: Iterable[_Key] = ()) -> None:
        ordered = sorted(keys)
        size = self._CHUNK
        self._chunks: list[list[_Key]] = [
            ordered[i : i + size] for i in range(0, len(ordered), size)
        ]
        self._maxes: list[_Key] = [chunk[-1] for chunk in self._chunks]

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self._chunks)

    def add(self, key: _Key) -> None:
        maxes = self._maxes
        if not maxes:
            self._chunks.append([key])
            maxes.append(key)
            return
        pos = bisect_left(maxes, key)
        if pos == len(maxes):
            pos -= 1
            self._chunks[pos].append(key)
            maxes[pos] = key
        else:
            insort(self._chunks[pos], key)
        chunk = self._chunks[pos]
        if len(chunk) > 2 * self._CHUNK:
            half = len(chunk) // 2
            self._chunks[pos : pos + 1] = [chunk[:half], chunk[half:]]
            maxes[pos : pos + 1] = [chunk[half - 1], chunk[-1]]

    def remove(self, key: _Key) -> None:
        maxes = self._maxes
        pos = bisect_left(maxes, key)
        chunk = self._chunks[pos]
        idx = bisect_left(chunk, key)
        if idx == len(chunk) or chunk[idx] != key:
            raise RuntimeError("index out of step with its proxies")
        del chunk[idx]
        if not chunk:
            del self._chunks[pos]
            del maxes[pos]
        elif idx == len(chunk):
            maxes[pos] = chunk[-1]

    def first(self) -> _Key | None:
        return self._chunks[0][0] if self._chunks else None

    def after(self, key: _Key) -> _Key | None:
        """The first key >= `key`, wrapping around to the first key of all."""
        maxes = self._maxes
        if not maxes:
            return None
        pos = bisect_left(maxes, key)
        if pos == len(maxes):
            return self._chunks[0][0]
        chunk = self._chunks[pos]
        return chunk[bisect_left(chunk, key)]

    def iter_from(self, key: _Key | None = None) -> Iterator[_Key]:
        """Keys >= `key` (all keys when None), in order; do not mutate meanwhile."""
        chunks = self._chunks
        pos = 0
        if key is not None:
            pos = bisect_left(self._maxes, key)
            if pos == len(chunks):
                return
            head = chunks[pos]
            # By index: islice would step over the skipped part of the chunk one by one.
            for index in range(bisect_left(head, key), len(head)):
                yield head[index]
            pos += 1
        for index in range(pos, len(chunks)):
            yield from chunks[index]


class _Entry:
    """A stored proxy plus the bookkeeping the indexes need."""

    __slots__ = (
        "active",
        "available",
        "keys",
        "latency",
        "leased",
        "pool",
        "proxy",
        "seq",
        "status",
        "uid",
    )

    def __init__(self, proxy: Proxy, pool: _Pool, seq: int) -> None:
        self.proxy = proxy
        self.pool = pool
        self.seq = seq
        self.uid = proxy.id.int
        # What the indexes currently hold for this entry (None: nothing yet).
        self.status: ProxyStatus | None = None
        self.active = False
        self.available = False
        self.leased = False
        self.keys: dict[_OrderId, _Key] = {}
        # Latency of the latest reachable health record, for LOWEST_LATENCY.
        self.latency: int | None = None


class _Pool:
    """One pool: its proxies, their indexes and running totals."""

    __slots__ = (
        "active",
        "available",
        "by_count",
        "by_field",
        "by_protocol",
        "by_status",
        "entries",
        "leased",
        "model",
        "orders",
        "rr_last",
        "total_leases",
    )

    def __init__(self, model: ProxyPool) -> None:
        self.model = model
        self.entries: dict[UUID, _Entry] = {}
        self.orders: dict[_OrderId, _SortedKeys] = {}
        self.by_count = False  # some order is LEAST_USED: keys change with every lease
        self.by_status: dict[ProxyStatus, dict[UUID, _Entry]] = {}
        self.by_protocol: dict[ProxyProtocol, dict[UUID, _Entry]] = {}
        self.by_field: dict[tuple[str, object], dict[UUID, _Entry]] = {}
        self.rr_last: int | None = None
        self.active = 0
        self.available = 0
        self.leased = 0
        self.total_leases = 0


class _LeaseRecord:
    """A lease as the storage keeps it: plain slots, a pharox `Lease` built only when asked.

    Building and copying a pydantic `Lease` per request cost more than the rest of
    the lease (pydantic validation, `uuid4`'s system call, a copy to hand out), most
    of all when a client's own work has pushed them out of the CPU caches.  The core
    takes the record as it is (`acquire_lease`) and gives it back to `release_lease`;
    pharox's API (`create_lease`, `get_lease`, `list_leases`) gets real `Lease`s.
    """

    __slots__ = ("acquired", "consumer_id", "entry", "expires", "id", "pool_id", "pool_name", "proxy_id", "released")

    def __init__(
        self,
        lease_id: int,
        proxy_id: UUID,
        consumer_id: UUID,
        pool_id: UUID,
        pool_name: str,
        acquired: float,
        expires: float,
        released: float | None = None,
        entry: _Entry | None = None,
    ) -> None:
        self.id = lease_id  # a UUID's integer: `UUID(int=record.id)` is the lease id
        self.proxy_id = proxy_id
        self.consumer_id = consumer_id
        self.pool_id = pool_id
        self.pool_name = pool_name
        self.acquired = acquired  # epoch seconds
        self.expires = expires
        self.released = released
        # The leased proxy's entry, so a release finds it without hashing a UUID (in
        # Python).  Valid while the record is live: deleting a proxy drops its leases.
        self.entry = entry

    def packed(self) -> _Packed:
        """The record as a tuple of plain numbers and text, which the garbage collector
        stops tracking: the released window keeps a thousand of them alive, and
        tracked records would be walked by every full collection until they drop out."""
        return (
            self.id,
            self.proxy_id.int,
            self.consumer_id.int,
            self.pool_id.int,
            self.pool_name,
            self.acquired,
            self.expires,
            self.released,
        )

    @classmethod
    def unpacked(cls, packed: _Packed) -> _LeaseRecord:
        lease_id, proxy_id, consumer_id, pool_id, pool_name, acquired, expires, released = packed
        ids = UUID(int=proxy_id), UUID(int=consumer_id), UUID(int=pool_id)
        return cls(lease_id, *ids, pool_name, acquired, expires, released)

    def to_lease(self) -> Lease:
        return Lease(
            id=UUID(int=self.id),
            proxy_id=self.proxy_id,
            consumer_id=self.consumer_id,
            pool_id=self.pool_id,
            pool_name=self.pool_name,
            status=LeaseStatus.ACTIVE if self.released is None else LeaseStatus.RELEASED,
            acquired_at=_moment(self.acquired),
            expires_at=_moment(self.expires),
            released_at=None if self.released is None else _moment(self.released),
        )


_Packed = tuple[int, int, int, int, str, float, float, "float | None"]


def _moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, timezone.utc)


def _lease_key(lease: Lease | _LeaseRecord) -> int:
    lease_id = lease.id
    return lease_id if isinstance(lease_id, int) else lease_id.int


class _Query:
    """A filter split into what the indexes answer and what must be called."""

    __slots__ = ("equal", "protocols", "residual")

    def __init__(self) -> None:
        self.equal: dict[str, object] = {}
        self.protocols: frozenset[ProxyProtocol] | None = None
        self.residual: list[_Check] = []

    def add(self, filters: ProxyFilters) -> bool:
        """Fold `filters` in; False when it contradicts what is already there."""
        for name in _TEXT_FIELDS:
            value = getattr(filters, name)
            if value and not self._require(name, value):
                return False
        if filters.asn is not None and not self._require("asn", filters.asn):
            return False
        if filters.latitude is not None and filters.longitude is not None:
            self.residual.append(_geo_check(filters.latitude, filters.longitude, filters.radius_km))
        predicate = filters.predicate
        if isinstance(predicate, ProtocolFilter):
            allowed = predicate.protocols
            self.protocols = allowed if self.protocols is None else self.protocols & allowed
            if not self.protocols:
                return False
        elif predicate is not None:
            self.residual.append(predicate)
        for child in filters.all_of or ():
            if not self.add(child):
                return False
        if filters.any_of:
            self.residual.append(_any_check(filters.any_of))
        if filters.none_of:
            self.residual.append(_none_check(filters.none_of))
        return True

    def _require(self, name: str, value: object) -> bool:
        known = self.equal.setdefault(name, value)
        return bool(known == value)

    def matches(self, proxy: Proxy) -> bool:
        for name, value in self.equal.items():
            if getattr(proxy, name) != value:
                return False
        if self.protocols is not None and proxy.protocol not in self.protocols:
            return False
        return all(check(proxy) for check in self.residual)


def _geo_check(latitude: float, longitude: float, radius_km: float | None) -> _Check:
    def check(proxy: Proxy) -> bool:
        if proxy.latitude is None or proxy.longitude is None:
            return False
        if radius_km is None:
            return isclose(proxy.latitude, latitude, abs_tol=1e-6) and isclose(
                proxy.longitude, longitude, abs_tol=1e-6
            )
        distance = haversine_distance_km(latitude, longitude, proxy.latitude, proxy.longitude)
        return distance <= radius_km

    return check


def _any_check(children: list[ProxyFilters]) -> _Check:
    return lambda proxy: any(child.matches(proxy) for child in children)


def _none_check(children: list[ProxyFilters]) -> _Check:
    return lambda proxy: not any(child.matches(proxy) for child in children)


class _Record:
    """A health record as stored: about a tenth of a `ProxyHealthRecord`'s memory.

    Its id is drawn the first time the record is read, then kept, so reads agree.
    """

    __slots__ = (
        "checked_at",
        "error",
        "id",
        "latency_ms",
        "protocol",
        "reachable",
        "status_after",
        "status_before",
    )

    def __init__(
        self,
        record_id: UUID | None,
        checked_at: datetime,
        reachable: bool,
        latency_ms: int | None,
        protocol: ProxyProtocol,
        status_before: ProxyStatus | None,
        status_after: ProxyStatus,
        error: str | None,
    ) -> None:
        self.id = record_id
        self.checked_at = checked_at
        self.reachable = reachable
        self.latency_ms = latency_ms
        self.protocol = protocol
        self.status_before = status_before
        self.status_after = status_after
        self.error = error

    def export(self, proxy_id: UUID) -> ProxyHealthRecord:
        if self.id is None:
            self.id = uuid4()
        return ProxyHealthRecord(
            id=self.id,
            proxy_id=proxy_id,
            checked_at=self.checked_at,
            reachable=self.reachable,
            latency_ms=self.latency_ms,
            protocol=self.protocol,
            status_before=self.status_before,
            status_after=self.status_after,
            error=self.error,
        )


def _field_keys(proxy: Proxy) -> list[tuple[str, object]]:
    keys: list[tuple[str, object]] = [
        (name, value) for name in _TEXT_FIELDS if (value := getattr(proxy, name))
    ]
    if proxy.asn is not None:
        keys.append(("asn", proxy.asn))
    return keys


_NO_PICK: tuple[Any, ...] = (object(), object(), None)


class MemoryStorage(IStorage):
    """Thread-safe in-process `IStorage` with O(log n) leasing and O(1) stats.

    `health_history` bounds the health records kept per proxy; `released_window`
    bounds how many released leases `get_lease`/`list_leases` still report.
    Beyond pharox's interface it offers what `pharox.utils.bootstrap_*` and the
    core use: `add_pool`, `add_proxy`, `add_consumer`, `get_proxy_by_id`,
    `get_pool_by_name` and `list_proxies_by_status`.

    `current_leases` is owned by the storage: it counts this storage's active
    leases, so a saved proxy keeps its count on update and starts at 0 on insert.
    """

    def __init__(self, *, health_history: int = 32, released_window: int = 1024) -> None:
        if health_history < 1:
            raise ValueError(f"health_history must be >= 1, got {health_history!r}")
        if released_window < 0:
            raise ValueError(f"released_window must be >= 0, got {released_window!r}")
        self._health_history = health_history
        self._released_window = released_window
        self._lock = threading.RLock()
        self._pools: dict[UUID, _Pool] = {}
        self._named: dict[str, _Pool] = {}  # by name: what every acquire looks up
        self._entries: dict[UUID, _Entry] = {}
        self._consumers: dict[str, UUID] = {}
        self._health: dict[UUID, deque[_Record]] = {}
        self._leases: dict[int, _LeaseRecord] = {}
        self._released: OrderedDict[int, _Packed] = OrderedDict()
        self._expiry: list[tuple[float, int]] = []  # (expiry epoch, lease id)
        # Lease ids: a random UUID's upper bits and a counter (unique in this storage,
        # without a system call per lease).
        self._id_base = uuid4().int & ~((1 << 48) - 1)
        self._next_id = count(1)
        self._stale_expiry = 0
        self._seq = count()
        self._queries: dict[int, tuple[ProxyFilters, _Query | None]] = {}
        # (filters, selector, pool name, pool, index, round robin) of the last pick
        # answered by one index; pools are only replaced by save/delete, which reset it.
        self._last_pick: tuple[Any, ...] = _NO_PICK
        self._site_store: MemorySiteStore | None = None

    # ------------------------------------------------------------------
    # Index maintenance (caller holds the lock)
    # ------------------------------------------------------------------

    @staticmethod
    def _key(strategy: SelectorStrategy, entry: _Entry) -> _Key:
        if strategy is _ROUND_ROBIN:
            return (entry.uid, entry)
        if strategy is _LEAST_USED:
            proxy = entry.proxy
            return (proxy.current_leases, _micros(proxy.checked_at), entry.uid, entry)
        if strategy is _LOWEST_LATENCY:
            if entry.latency is None:
                return (1, 0, entry.uid, entry)
            return (0, entry.latency, entry.uid, entry)
        return (entry.seq, entry)

    def _refresh(self, entry: _Entry) -> None:
        """Bring every index and counter of the entry's pool in line with it."""
        pool = entry.pool
        proxy = entry.proxy
        uid = proxy.id
        status = ProxyStatus(proxy.status)
        if status is not entry.status:
            if entry.status is not None:
                pool.by_status[entry.status].pop(uid, None)
            pool.by_status.setdefault(status, {})[uid] = entry
            entry.status = status
        active = status is _ACTIVE
        if active is not entry.active:
            pool.active += 1 if active else -1
            entry.active = active
        leases = proxy.current_leases
        self._mark_leased(entry, leases)
        limit = proxy.max_concurrency
        available = active and (limit is None or leases < limit)
        if available is not entry.available:
            pool.available += 1 if available else -1
            entry.available = available
        for order_id, order in pool.orders.items():
            old = entry.keys.get(order_id)
            strategy, protocols = order_id
            member = available and (protocols is None or proxy.protocol in protocols)
            new = self._key(strategy, entry) if member else None
            if old == new:
                continue
            if old is not None:
                order.remove(old)
                del entry.keys[order_id]
            if new is not None:
                order.add(new)
                entry.keys[order_id] = new

    def _recount(self, entry: _Entry, leases: int) -> None:
        """`_refresh` after a lease or a release, when only the lease count changed.

        Only LEAST_USED orders its index by lease count; the others keep their keys
        unless the proxy filled up or freed its last slot.
        """
        leased = leases > 0  # `_mark_leased`, inlined: this runs on every lease and release
        if leased is not entry.leased:
            entry.pool.leased += 1 if leased else -1
            entry.leased = leased
        limit = entry.proxy.max_concurrency
        if entry.available is (entry.active and (limit is None or leases < limit)) and not entry.pool.by_count:
            return
        self._refresh(entry)

    @staticmethod
    def _mark_leased(entry: _Entry, leases: int) -> None:
        """Bring the pool's count of leased proxies in line with the entry's lease count."""
        leased = leases > 0
        if leased is not entry.leased:
            entry.pool.leased += 1 if leased else -1
            entry.leased = leased

    def _attach(self, entry: _Entry) -> None:
        pool = entry.pool
        proxy = entry.proxy
        # Lease counts are then written straight into the stored proxy's fields: pydantic's
        # plain (unvalidated) assignment does no more than that, at a few times the cost.
        proxy.__pydantic_fields_set__.add("current_leases")
        pool.entries[proxy.id] = entry
        pool.by_protocol.setdefault(ProxyProtocol(proxy.protocol), {})[proxy.id] = entry
        for field_key in _field_keys(proxy):
            pool.by_field.setdefault(field_key, {})[proxy.id] = entry
        pool.total_leases += proxy.current_leases
        self._entries[proxy.id] = entry
        self._refresh(entry)

    def _detach(self, entry: _Entry) -> None:
        pool = entry.pool
        proxy = entry.proxy
        pid = proxy.id
        pool.entries.pop(pid, None)
        _discard(pool.by_protocol, ProxyProtocol(proxy.protocol), pid)
        for field_key in _field_keys(proxy):
            _discard(pool.by_field, field_key, pid)
        if entry.status is not None:
            _discard(pool.by_status, entry.status, pid)
        for order_id, key in entry.keys.items():
            pool.orders[order_id].remove(key)
        entry.keys.clear()
        pool.active -= entry.active
        pool.available -= entry.available
        pool.leased -= entry.leased
        pool.total_leases -= proxy.current_leases
        entry.status = None
        entry.active = entry.available = entry.leased = False
        self._entries.pop(pid, None)

    def _store_proxy(self, proxy: Proxy) -> None:
        """Insert or replace a proxy, keeping the storage-owned lease count."""
        pool = self._pools.get(proxy.pool_id)
        if pool is None:
            raise PoolNotFoundError(f"Pool {proxy.pool_id} does not exist.")
        stored = _copy_proxy(proxy)
        old = self._entries.get(proxy.id)
        if old is None:
            stored.current_leases = 0
            entry = _Entry(stored, pool, next(self._seq))
            # Records saved before the proxy (or kept across a re-add) still count.
            ring = self._health.get(proxy.id, ())
            entry.latency = next(
                (r.latency_ms for r in reversed(ring) if r.reachable and r.latency_ms is not None), None
            )
            self._attach(entry)
            return
        stored.current_leases = old.proxy.current_leases
        self._detach(old)
        old.proxy = stored
        old.pool = pool
        self._attach(old)

    def _order(
        self, pool: _Pool, strategy: SelectorStrategy, protocols: frozenset[ProxyProtocol] | None
    ) -> _SortedKeys:
        """The pool's index for `strategy` (over `protocols` only), built on first use.

        A client restricted to some protocols (the core always passes one for
        Scrapy) gets its own index, so even a pool that is mostly of other
        protocols answers in O(log n).  At most 4 selectors x 15 protocol sets.
        """
        order_id = (strategy, protocols)
        order = pool.orders.get(order_id)
        if order is None:
            if protocols is None:
                members: Iterable[_Entry] = pool.entries.values()
            else:
                members = chain.from_iterable(pool.by_protocol.get(p, {}).values() for p in protocols)
            keys = []
            for entry in members:
                if entry.available:
                    key = self._key(strategy, entry)
                    entry.keys[order_id] = key
                    keys.append(key)
            order = pool.orders[order_id] = _SortedKeys(keys)
            pool.by_count = pool.by_count or strategy is _LEAST_USED
        return order

    def _walk(
        self, pool: _Pool, strategy: SelectorStrategy, protocols: frozenset[ProxyProtocol] | None = None
    ) -> Iterator[_Entry]:
        """Available entries (of `protocols`) in the order `strategy` prefers them."""
        order = self._order(pool, strategy, protocols)
        if strategy is _ROUND_ROBIN and pool.rr_last is not None:
            start = (pool.rr_last + 1,)
            for key in order.iter_from(start):
                yield key[-1]
            for key in order.iter_from():
                if key >= start:
                    return
                yield key[-1]
            return
        for key in order.iter_from():
            yield key[-1]

    @staticmethod
    def _first(pool: _Pool, order: _SortedKeys, round_robin: bool) -> _Entry | None:
        """`next(self._walk(...))` without the generators: the pick of most requests."""
        key = order.after((pool.rr_last + 1,)) if round_robin and pool.rr_last is not None else order.first()
        return None if key is None else key[-1]

    def _compiled(self, filters: ProxyFilters) -> _Query | None:
        """`filters` split for the indexes (None: contradictory), once per filters object.

        Doors pass the same object on every request (the core caches the one made
        for their protocols); splitting it again cost as much as the pick.  A filters
        object is taken as a value: change filters by passing a new one.
        """
        cached = self._queries.get(id(filters))
        if cached is not None and cached[0] is filters:
            return cached[1]
        query = _Query()
        compiled = query if query.add(filters) else None
        if len(self._queries) >= 256:
            self._queries.clear()
        self._queries[id(filters)] = (filters, compiled)  # the kept reference pins the id
        return compiled

    def _scan_key(self, pool: _Pool, strategy: SelectorStrategy, entry: _Entry) -> _Key:
        if strategy is _ROUND_ROBIN:
            last = pool.rr_last
            return (last is not None and entry.uid <= last, entry.uid, entry)
        return self._key(strategy, entry)

    def _select(self, pool: _Pool, strategy: SelectorStrategy, query: _Query) -> _Entry | None:
        """The pick for a query one index cannot answer (field values, predicates)."""
        if pool.available == 0:
            return None
        protocols = query.protocols
        candidate_sets: list[Collection[_Entry]] = []
        for name, value in query.equal.items():
            members = pool.by_field.get((name, value))
            if not members:
                return None
            candidate_sets.append(members.values())
        if not candidate_sets:
            # Protocols come from their own index; anything else (predicates, geo,
            # any_of/none_of) is checked while walking in selector order.
            walk = self._walk(pool, strategy, protocols)
            return next((e for e in walk if query.matches(e.proxy)), None)
        smallest = min(candidate_sets, key=len)
        budget = len(smallest)
        if budget > _SMALL_CANDIDATE_SET:
            # A large candidate set usually matches early in selector order; walk
            # for as many steps as a scan would cost, then fall back to the scan.
            for entry in islice(self._walk(pool, strategy, protocols), budget):
                if query.matches(entry.proxy):
                    return entry
        best: _Key | None = None
        for entry in smallest:
            if entry.available and query.matches(entry.proxy):
                key = self._scan_key(pool, strategy, entry)
                if best is None or key < best:
                    best = key
        return None if best is None else best[-1]

    # ------------------------------------------------------------------
    # Leasing
    # ------------------------------------------------------------------

    def find_available_proxy(
        self,
        pool_name: str,
        filters: ProxyFilters | None = None,
        selector: SelectorStrategy | None = None,
    ) -> Proxy | None:
        """Pick an available proxy of the pool through the selector's index."""
        with self._lock:
            entry = self._pick(pool_name, filters, selector)
            return None if entry is None else _copy_proxy(entry.proxy)

    def _pick(
        self, pool_name: str, filters: ProxyFilters | None, selector: SelectorStrategy | None
    ) -> _Entry | None:
        """The selector's choice among the pool's available proxies, round-robin cursor
        moved past it (caller holds the lock)."""
        last = self._last_pick
        if not (last[0] is filters and last[1] is selector and last[2] == pool_name):
            pool = self._named.get(pool_name)
            if pool is None:
                return None
            if selector is None:
                strategy = _FIRST
            else:
                strategy = selector if selector.__class__ is SelectorStrategy else SelectorStrategy(selector)
            query = None if filters is None else self._compiled(filters)
            if filters is not None and query is None:
                return None  # contradictory filters
            if query is not None and (query.equal or query.residual):
                found = self._select(pool, strategy, query)
                if found is not None and strategy is _ROUND_ROBIN:
                    pool.rr_last = found.uid
                return found
            # One index answers (no filters, or protocols only).  A door asks with the
            # same pool, filters and selector on every request: remember which index.
            order = self._order(pool, strategy, None if query is None else query.protocols)
            last = self._last_pick = (filters, selector, pool_name, pool, order, strategy is _ROUND_ROBIN)
        pool, order, round_robin = last[3], last[4], last[5]
        if pool.available == 0:
            return None
        entry = self._first(pool, order, round_robin)
        if entry is not None and round_robin:
            pool.rr_last = entry.uid
        return entry

    def _pick_excluding(
        self,
        pool_name: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy | None,
        exclude: Collection[UUID],
    ) -> _Entry | None:
        """`_pick` passing over `exclude`: the selector's order walked past them (a few
        steps: the excluded are few next to the pool), round-robin cursor moved."""
        pool = self._named.get(pool_name)
        if pool is None or pool.available == 0:
            return None
        strategy = _FIRST if selector is None else SelectorStrategy(selector)
        query = None if filters is None else self._compiled(filters)
        if filters is not None and query is None:
            return None  # contradictory filters
        check = query is not None and bool(query.equal or query.residual)
        for entry in self._walk(pool, strategy, None if query is None else query.protocols):
            if entry.proxy.id in exclude or (check and not query.matches(entry.proxy)):  # type: ignore[union-attr]
                continue
            if strategy is _ROUND_ROBIN:
                pool.rr_last = entry.uid
            return entry
        return None

    def create_lease(self, proxy: Proxy, consumer_name: str, duration_seconds: int) -> Lease:
        """Lease `proxy`; refuses one that is full or no longer ACTIVE.

        pharox's `ProxyManager` finds and leases in two calls, so another thread can
        take the last slot (or a health check can bench the proxy) in between;
        that surfaces here as `ProxyUnavailableError`, as with pharox's storages.
        """
        if duration_seconds <= 0:
            raise InvalidLeaseError("duration_seconds must be positive.")
        with self._lock:
            consumer_id = self._consumers.get(consumer_name)
            if consumer_id is None:
                raise ConsumerNotFoundError(f"Consumer with name {consumer_name!r} not found.")
            entry = self._entries.get(proxy.id)
            if entry is None:
                raise ProxyNotFoundError(f"Proxy with ID {proxy.id} not found in storage.")
            if not entry.available:
                raise ProxyUnavailableError(f"Proxy {proxy.id} is no longer available.")
            record = self._lease(entry, consumer_id, duration_seconds)
        return record.to_lease()

    def acquire_lease(
        self,
        pool_name: str,
        consumer_name: str,
        duration_seconds: int,
        filters: ProxyFilters | None = None,
        selector: SelectorStrategy | None = None,
        exclude: Collection[UUID] = (),
    ) -> _LeaseRecord | None:
        """Find and lease in one step under the lock (extension; the core prefers it).

        pharox's manager finds (one proxy copy) then leases (a race window); here the
        pick and the lease happen together, so neither the copy nor the race exists.
        Expired leases are swept first, as pharox's manager does before every acquire.
        `exclude`: proxies passed over (already tried by the request, or held off its
        site), skipped while walking the selector's order instead of by a pool scan.
        Returns the storage's own record (`to_lease()` for a pharox `Lease`); give it
        back to `release_lease` as it is.
        """
        if duration_seconds <= 0:
            raise InvalidLeaseError("duration_seconds must be positive.")
        with self._lock:  # one contended acquisition; the sweep re-enters it (RLock)
            if self._expiry and self._expiry[0][0] < time.time():
                self.cleanup_expired_leases()
            if exclude:
                entry = self._pick_excluding(pool_name, filters, selector, exclude)
            else:
                entry = self._pick(pool_name, filters, selector)
            if entry is None:
                return None
            consumer_id = self._consumers.get(consumer_name)
            if consumer_id is None:
                consumer_id = self._consumers[consumer_name] = uuid4()
            return self._lease(entry, consumer_id, duration_seconds)

    def _lease(self, entry: _Entry, consumer_id: UUID, duration_seconds: int) -> _LeaseRecord:
        now = time.time()
        pool = entry.pool
        record = _LeaseRecord(
            self._id_base | next(self._next_id),
            entry.proxy.id,
            consumer_id,
            pool.model.id,
            pool.model.name,
            now,
            now + duration_seconds,
            entry=entry,
        )
        self._leases[record.id] = record
        heapq.heappush(self._expiry, (record.expires, record.id))
        proxy = entry.proxy
        leases = proxy.current_leases + 1
        proxy.__dict__["current_leases"] = leases  # see `_attach`
        pool.total_leases += 1
        self._recount(entry, leases)
        return record

    def release_lease(self, lease: Lease | _LeaseRecord) -> None:
        """Release an active lease; unknown or already released leases are ignored.

        Takes a pharox `Lease` or the record `acquire_lease` handed out.
        """
        if lease.__class__ is _LeaseRecord:  # the core's own record: the common case
            with self._lock:
                self._release(lease.id, None)
            return
        released = lease.released_at.timestamp() if isinstance(lease, Lease) and lease.released_at else None
        with self._lock:
            self._release(_lease_key(lease), released)

    def _release(self, lease_id: int, released_at: float | None, *, compact: bool = True) -> bool:
        stored = self._leases.pop(lease_id, None)
        if stored is None:
            return False
        stored.released = released_at or time.time()
        if self._released_window:
            self._released[lease_id] = stored.packed()
            if len(self._released) > self._released_window:
                self._released.popitem(last=False)
        entry = stored.entry  # every live record has one (`_lease`)
        stored.entry = None  # a released record kept by a caller does not pin the entry
        if entry is not None:
            proxy = entry.proxy
            leases = proxy.current_leases - 1
            if leases >= 0:
                proxy.__dict__["current_leases"] = leases  # see `_attach`
                entry.pool.total_leases -= 1
                self._recount(entry, leases)
        self._stale_expiry += 1
        if compact and self._stale_expiry > 2 * len(self._leases) + 1024:
            # The heap still holds entries of leases released before expiring;
            # rebuild it from live leases so it never outgrows them for long.
            self._expiry = [(kept.expires, kept.id) for kept in self._leases.values()]
            heapq.heapify(self._expiry)
            self._stale_expiry = 0
        return True

    def cleanup_expired_leases(self) -> int:
        """Release expired leases, oldest expiry first; O(1) when none expired."""
        with self._lock:
            heap = self._expiry
            if not heap:
                return 0
            now = time.time()
            cleaned = 0
            while heap and heap[0][0] < now:
                _, lease_id = heapq.heappop(heap)
                # Either the lease is live (and `_release` counts its heap entry as
                # stale) or the entry was already stale: it is gone from the heap now.
                if self._release(lease_id, now, compact=False):
                    cleaned += 1
                self._stale_expiry -= 1
            return cleaned

    def ensure_consumer(self, consumer_name: str) -> UUID:
        """Return the consumer's id, creating it on first use."""
        with self._lock:
            consumer_id = self._consumers.get(consumer_name)
            if consumer_id is None:
                consumer_id = self._consumers[consumer_name] = uuid4()
            return consumer_id

    def add_consumer(self, consumer: Consumer) -> None:
        """Register a consumer with a known id (used by `bootstrap_consumer`)."""
        with self._lock:
            self._consumers[consumer.name] = consumer.id

    def get_pool_stats(self, pool_name: str) -> PoolStatsSnapshot | None:
        """Pool totals from running counters: O(1)."""
        with self._lock:
            pool = self._named.get(pool_name)
            if pool is None:
                return None
            return PoolStatsSnapshot(
                pool_name=pool.model.name,
                total_proxies=len(pool.entries),
                active_proxies=pool.active,
                available_proxies=pool.available,
                leased_proxies=pool.leased,
                total_leases=pool.total_leases,
            )

    # ------------------------------------------------------------------
    # Health
    # ------------------------------------------------------------------

    def apply_health_check_result(self, result: HealthCheckResult) -> Proxy | None:
        """Set status and checked_at, record the check, and re-index the proxy."""
        with self._lock:
            entry = self._entries.get(result.proxy_id)
            if entry is None:
                return None
            proxy = entry.proxy
            status_before = proxy.status
            proxy.status = result.status
            proxy.checked_at = result.checked_at
            record = _Record(
                None,
                result.checked_at,
                result.status in (ProxyStatus.ACTIVE, ProxyStatus.SLOW),
                result.latency_ms,
                result.protocol,
                status_before,
                result.status,
                result.error_message,
            )
            self._append_record(result.proxy_id, record)
            self._refresh(entry)
            return _copy_proxy(proxy)

    def _append_record(self, proxy_id: UUID, record: _Record) -> None:
        ring = self._health.get(proxy_id)
        if ring is None:
            ring = self._health[proxy_id] = deque(maxlen=self._health_history)
        ring.append(record)
        if record.reachable and record.latency_ms is not None:
            entry = self._entries.get(proxy_id)
            if entry is not None:
                # Kept apart from the ring so LOWEST_LATENCY still knows the last
                # good latency after a run of failures has pushed it out.
                entry.latency = record.latency_ms

    def save_health_record(self, record: ProxyHealthRecord) -> None:
        """Append a health observation to the proxy's bounded history."""
        with self._lock:
            self._append_record(
                record.proxy_id,
                _Record(
                    record.id,
                    record.checked_at,
                    record.reachable,
                    record.latency_ms,
                    record.protocol,
                    record.status_before,
                    record.status_after,
                    record.error,
                ),
            )
            entry = self._entries.get(record.proxy_id)
            if entry is not None:
                self._refresh(entry)

    def get_last_health_result(self, proxy_id: UUID) -> HealthCheckResult | None:
        """The newest health record, as a result."""
        with self._lock:
            ring = self._health.get(proxy_id)
            if not ring:
                return None
            record = ring[-1]
            return HealthCheckResult(
                proxy_id=proxy_id,
                status=record.status_after,
                latency_ms=record.latency_ms or 0,
                protocol=record.protocol,
                checked_at=record.checked_at,
                error_message=record.error,
            )

    def list_health_records(self, proxy_id: UUID, limit: int = 100) -> list[ProxyHealthRecord]:
        """Up to `limit` most recent records (at most `health_history`), newest first."""
        with self._lock:
            ring = self._health.get(proxy_id)
            if not ring or limit <= 0:
                return []
            return [record.export(proxy_id) for record in islice(reversed(ring), limit)]

    # ------------------------------------------------------------------
    # Pools and proxies
    # ------------------------------------------------------------------

    def save_pool(self, pool: ProxyPool) -> None:
        """Insert or update a pool (a rename frees the old name)."""
        with self._lock:
            stored = pool.model_copy()
            current = self._pools.get(stored.id)
            if current is None:
                current = self._pools[stored.id] = _Pool(stored)
            else:
                if self._named.get(current.model.name) is current:
                    del self._named[current.model.name]
                current.model = stored
            self._named[stored.name] = current
            self._last_pick = _NO_PICK

    def add_pool(self, pool: ProxyPool) -> None:
        """Alias of `save_pool` (used by `pharox.utils.bootstrap_pool`)."""
        self.save_pool(pool)

    def get_pool(self, pool_id: str) -> ProxyPool:
        """The pool with this id, or `PoolNotFoundError`."""
        with self._lock:
            pool = self._pool_or_raise(pool_id)
            return pool.model.model_copy()

    def get_pool_by_name(self, name: str) -> ProxyPool | None:
        """The pool with this name, or None."""
        with self._lock:
            pool = self._named.get(name)
            return None if pool is None else pool.model.model_copy()

    def list_pools(self) -> list[ProxyPool]:
        """Every pool."""
        with self._lock:
            return [pool.model.model_copy() for pool in self._pools.values()]

    def delete_pool(self, pool_id: str) -> None:
        """Delete a pool with its proxies, their leases and health history."""
        with self._lock:
            pool = self._pool_or_raise(pool_id)
            doomed = set(pool.entries)
            for entry in list(pool.entries.values()):
                self._forget_proxy(entry)
            self._drop_leases(doomed)
            del self._pools[pool.model.id]
            if self._named.get(pool.model.name) is pool:
                del self._named[pool.model.name]
            self._last_pick = _NO_PICK

    def _pool_or_raise(self, pool_id: str | UUID) -> _Pool:
        uid = _as_uuid(pool_id)
        pool = self._pools.get(uid) if uid is not None else None
        if pool is None:
            raise PoolNotFoundError(f"Pool {str(pool_id)!r} not found.")
        return pool

    def add_proxy(self, proxy: Proxy) -> None:
        """Insert or update one proxy (used by `pharox.utils.bootstrap_proxy`)."""
        with self._lock:
            self._store_proxy(proxy)

    def save_proxy(self, proxy: Proxy) -> None:
        """Insert or update a proxy; status or field changes move it between indexes."""
        with self._lock:
            self._store_proxy(proxy)

    def add_proxies_bulk(self, proxies: Sequence[Proxy]) -> int:
        """Add proxies at once; nothing is added if any names an unknown pool."""
        with self._lock:
            for proxy in proxies:
                if proxy.pool_id not in self._pools:
                    raise PoolNotFoundError(f"Pool with ID {proxy.pool_id} does not exist.")
            for proxy in proxies:
                self._store_proxy(proxy)
        return len(proxies)

    def get_proxy_by_id(self, proxy_id: UUID) -> Proxy | None:
        """A copy of the proxy, or None."""
        with self._lock:
            entry = self._entries.get(proxy_id)
            return None if entry is None else _copy_proxy(entry.proxy)

    def peek_proxy(self, proxy_id: UUID) -> Proxy | None:
        """The stored proxy itself, not a copy: read it, never change it (extension).

        The core reads a proxy's address once per proxy; a model copy for that costs
        more than the lease.  A save replaces the stored object, so what a reader
        holds never changes under it except for the lease count.
        """
        entry = self._entries.get(proxy_id)  # one dict read: atomic, no lock needed
        return None if entry is None else entry.proxy

    def get_proxy(self, proxy_id: str) -> Proxy:
        """A copy of the proxy, or `ProxyNotFoundError`."""
        with self._lock:
            uid = _as_uuid(proxy_id)
            entry = self._entries.get(uid) if uid is not None else None
            if entry is None:
                raise ProxyNotFoundError(f"Proxy {str(proxy_id)!r} not found.")
            return _copy_proxy(entry.proxy)

    def list_proxies(self, pool_id: str) -> list[Proxy]:
        """Copies of every proxy of the pool, in insertion order."""
        with self._lock:
            pool = self._pool_or_raise(pool_id)
            return [_copy_proxy(entry.proxy) for entry in pool.entries.values()]

    def list_proxies_by_status(
        self, pool_name: str, statuses: Collection[ProxyStatus]
    ) -> list[Proxy]:
        """Proxies of the pool in any of `statuses`, from the per-status index."""
        with self._lock:
            pool = self._named.get(pool_name)
            if pool is None:
                return []
            found: list[Proxy] = []
            for status in dict.fromkeys(ProxyStatus(s) for s in statuses):
                members = pool.by_status.get(status)
                if members:
                    found.extend(_copy_proxy(entry.proxy) for entry in members.values())
            return found

    def delete_proxy(self, proxy_id: str) -> None:
        """Delete a proxy with its active leases and health history."""
        with self._lock:
            uid = _as_uuid(proxy_id)
            entry = self._entries.get(uid) if uid is not None else None
            if entry is None:
                raise ProxyNotFoundError(f"Proxy {str(proxy_id)!r} not found.")
            self._forget_proxy(entry)
            self._drop_leases({entry.proxy.id})

    def _forget_proxy(self, entry: _Entry) -> None:
        self._detach(entry)
        self._health.pop(entry.proxy.id, None)

    def _drop_leases(self, proxy_ids: set[UUID]) -> None:
        # Admin path: a scan of the active leases is fine here.
        for lease_id in [lid for lid, lease in self._leases.items() if lease.proxy_id in proxy_ids]:
            del self._leases[lease_id]
            self._stale_expiry += 1

    # ------------------------------------------------------------------
    # Leases (read side)
    # ------------------------------------------------------------------

    def get_lease(self, lease_id: str) -> Lease | None:
        """An active lease, or a recently released one (see `released_window`)."""
        with self._lock:
            uid = _as_uuid(lease_id)
            if uid is None:
                return None
            lease = self._leases.get(uid.int)
            packed = self._released.get(uid.int) if lease is None else None
        if packed is not None:
            lease = _LeaseRecord.unpacked(packed)
        return None if lease is None else lease.to_lease()

    def list_leases(self, consumer_id: str | None = None) -> list[Lease]:
        """Active leases, then the recently released window."""
        with self._lock:
            records: Iterable[_LeaseRecord] = list(self._leases.values())
            released = list(self._released.values())
        records = chain(records, map(_LeaseRecord.unpacked, released))
        if consumer_id is not None:
            wanted = _as_uuid(consumer_id)
            records = [lease for lease in records if lease.consumer_id == wanted]
        return [lease.to_lease() for lease in records]

    def active_lease_count(self) -> int:
        """How many leases are held right now (diagnostics and tests)."""
        with self._lock:
            return len(self._leases)

    # ------------------------------------------------------------------
    # Per-site holds
    # ------------------------------------------------------------------

    def site_store(self) -> MemorySiteStore:
        """The per-site holds of this storage: one store per storage object, so every
        broker on it keeps the same proxies off the same sites."""
        store = self._site_store
        if store is None:
            from ..sites import MemorySiteStore  # only brokers need it: imported late

            with self._lock:
                if self._site_store is None:
                    self._site_store = MemorySiteStore()
                store = self._site_store
        return store


def _discard(index: dict[Any, dict[UUID, _Entry]], key: object, pid: UUID) -> None:
    members = index.get(key)
    if members is not None:
        members.pop(pid, None)
        if not members:
            del index[key]
