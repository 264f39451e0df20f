"""Per-site standing: a ban is one site's verdict on a proxy, not the world's.

Health has two scopes.  The proxy's own (failures: it is down) lives in the ledger and
the proxy's status.  The pair (proxy, site) lives here as a *hold*: the wall-clock time
before which the proxy is not sent to that site again, for one of three reasons:

- ``ban``: the site refused the proxy (ban codes, a ban detector); backoff with jitter,
  longer each time the same pair is banned again (its strikes);
- ``cooldown``: the site asked for a pause (429, or 503 with ``Retry-After``); the
  header's time, capped at ``backoff_cap``; not a strike;
- ``delay``: politeness, the minimum gap between two requests through the proxy to
  the site (``site_delay``).

Holds live in a `SiteStore`, shared by every process on a storage (the SQL storages keep
them in a table); a `SiteBook` is one broker's view of them, read through a cache at
most one second old, so a ban recorded by one process is respected by the others
within a second.  A hold is forgotten once it is over and its strikes no longer
matter (`keep_until`), so the state is bounded by what is in force, not by history.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit
from uuid import UUID

from .bridge import Claim
from .health import HealthPolicy, Verdict

SITE_SCOPES = ("domain", "host")
BAN, COOLDOWN, DELAY = "ban", "cooldown", "delay"
_PURGE_SECONDS = 60.0
logger = logging.getLogger("pharox_integrations")


class Hold(NamedTuple):
    """Why and until when a proxy is kept off one site."""

    until: float  # wall-clock seconds (epoch): the proxy is not sent to the site before
    kind: str  # BAN, COOLDOWN or DELAY
    strikes: int  # bans of this pair in a row: each one waits longer
    keep_until: float  # the pair is forgotten after this (its strikes with it)


class SiteStore(Protocol):
    """Where holds live.  Every method is safe to call from several threads; a store
    on a shared storage is shared by every process using it."""

    #: True when reads are cheap and current (in-process): the book reads it directly.
    local: bool

    def holds(self, site: str, now: float) -> Mapping[UUID, Hold]:
        """The site's holds still in force at `now` (``until > now``); read only."""

    def get(self, proxy_id: UUID, site: str) -> Hold | None:
        """The pair's hold, also one that is over but not yet forgotten (its strikes)."""

    def put(self, proxy_id: UUID, site: str, hold: Hold) -> None:
        """Insert or replace the pair's hold."""

    def claim(self, proxy_id: UUID, site: str, until: float, now: float) -> bool:
        """Politeness, atomically across processes: when the pair has no hold in force at
        `now`, hold it as DELAY until `until` (strikes kept) and return True; else False."""

    def bans(self, proxy_id: UUID, now: float) -> int:
        """How many sites hold a BAN on the proxy that is still in force."""

    def in_force(self, now: float, site: str | None = None) -> list[tuple[UUID, str, Hold]]:
        """Every hold in force (of one site, or all), for reports."""

    def purge(self, now: float) -> int:
        """Forget the pairs whose ``keep_until`` has passed; how many went."""


