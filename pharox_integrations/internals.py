"""Every use of pharox internals, in one place.

pharox exposes no public accessor for a manager's storage, nor a way to ask whether
anyone listens to its acquire and release events; skipping the events nobody listens
to keeps the building of their payloads (and a pool-stats call per lease) off the
request path.  When pharox changes these, only this module changes.
"""

from __future__ import annotations

from pharox import AcquireEventPayload, IStorage, ProxyManager

#: the consumer leases are attributed to when none is configured
DEFAULT_CONSUMER: str = ProxyManager.DEFAULT_CONSUMER_NAME


def storage_of(manager: ProxyManager) -> IStorage:
    storage: IStorage = manager._storage
    return storage


def has_acquire_listeners(manager: ProxyManager) -> bool:
    return bool(getattr(manager, "_acquire_callbacks", True))


def has_release_listeners(manager: ProxyManager) -> bool:
    return bool(getattr(manager, "_release_callbacks", True))


def notify_acquire(manager: ProxyManager, payload: AcquireEventPayload) -> None:
    manager._notify_acquire(payload)
