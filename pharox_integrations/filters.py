"""Filters the core adds to a caller's `ProxyFilters`.

pharox's `ProxyFilters` has no protocol field, so "only proxies this client can
speak" travels as a predicate.  The predicate is a `ProtocolFilter` instance, not a
lambda, so a storage that knows the type can answer it from an index or a WHERE
clause instead of calling it on every candidate; any other storage just calls it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from pharox import Proxy, ProxyFilters, ProxyProtocol


class ProtocolFilter:
    """Predicate: the proxy's protocol is one of `protocols`."""

    __slots__ = ("protocols",)

    def __init__(self, protocols: Iterable[ProxyProtocol | str]) -> None:
        self.protocols: frozenset[ProxyProtocol] = frozenset(ProxyProtocol(p) for p in protocols)

    def __call__(self, proxy: Proxy) -> bool:
        return ProxyProtocol(proxy.protocol) in self.protocols

    def __repr__(self) -> str:
        names = ",".join(sorted(p.value for p in self.protocols))
        return f"ProtocolFilter({names})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProtocolFilter) and other.protocols == self.protocols

    def __hash__(self) -> int:
        return hash(self.protocols)


ALL_PROTOCOLS = frozenset(ProxyProtocol)


def with_protocols(
    filters: ProxyFilters | None, protocols: Iterable[ProxyProtocol | str] | None
) -> ProxyFilters | None:
    """Combine caller filters with a protocol restriction.

    No restriction (or every protocol allowed) leaves the filters untouched, so the
    common case keeps the storages' fast path.  A caller predicate is kept by nesting
    it under `all_of`.
    """
    if protocols is None:
        return filters
    allowed = ProtocolFilter(protocols)
    if allowed.protocols >= ALL_PROTOCOLS:
        return filters
    if filters is None:
        return ProxyFilters(predicate=allowed)
    if filters.predicate is None:
        return filters.model_copy(update={"predicate": allowed})
    return ProxyFilters(all_of=[filters], predicate=allowed)


def protocol_filter_of(filters: ProxyFilters | None) -> ProtocolFilter | None:
    """The top-level `ProtocolFilter` of `filters`, if it has one (for storages)."""
    if filters is not None and isinstance(filters.predicate, ProtocolFilter):
        return filters.predicate
    return None


class EffectiveFilters:
    """`with_protocols`, built once per combination: a pydantic model per request would
    cost more than a memory lease itself."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], tuple[Any, Any, ProxyFilters | None]] = {}
        self._last: tuple[Any, Any, ProxyFilters | None] = (object(), object(), None)

    def __call__(
        self, filters: ProxyFilters | None, protocols: Collection[ProxyProtocol | str] | None
    ) -> ProxyFilters | None:
        if protocols is None:
            return filters
        last = self._last
        if last[0] is filters and last[1] is protocols:
            return last[2]
        # Keyed by identity: callers pass the same filters and protocol set (a module
        # constant) on every request; the kept references make a stale id impossible.
        key = (id(filters), id(protocols))
        cached = self._cache.get(key)
        if cached is None or cached[0] is not filters or cached[1] is not protocols:
            allowed = frozenset(ProxyProtocol(p) for p in protocols)
            cached = (filters, protocols, with_protocols(filters, allowed))
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = cached
        self._last = cached  # a door passes the same pair on every request
        return cached[2]
