"""Filters the core adds to a caller's `ProxyFilters`.

pharox's `ProxyFilters` has no protocol field, so "only proxies this client can
speak" travels as a predicate.  The predicate is a `ProtocolFilter` instance, not a
lambda, so a storage that knows the type can answer it from an index or a WHERE
clause instead of calling it on every candidate; any other storage just calls it.
"""

from __future__ import annotations

from collections.abc import Iterable

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