class MemorySiteStore:
    """Holds in this process's memory (the memory storages: one process).

    Read on every request to a site, so reads take no lock and copy nothing: a site's
    holds in force are one dict that writers replace (copy on write), never change.
    Holds that are over move aside until their strikes no longer matter.
    """

    local = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, dict[UUID, Hold]] = {}  # in force as of the site's last sweep
        self._ends: dict[str, float] = {}  # when the first of a site's live holds ends
        self._over: dict[str, dict[UUID, Hold]] = {}  # over, kept for their strikes

    @classmethod
    def of(cls, holds: Iterable[tuple[UUID, str, Hold]]) -> MemorySiteStore:
        """A store holding `holds`, each site's dict made once (`put` copies it per hold:
        quadratic for a site with thousands of holds)."""
        by_site: dict[str, dict[UUID, Hold]] = {}
        for proxy_id, site, hold in holds:
            by_site.setdefault(site, {})[proxy_id] = hold
        store = cls()
        for site, live in by_site.items():
            store._publish(site, live)
        return store

    def holds(self, site: str, now: float) -> Mapping[UUID, Hold]:
        pairs = self._live.get(site)
        if not pairs:
            return _NONE
        if self._ends[site] > now:
            return pairs
        with self._lock:
            return self._sweep(site, now)

    def _sweep(self, site: str, now: float) -> dict[UUID, Hold]:
        """Move the site's holds that are over aside (caller holds the lock)."""
        pairs = self._live.get(site, {})
        live = {pid: h for pid, h in pairs.items() if h.until > now}
        over = {pid: h for pid, h in pairs.items() if h.until <= now and h.keep_until > now}
        if over:
            self._over[site] = {**self._over.get(site, {}), **over}
        self._publish(site, live)
        return live

    def _publish(self, site: str, live: dict[UUID, Hold]) -> None:
        if live:
            self._live[site] = live
            self._ends[site] = min(h.until for h in live.values())
        else:
            self._live.pop(site, None)
            self._ends.pop(site, None)

    def get(self, proxy_id: UUID, site: str) -> Hold | None:
        with self._lock:
            found = self._live.get(site, {}).get(proxy_id)
            return found if found is not None else self._over.get(site, {}).get(proxy_id)

    def put(self, proxy_id: UUID, site: str, hold: Hold) -> None:
        with self._lock:
            self._set(proxy_id, site, hold)

    def _set(self, proxy_id: UUID, site: str, hold: Hold) -> None:
        over = self._over.get(site)
        if over is not None and over.pop(proxy_id, None) is not None and not over:
            del self._over[site]
        live = dict(self._live.get(site, {}))
        live[proxy_id] = hold
        self._publish(site, live)

    def claim(self, proxy_id: UUID, site: str, until: float, now: float) -> bool:
        with self._lock:
            old = self._live.get(site, {}).get(proxy_id)
            if old is not None and old.until > now:
                return False
            old = old or self._over.get(site, {}).get(proxy_id)
            strikes, keep = (0, until) if old is None else (old.strikes, max(old.keep_until, until))
            self._set(proxy_id, site, Hold(until, DELAY, strikes, keep))
            return True

    def bans(self, proxy_id: UUID, now: float) -> int:
        with self._lock:
            return sum(
                1
                for pairs in self._live.values()
                if (h := pairs.get(proxy_id)) is not None and h.kind == BAN and h.until > now
            )

    def in_force(self, now: float, site: str | None = None) -> list[tuple[UUID, str, Hold]]:
        with self._lock:
            sites = list(self._live.items()) if site is None else [(site, self._live.get(site, {}))]
            return [(pid, s, h) for s, pairs in sites for pid, h in pairs.items() if h.until > now]

    def purge(self, now: float) -> int:
        gone = 0
        with self._lock:
            for site in list(self._live):
                before = len(self._live[site]) + len(self._over.get(site, {}))
                self._sweep(site, now)
                over = {pid: h for pid, h in self._over.get(site, {}).items() if h.keep_until > now}
                if over:
                    self._over[site] = over
                else:
                    self._over.pop(site, None)
                gone += before - len(self._live.get(site, {})) - len(over)
            for site in [s for s in self._over if s not in self._live]:
                kept = {pid: h for pid, h in self._over[site].items() if h.keep_until > now}
                gone += len(self._over[site]) - len(kept)
                if kept:
                    self._over[site] = kept
                else:
                    del self._over[site]
        return gone


_NONE: Mapping[UUID, Hold] = {}


_FALLBACK: weakref.WeakKeyDictionary[object, MemorySiteStore] = weakref.WeakKeyDictionary()
_FALLBACK_LOCK = threading.Lock()


def store_for(storage: object) -> SiteStore:
    """The storage's own site store (shared with every broker and process on it), or one
    in this process's memory for a storage that keeps none (pharox's own storages: the
    brokers of this process on it share it; other processes do not see it)."""
    maker = getattr(storage, "site_store", None)
    if callable(maker):
        store: SiteStore = maker()
        return store
    with _FALLBACK_LOCK:
        try:
            return _FALLBACK.setdefault(storage, MemorySiteStore())
        except TypeError:  # not weakly referable: this broker's own
            return MemorySiteStore()


# ---------------------------------------------------------------------- site keys


@lru_cache(maxsize=1)
def _suffixes() -> Any:
    from publicsuffixlist import PublicSuffixList  # the list ships in the package: offline

    return PublicSuffixList()


@lru_cache(maxsize=16_384)
def site_of_host(host: str, scope: str = "domain") -> str:
    """The site a host belongs to: its registrable domain (public-suffix aware), or the
    host itself with scope "host", for an IP address, and for a name with no
    registrable part (``localhost``, a bare public suffix)."""
    host = host.rstrip(".").lower()
    if scope == "host" or not host:
        return host
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    registrable: str | None = _suffixes().privatesuffix(host)
    return registrable or host


