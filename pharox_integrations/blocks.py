"""Lease blocks: a process on a shared storage leases proxies a few at a time and hands
them out to its requests locally, so a crawl does not pay a database round trip per
request.

A slot is one storage lease, held by this process and lent to one request at a time:
`max_concurrency` stays exact across processes (each slot counts in the storage), and a
killed process's slots come back after `lease_seconds` like any lease (the block renews
them by one statement while the process lives).  What is held is bounded by what the
process uses:

- a slot idle longer than `idle_seconds` goes back to the storage (no hoarding);
- a slot older than `max_age` goes back when its request ends, so the block turns over
  and the storage's selector still rotates the whole pool;
- a slot of a proxy with a `max_concurrency` goes back as soon as its request ends (kept
  free, it would keep another process off that proxy), and so does every slot while the
  pool is contended (a lease was refused lately): processes share a tight pool as they
  do without blocks;
- a slot whose proxy another process benched goes back within `status_seconds`.

Growth is batched too: takes that find no free slot at the same moment wait for one of
them, which leases a proxy for each in one transaction (`acquire_leases`, proxies without
a limit only), so a crawl's first burst of 32 requests costs a few transactions, not 32
leases and 32 reads.  Releases are written in batches (one transaction for many).
`close()` gives back everything.  Health is not here: the ledger already writes routine
successes at most once a minute per proxy, and every status change at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any
from uuid import UUID

from pharox import Lease, Proxy, ProxyFilters, SelectorStrategy

from .health import BENCHED

_MAINTAIN_SECONDS = 0.05
_BATCH_SECONDS = 0.25  # releases written together at most this often...
_BATCH_MAX = 16  # ...unless this many wait
_CONTENDED_SECONDS = 5.0  # after a refused lease, slots go back as their requests end
_GROW_MAX = 32  # storage leases taken at once, at most
logger = logging.getLogger("pharox_integrations")


class Slot:
    """One storage lease of the block, lent to one request at a time (a `LeaseHandle`)."""

    __slots__ = ("block", "lease", "limited", "proxy", "proxy_id", "taken", "used")

    def __init__(self, lease: Lease, block: LeaseBlock, limited: bool, proxy: Proxy | None) -> None:
        self.lease = lease
        self.proxy_id: UUID = lease.proxy_id
        self.block = block
        self.limited = limited  # its proxy has a max_concurrency: goes back when its request ends
        self.proxy = proxy  # as read when first leased here: its first `ProxyLease` needs no read
        self.taken = time.monotonic()  # when the storage lease was taken
        self.used = self.taken  # when it was last given back by a request

    def to_lease(self) -> Lease:
        return self.lease


class LeaseBlock:
    """The slots of one (pool, filters, selector), for one broker."""

    def __init__(
        self,
        storage: Any,
        consumer: str,
        lease_seconds: int,
        pool: str,
        filters: ProxyFilters | None,
        selector: SelectorStrategy,
        benched_now: Callable[[UUID], bool],
        *,
        idle_seconds: float = 0.25,
        max_age: float = 15.0,
        status_seconds: float = 1.0,
        spread: int = 8,
    ) -> None:
        self.storage = storage
        self.consumer = consumer
        self.lease_seconds = lease_seconds
        self.pool = pool
        self.filters = filters
        self.selector = selector
        self._benched_now = benched_now  # this process's own verdicts, known at once
        self.idle_seconds = idle_seconds
        self.max_age = max_age
        self.status_seconds = status_seconds
        self.spread = spread  # slots kept in turn even for one request at a time: rotation
        self._lock = threading.Lock()
        self._free: deque[Slot] = deque()
        self._lent: set[Slot] = set()
        # Proxies with a max_concurrency: a free slot of one would keep another process
        # off it, so such slots go back as soon as their request ends (read once a proxy).
        self._limited: dict[UUID, bool] = {}
        self._to_release: list[Lease] = []
        self._contended_until = 0.0
        # One upkeep thread gives idle slots back when requests stop, while the block holds
        # any.  A give-back only sets `_armed`: it may run on an event loop, and starting a
        # thread there waits for the new thread to run (3 ms on average, up to 38 ms, in a
        # crawl on this 2-core machine).  `take` starts it, off the loop.
        self._armed = threading.Event()
        self._closed = threading.Event()
        self._upkeeping = False
        # Growth: one take at a time leases, for all takes waiting (`_waiting`) at once.
        self._many = getattr(storage, "acquire_leases", None)
        self._sweep = getattr(storage, "cleanup_expired_leases", None)
        self._leasing = False
        self._leased = threading.Condition(self._lock)
        self._waiting = 0
        # Takes an event loop announced (`lend` had no slot, the request went off the
        # loop) that have not started yet: they queue for a worker thread, and the
        # growth before them leases for them too.
        self._coming = 0
        now = time.monotonic()
        self._next_maintain = now + _MAINTAIN_SECONDS
        self._next_batch = now
        self._next_renew = now + lease_seconds / 3
        self._next_status = now + status_seconds
        self.counters = dict.fromkeys(
            (
                "slots_taken",
                "storage_takes",
                "slots_lent",
                "slots_lent_inline",
                "slots_released",
                "release_batches",
                "refused",  # storage leases refused: the pool counts as contended for a while
            ),
            0,
        )

    # ------------------------------------------------------------------ requests

    def lend(self, avoid: Collection[UUID]) -> Slot | None:
        """A free slot without any I/O (an event loop may call this inline), or None
        when the block would rather grow or has none free: then `take`, off the loop."""
        with self._lock:
            slot = None if self._growing() else self._pop_free(avoid)
            if slot is not None:
                self.counters["slots_lent_inline"] += 1
            else:
                self._coming += 1  # its `take` follows: the next growth leases for it too
        return slot

    def announce(self, takes: int) -> None:
        """`takes` requests are on their way to `take` (sent off an event loop before
        this block existed): the first growth leases for them too."""
        with self._lock:
            self._coming += takes

    def _growing(self) -> bool:
        return len(self._free) + len(self._lent) < self.spread and time.monotonic() >= self._contended_until

    def _pop_free(self, avoid: Collection[UUID]) -> Slot | None:
        """The oldest free slot this request may use, now lent (caller holds the lock)."""
        for _ in range(len(self._free)):
            slot = self._free.popleft()
            if slot.proxy_id in avoid:
                self._free.append(slot)
                continue
            return self._lend(slot)
        return None

    def _lend(self, slot: Slot) -> Slot:
        """`slot`, now lent to one request (caller holds the lock)."""
        self._lent.add(slot)
        self.counters["slots_lent"] += 1
        return slot

    def unlend(self, slot: Slot) -> None:
        """A slot `lend` gave out that its request could not use: first in line again."""
        with self._lock:
            self._lent.discard(slot)
            self._free.appendleft(slot)
            self.counters["slots_lent"] -= 1
            self.counters["slots_lent_inline"] -= 1

    def take(self, avoid: Collection[UUID]) -> Slot | None:
        """A slot for one request: a free one of the block (oldest first, so requests
        rotate over the block), else new storage leases; None when the pool has none.
        Below `spread` slots the block grows first, so even one request at a time
        rotates over several proxies (the storage's selector picks them).

        One take at a time leases from the storage, for every take waiting then: a
        crawl's first 32 requests cost a few transactions, not 32 leases and 32 reads.
        """
        self.maintain()
        with self._lock:
            self._waiting += 1
            if self._coming:
                self._coming -= 1  # this take was announced by `lend`
            try:
                while True:
                    grow = self._growing()
                    slot = None if grow else self._pop_free(avoid)
                    if slot is not None:
                        return slot
                    if not self._leasing:
                        break
                    self._leased.wait(1.0)  # the take leasing for everyone waiting
                self._leasing = True
            finally:
                self._waiting -= 1
        try:
            return self._grow(avoid, grow)
        finally:
            with self._lock:
                self._leasing = False
                self._leased.notify_all()

    def _grow(self, avoid: Collection[UUID], grow: bool) -> Slot | None:
        """New storage leases: one for this take and each take waiting for it, at once
        where the storage can (proxies without a limit), else one; the first this
        request may use is lent to it, the others are left free for the waiting takes."""
        for attempt in range(4):  # the storage's pick may be one this request avoids: keep it for others
            with self._lock:
                want = 1 if attempt else min(_GROW_MAX, self._waiting + 1 + self._coming)
            many = self._many if want > 1 and time.monotonic() >= self._contended_until else None
            got = many(self.pool, self.consumer, self.lease_seconds, want, self.filters, self.selector) if many else []
            if not got:
                lease = self.storage.acquire_lease(
                    self.pool, self.consumer, self.lease_seconds, self.filters, self.selector
                )
                if lease is None:
                    self._contended_until = time.monotonic() + _CONTENDED_SECONDS
                    self.counters["refused"] += 1
                    if not grow:
                        return None
                    with self._lock:
                        return self._pop_free(avoid)
                limited, proxy = self._limited.get(lease.proxy_id), None
                if limited is None:  # a proxy new here: read once, for its limit and its endpoint
                    proxy = self._read(lease.proxy_id)
                    limited = self._limited[lease.proxy_id] = proxy is None or proxy.max_concurrency is not None
                got = [(lease, proxy)]
            else:
                for lease, proxy in got:
                    self._limited[lease.proxy_id] = proxy.max_concurrency is not None
            with self._lock:
                # The extra slots serve the takes waiting, then the announced ones.  (An
                # announced take that never comes costs one idle slot, once.)
                self._coming = max(0, self._coming - max(0, len(got) - 1 - self._waiting))
                self.counters["slots_taken"] += len(got)
                self.counters["storage_takes"] += 1
                if not self._upkeeping:
                    self._upkeeping = True
                    threading.Thread(target=self._upkeep, name=f"pharox-block-{self.pool}", daemon=True).start()
                mine = None
                for lease, proxy in got:
                    slot = Slot(lease, self, self._limited[lease.proxy_id], proxy)
                    if mine is None and lease.proxy_id not in avoid:
                        mine = self._lend(slot)
                    else:
                        self._free.append(slot)  # for the takes waiting (or the next request)
                if mine is not None:
                    return mine
        return None

    def give_back(self, slot: Slot) -> None:
        """A request is done with its slot: kept for the next one, or released.  No I/O
        unless `quiet` says otherwise (the slot is then released at once): the upkeep
        runs on the next `take` or on the block's upkeep thread."""
        now = time.monotonic()
        urgent = not self.quiet(slot)  # another process may be waiting for this proxy
        with self._lock:
            self._lent.discard(slot)
            slot.used = now
            if urgent or now - slot.taken >= self.max_age or self._benched_now(slot.proxy_id):
                self._to_release.append(slot.lease)
            else:
                self._free.append(slot)
            if not self._armed.is_set():
                self._armed.set()  # requests may stop here: the slot must still go back when idle
        if urgent:
            self.maintain(force=True)

    def quiet(self, slot: Slot) -> bool:
        """Whether giving `slot` back does no I/O: not when its proxy has a
        `max_concurrency`, the pool is contended or the block is closed (then it is
        released at once)."""
        return not slot.limited and time.monotonic() >= self._contended_until and not self._closed.is_set()

    def _read(self, proxy_id: UUID) -> Proxy | None:
        try:
            proxy: Proxy = self.storage.get_proxy(str(proxy_id))
        except Exception:  # gone or unreadable: its slots go back at once (counted as limited)
            return None
        return proxy

    def _upkeep(self) -> None:
        """The block's thread: `idle_seconds` after a slot came back, the upkeep runs,
        again while slots are kept or releases wait; it sleeps until the next give-back
        while slots are lent, and ends when the block holds nothing (or is closed)."""
        while True:
            self._armed.wait()
            if self._closed.wait(self.idle_seconds + _MAINTAIN_SECONDS):
                return
            self._armed.clear()  # a give-back from now on arms it again
            try:
                self.maintain(force=True)
                if self._sweep is not None:
                    self._sweep()  # expired leases of dead processes back (rate-limited by the storage)
            except Exception:  # the storage is down: the next request's upkeep tries again
                logger.exception("lease block of pool %(pool)s: giving back idle slots failed", {"pool": self.pool})
            with self._lock:
                if self._free or self._to_release:
                    self._armed.set()
                elif not self._lent:
                    self._upkeeping = False  # nothing held: the next `take` starts another
                    return

    # ------------------------------------------------------------------ upkeep

    def maintain(self, *, force: bool = False) -> None:
        """Idle slots back, releases written, leases renewed, benched proxies dropped:
        at most every few ms, on a `take` (off an event loop) or the block's upkeep thread."""
        now = time.monotonic()
        if not force and now < self._next_maintain:
            return
        with self._lock:
            if not force and now < self._next_maintain:
                return
            self._next_maintain = now + _MAINTAIN_SECONDS
            while self._free and (now - self._free[0].used >= self.idle_seconds or now < self._contended_until):
                self._to_release.append(self._free.popleft().lease)
            # The deque is in give-back order: only its head can have been idle longest.
            # Releases go in batches, at most every `_BATCH_SECONDS` (sooner when many wait
            # or the pool is contended: another process may be waiting for them).
            releasing: list[Lease] = []
            if self._to_release and (
                force or now >= self._next_batch or len(self._to_release) >= _BATCH_MAX or now < self._contended_until
            ):
                releasing, self._to_release = self._to_release, []
                self._next_batch = now + _BATCH_SECONDS
            renew = now >= self._next_renew
            if renew:
                self._next_renew = now + self.lease_seconds / 3
                held = [s.lease for s in (*self._free, *self._lent)]
            check = now >= self._next_status and bool(self._free)
            if check:
                self._next_status = now + self.status_seconds
        if releasing:
            self._release(releasing)
        if renew and held:
            self.storage.renew_leases(held, self.lease_seconds)
        if check:
            self._drop_benched()

    def _release(self, leases: list[Lease]) -> None:
        self.storage.release_leases(leases)
        with self._lock:
            self.counters["slots_released"] += len(leases)
            self.counters["release_batches"] += 1

    def _drop_benched(self) -> None:
        """Free slots of proxies another process benched go back (a status change is
        seen within `status_seconds`)."""
        benched = {p.id for p in self.storage.list_proxies_by_status(self.pool, BENCHED)}
        if not benched:
            return
        with self._lock:
            gone = [s for s in self._free if s.proxy_id in benched]
            for slot in gone:
                self._free.remove(slot)
        if gone:
            self._release([s.lease for s in gone])

    def holds(self) -> int:
        """Storage leases this block holds (lent or free)."""
        with self._lock:
            return len(self._free) + len(self._lent)

    def close(self) -> None:
        """Give back every free slot and anything pending (lent slots go back when their
        request ends)."""
        with self._lock:
            releasing = self._to_release + [s.lease for s in self._free]
            self._to_release, self._free = [], deque()
            self._closed.set()
            self._armed.set()  # wakes the upkeep thread, which ends
        if releasing:
            self._release(releasing)


class Blocks:
    """A broker's lease blocks, one per (pool, filters) (the broker has one selector),
    made by `make` for the first request that needs one."""

    def __init__(self, make: Callable[[str, ProxyFilters | None], LeaseBlock], lock: threading.RLock) -> None:
        self._make = make
        self._lock = lock
        self._by_key: dict[tuple[str, int], LeaseBlock] = {}  # filters by identity (kept by the block)

    def find(self, pool: str, filters: ProxyFilters | None) -> LeaseBlock | None:
        block = self._by_key.get((pool, id(filters)))
        return block if block is not None and block.filters is filters else None

    def get(self, pool: str, filters: ProxyFilters | None) -> LeaseBlock:
        block = self.find(pool, filters)
        if block is None:
            with self._lock:
                block = self.find(pool, filters)
                if block is None:
                    block = self._by_key[(pool, id(filters))] = self._make(pool, filters)
        return block

    def all(self) -> list[LeaseBlock]:
        return list(self._by_key.values())


def supports_blocks(storage: object) -> bool:
    """Storages that can renew and release many leases in one statement (ours, SQL)."""
    return all(callable(getattr(storage, name, None)) for name in ("renew_leases", "release_leases", "acquire_lease"))
