"""The health ledger: what this process knows of each proxy's health, what it writes to
the storage, and the revival of benched proxies.

The policy (`health.py`) judges; the ledger counts verdicts against proxies, benches
them in the storage, and brings them back when their cool-down is over, also when
another process sharing the storage benched them.
"""

from __future__ import annotations

import heapq
import logging
import statistics
import struct
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pharox import HealthCheckResult, IStorage, PharoxError, Proxy, ProxyPool, ProxyProtocol, ProxyStatus

from .bridge import Claim
from .health import BENCHED, HealthPolicy, Verdict, strikes_from_records
from .lease import _Endpoint

if TYPE_CHECKING:
    from .lease import ProxyLease

logger = logging.getLogger("pharox_integrations")

_REVIVED = "revived after cool-down"
_DOUBLE = struct.Struct("d")


class ProxyState:
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


class HealthLedger:
    """Verdicts counted against proxies, benches written, cool-downs ended.

    Shares the broker's lock and counters; `record` is called with the lock held (it
    is on every request's path), everything that writes to the storage without it.
    """

    def __init__(
        self,
        storage: IStorage,
        policy: HealthPolicy,
        lock: threading.RLock,
        counters: dict[str, int],
        pool_record: Callable[[str], ProxyPool | None],
        revive_scan_seconds: float,
    ) -> None:
        self.storage = storage
        self.policy = policy
        self._lock = lock
        self.counters = counters
        self._pool_record = pool_record
        self.revive_scan_seconds = revive_scan_seconds
        self.states: dict[UUID, ProxyState] = {}
        self._revivals: list[tuple[float, UUID, str]] = []  # (wall time, proxy id, pool) heap
        self._last_scan: dict[str, float] = {}
        self._due_claimed: dict[str, Claim] = {}  # a due revival or scan left to one request

    # ------------------------------------------------------------------ per lease

    def adopt(self, lease: ProxyLease, state: ProxyState | None) -> ProxyState:
        """The state a new lease reports to (caller holds the lock): made on the proxy's
        first lease here; a proxy leased again is no longer benched, whoever revived it."""
        if state is None or state.endpoint is None:
            state = self.states.get(lease.proxy_id)
            if state is None:
                state = self.states[lease.proxy_id] = ProxyState(last_flush=lease.started)
            state.endpoint = lease._endpoint
        if state.benched:
            state.benched = False
            state.revived = True
            state.failures = 0
        return state

    def record(
        self, lease: ProxyLease, verdict: Verdict, latency_ms: float, *, wide: bool = True
    ) -> ProxyStatus | None:
        """Count the outcome against the proxy (caller holds the lock).  Returns the status
        to write: a bench, ACTIVE for a periodic flush of successes, or None.

        `wide`: a ban or cool-down benches the proxy everywhere (a request without a
        site, or a proxy banned by enough sites); otherwise the site holds the pair
        (`sites.py`) and the proxy stays active for the others."""
        now = time.monotonic()
        new_status: ProxyStatus | None = None
        state: ProxyState | None = lease._state
        if state is None:
            state = self.states.get(lease.proxy_id)
            if state is None:
                state = self.states[lease.proxy_id] = ProxyState(last_flush=now)
        state.requests += 1
        if verdict is Verdict.BAN or verdict is Verdict.COOLDOWN:
            state.bans += 1
            self.counters["bans" if verdict is Verdict.BAN else "cooldowns"] += 1
            if wide and not state.benched:
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

    def quiet(self, lease: ProxyLease, verdict: Verdict) -> bool:
        """Whether `record` of this verdict will write nothing (an event loop may then
        report inline): an answer the proxy delivered, on a proxy this process knows,
        not benched or just revived, with slowness not watched and its periodic flush
        more than a second away.  Called without the lock: the state only moves toward
        a write through `record`, which this request's own report is next to call."""
        if verdict is not Verdict.OK and verdict is not Verdict.TARGET_ERROR:
            return False
        state: ProxyState | None = lease._state
        if state is None or state.benched or state.revived or self.policy.slow_ms is not None:
            return False
        return time.monotonic() - state.last_flush < self.policy.flush_seconds - 1.0

    def apply(
        self,
        lease: ProxyLease,
        status: ProxyStatus,
        status_code: int | None,
        error: BaseException | None,
        latency_ms: float,
    ) -> None:
        """Write what `record` decided: a flush of successes, or a bench."""
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

    def due(self, pool: str) -> bool:
        """Whether `revive_due(pool)` would do more than look (a revival or a scan is
        due); an event loop leases off the loop then.  Decided without the lock (reads of
        a list and a dict are atomic in CPython; a stale answer only delays a revival to
        the next call), and without a wall-clock read while nothing is benched."""
        if self._revivals and self._revivals[0][0] <= time.time():
            return True
        last = self._last_scan.get(pool)
        return last is None or time.monotonic() - last >= self.revive_scan_seconds

    def due_inline(self, pool: str) -> bool:
        """`due`, for an event loop's inline lease: True for the first request that finds
        it due (it goes off the loop, where `revive_due` does the work), False for the
        requests after it, which go on inline (`bridge.Claim`)."""
        if not self.due(pool):
            return False
        claim = self._due_claimed.get(pool)
        if claim is None:
            claim = self._due_claimed.setdefault(pool, Claim())
        return claim.take()

    def revive_due(self, pool: str, *, scan: bool = False) -> None:
        """Bring back proxies whose cool-down is over.

        Proxies this process benched are in a heap (O(1) when nothing is due).  Proxies
        benched by another process sharing the storage are found by a rate-limited scan
        of the benched ones, their return time derived from the storage's records.
        """
        if not scan and not self.due(pool):
            return  # the common case (every acquire)
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
            for proxy, back_at in self.benched(pool, skip_own=True):
                if back_at <= now:
                    self._revive(proxy.id, expected=proxy)

    def benched(self, pool: str, *, skip_own: bool = False) -> list[tuple[Proxy, float]]:
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
                own = {pid for pid, state in self.states.items() if state.benched}
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
            state = self.states.get(proxy_id)
            if state is not None:
                state.benched = False
                state.revived = True
                state.failures = 0
        logger.info("proxy %(proxy)s back in the pool after its cool-down", {"proxy": _Endpoint.of(current).safe_url})

    # ------------------------------------------------------------------ reading

    def stats(self, proxy_id: UUID) -> dict[str, Any]:
        """This process's counters for one proxy."""
        with self._lock:
            state = self.states.get(proxy_id) or ProxyState()
            lat = state.latencies()
        return {
            "requests": state.requests,
            "successes": state.successes,
            "bans": state.bans,
            "failures": state.errors,
            "median_latency_ms": statistics.median(lat) if lat else None,
        }

    def totals(self, proxy_ids: set[UUID]) -> tuple[int, int, list[float]]:
        """(requests, successes, kept latencies) of these proxies, as seen here."""
        with self._lock:
            states = [s for pid, s in self.states.items() if pid in proxy_ids]
            latencies = [x for s in states for x in s.latencies()]
        return sum(s.requests for s in states), sum(s.successes for s in states), latencies

    def benched_now(self, proxy_id: UUID) -> bool:
        """Whether this process benched the proxy (read without the lock: one dict get)."""
        state = self.states.get(proxy_id)
        return state is not None and state.benched

    def forget(self, proxy_id: UUID) -> None:
        with self._lock:
            self.states.pop(proxy_id, None)