# scheme://[userinfo@]host — the host of an absolute URL without urlsplit's cost (a
# sixth of the whole lease); anything else goes through urlsplit.
_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^:/?#\[\]@]+)(?=[:/?#]|$)")


def site_of(url: str | None, scope: str = "domain") -> str | None:
    """The site of a URL (None when it names no host)."""
    if not url:
        return None
    found = _HOST.match(url)
    if found is not None:
        return site_of_host(found.group(1), scope)
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return site_of_host(host, scope) if host else None


# ---------------------------------------------------------------------- Retry-After


def retry_after(response: Any, now: float | None = None) -> float | None:
    """Seconds a response's ``Retry-After`` asks for (delta-seconds or HTTP date), or None.

    Reads the header from any client's response (requests, urllib3, httpx: str values;
    Scrapy: bytes)."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("Retry-After")
    except Exception:  # a headers object without a usable get: no header
        return None
    if isinstance(value, list | tuple):
        value = value[-1] if value else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value:
        return None
    text = str(value).strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ---------------------------------------------------------------------- the book


class SiteBook:
    """One broker's view of per-site standing: which proxies a site keeps off, the
    verdicts that put them there, and the politeness claims.

    Reads of a shared store go through a per-site cache refreshed at most every
    `refresh` seconds (what this process writes is in it at once); an in-process store
    is read directly.
    """

    def __init__(
        self,
        store: SiteStore,
        policy: HealthPolicy,
        *,
        scope: str = "domain",
        delay: float = 0.0,
        bans_to_bench: int = 3,
        refresh: float = 1.0,
    ) -> None:
        if scope not in SITE_SCOPES:
            raise ValueError(f"site_scope={scope!r}: expected one of {', '.join(SITE_SCOPES)}")
        if delay < 0:
            raise ValueError(f"site_delay={delay!r}: expected a number of seconds >= 0")
        if bans_to_bench < 1:
            raise ValueError(f"site_bans_to_bench={bans_to_bench!r}: expected an integer >= 1")
        self.store = store
        self.policy = policy
        self.scope = scope
        self.delay = float(delay)
        self.bans_to_bench = bans_to_bench
        self.refresh = 0.0 if store.local else refresh
        # A shared store is read through a mirror in memory: every hold in force, read in
        # one query at most every `refresh` seconds (not one per site: a broad crawl
        # visits thousands), and this process's own writes at once.
        self._mirror = store if store.local else MemorySiteStore()
        self._next_refresh = 0.0
        self._upkeep = Claim()  # a due refresh or purge is left to one request (see `quiet`)
        self._next_purge = time.monotonic() + _PURGE_SECONDS

    def site_of(self, url: str | None) -> str | None:
        return site_of(url, self.scope)

    def site_of_name(self, name: str) -> str:
        """The site a user names: a URL, a host or a domain (``www.shop.example`` and
        ``https://shop.example/x`` are both the site ``shop.example``)."""
        if "://" in name:
            return site_of(name, self.scope) or name
        return site_of_host(name, self.scope)

    # ------------------------------------------------------------------ reading

    def holds(self, site: str, *, inline: bool = False) -> Mapping[UUID, Hold]:
        """The site's holds in force now (at most `refresh` seconds old); read only.
        `inline` (an event loop, after `quiet`): as the mirror has them, never a refresh."""
        if self.refresh and not inline and time.monotonic() >= self._next_refresh:
            self._refresh()
        return self._mirror.holds(site, time.time())

    def quiet(self) -> bool:
        """Whether leasing for a site now needs no I/O here, so an event loop may do it
        inline: no politeness claim to write, no refresh or purge of the store due.

        A due refresh or purge is left to the first request that sees it (False: it goes
        off the loop, where `holds` refreshes and `maintain` purges); the requests after
        it go on inline with the mirror as it is (`bridge.Claim`: 47 requests of a
        3,000-page crawl went off the loop without it)."""
        if self.delay:
            return False
        now = time.monotonic()
        due = now >= self._next_purge or (self.refresh > 0 and now >= self._next_refresh)
        return not due or not self._upkeep.take()

    def _refresh(self) -> None:
        self._next_refresh = time.monotonic() + self.refresh  # first: one refresh at a time
        self._mirror = MemorySiteStore.of(self.store.in_force(time.time()))

    # ------------------------------------------------------------------ writing

    def claim(self, proxy_id: UUID, site: str, in_flight: float) -> bool:
        """Politeness: take the pair's next visit slot (False: another request has it).

        The pair stays held while the request is in flight (at most `in_flight` seconds,
        the lease's own length, should its process die), and `visited` then holds it
        `delay` more from the end of the request.  So the gap is measured from the end
        of one visit to the start of the next: a client that leases early and sends later
        (Scrapy queues a request in its download slot after the middleware) cannot bring
        two visits closer than `delay`."""
        now = time.time()
        until = now + max(self.delay, in_flight)
        if not self.store.claim(proxy_id, site, until, now):
            held = self.store.get(proxy_id, site)  # another process's claim: cache it, skip the pair
            if held is not None:
                self._remember(proxy_id, site, held)
            return False
        self._remember(proxy_id, site, Hold(until, DELAY, 0, until))
        return True

    def visited(self, proxy_id: UUID, site: str) -> None:
        """The request that claimed the pair is over: the next visit in `delay` seconds
        (unless the site has since banned or paused the pair: that hold stays)."""
        now = time.time()
        old = self.store.get(proxy_id, site)
        if old is not None and old.kind != DELAY:
            return
        until = now + self.delay
        strikes = 0 if old is None else old.strikes
        keep = until if old is None or not strikes else max(old.keep_until, until)
        hold = Hold(until, DELAY, strikes, keep)
        self.store.put(proxy_id, site, hold)
        self._remember(proxy_id, site, hold)

    def refuse(self, proxy_id: UUID, site: str, verdict: Verdict, response: Any = None, proxy: str = "a proxy") -> bool:
        """Hold the pair after a ban or a cool-down answer (`proxy`: its name for the log,
        without credentials).  Returns whether the proxy is now banned by enough sites at
        once to be benched everywhere (it is probably burned).

        A ban while the pair's ban is still in force (requests that were in flight when
        the first came back) adds no strike; no answer shortens a hold in force, and a
        cool-down does not turn a ban in force into a mere pause."""
        now = time.time()
        old = self.store.get(proxy_id, site)
        strikes = old.strikes if old is not None and old.keep_until > now else 0
        banned = old is not None and old.kind == BAN and old.until > now
        cap = self.policy.backoff_cap
        if verdict is Verdict.BAN:
            if not banned:
                strikes += 1
            seconds = self.policy.cooldown(max(1, strikes), proxy_id, datetime.fromtimestamp(now, timezone.utc))
            until, kind = now + seconds, BAN
        else:
            asked = retry_after(response, now)
            if asked is None:
                asked = self.policy.cooldown(max(1, strikes), proxy_id, datetime.fromtimestamp(now, timezone.utc))
            until, kind = now + min(asked, cap), BAN if banned else COOLDOWN
        if old is not None and old.until > until:
            until = old.until  # never shorten a hold in force
        keep = max(until + (cap if kind == BAN else 0.0), old.keep_until if old is not None else 0.0)
        hold = Hold(until, kind, strikes, keep)
        self.store.put(proxy_id, site, hold)
        self._remember(proxy_id, site, hold)
        burned = kind == BAN and self.store.bans(proxy_id, now) >= self.bans_to_bench
        logger.info(
            "proxy %(proxy)s %(what)s by site %(site)s; back there in %(seconds).1f s%(burned)s",
            {
                "proxy": proxy,
                "what": "banned" if verdict is Verdict.BAN else "asked to pause",
                "site": site,
                "seconds": until - now,
                "burned": f" (banned by {self.bans_to_bench}+ sites: benched everywhere)" if burned else "",
            },
        )
        return burned

    def _remember(self, proxy_id: UUID, site: str, hold: Hold) -> None:
        if self._mirror is not self.store:
            self._mirror.put(proxy_id, site, hold)

    def _purge(self, now: float) -> None:
        self._next_purge = time.monotonic() + _PURGE_SECONDS
        self.store.purge(now)

    def maintain(self) -> None:
        """Forget pairs that are over (at most once a minute; called on the acquire path)."""
        if self._next_purge <= time.monotonic():
            self._purge(time.time())

    def in_force(self, site: str | None = None) -> list[tuple[UUID, str, Hold]]:
        return self.store.in_force(time.time(), site)
