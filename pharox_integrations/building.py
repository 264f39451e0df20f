"""Building a broker: from a proxy list, from `PHAROX_*` settings, or by import path.

Kept apart from the broker so its class reads as the life of a lease; the settings
schema itself is `settings.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from importlib import import_module
from typing import TYPE_CHECKING, Any

from pharox import InMemoryStorage, IStorage, ProxyManager

from .errors import ConfigurationError
from .exchange import mask_credentials
from .health import HealthPolicy
from .settings import PharoxSettings, ProxySpec, SettingsSource, parse_proxy
from .sites import SiteBook, store_for

logger = logging.getLogger("pharox_integrations")

if TYPE_CHECKING:
    from .broker import LeaseBroker


def from_proxies(
    cls: type[LeaseBroker],
    proxies: Iterable[str | ProxySpec],
    pool: str,
    storage: IStorage | str | None,
    max_concurrency: int | None,
    options: dict[str, Any],
) -> LeaseBroker:
    from .storage import storage_from_url

    specs = [p if isinstance(p, ProxySpec) else parse_proxy(p, where=f"proxies[{i}]") for i, p in enumerate(proxies)]
    store = storage if isinstance(storage, IStorage) else storage_from_url(storage or "memory://")
    broker = cls(ProxyManager(store), pool=pool, **options)
    broker.add_proxies(specs, max_concurrency=max_concurrency)
    broker._selection.prepare(pool)  # start-up I/O here, not on the first requests' path
    return broker


def from_settings(
    cls: type[LeaseBroker], source: SettingsSource | Mapping[str, Any] | PharoxSettings | None
) -> LeaseBroker:
    settings = source if isinstance(source, PharoxSettings) else PharoxSettings.from_mapping(source)
    if settings.broker:
        return load(settings.broker) if isinstance(settings.broker, str) else ready(settings.broker)
    from .storage import storage_from_url

    broker = cls(
        ProxyManager(storage_from_url(settings.storage_url)),
        pool=settings.pool,
        consumer=settings.consumer,
        selector=settings.selector,
        filters=settings.filters,
        lease_seconds=settings.lease_seconds,
        acquire_timeout=settings.acquire_timeout,
        max_moves=settings.max_moves,
        site_scope=settings.site_scope,
        site_delay=settings.site_delay,
        site_bans_to_bench=settings.site_bans_to_bench,
        lease_blocks=settings.lease_blocks,
        policy=HealthPolicy(
            ban_codes=frozenset(settings.ban_codes),
            max_failures=settings.max_failures,
            slow_ms=settings.slow_ms,
            backoff_base=settings.backoff_base,
            backoff_cap=settings.backoff_cap,
        ),
    )
    if settings.proxies:
        broker.add_proxies(settings.proxies, max_concurrency=settings.max_concurrency)
    elif settings.pool not in broker.pools():
        # Said at start-up, not by every request after a wait.
        pools = ", ".join(repr(p) for p in broker.pools()) or "none"
        raise ConfigurationError(
            f"PHAROX_POOL={settings.pool!r}: no such pool in PHAROX_STORAGE_URL="
            f"{mask_credentials(settings.storage_url)!r} (pools there: {pools}); "
            "seed it with PHAROX_PROXIES / PHAROX_PROXIES_FILE or `pharox-integrations pool import`"
        )
    broker._selection.prepare(settings.pool)  # start-up I/O here, not on the first requests' path
    return broker


def load(path: str) -> LeaseBroker:
    """`PHAROX_BROKER`: a ready broker (or a factory of one) named by import path."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        obj: Any = getattr(import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"PHAROX_BROKER={path!r}: cannot import it ({exc}); expected 'package.module.name' of a LeaseBroker"
        ) from None
    return ready(obj, path)


def ready(obj: Any, path: str | None = None) -> LeaseBroker:
    """A ready broker, or what a factory returns."""
    from .broker import LeaseBroker

    if not isinstance(obj, LeaseBroker) and callable(obj):
        obj = obj()
    if not isinstance(obj, LeaseBroker):
        shown = repr(path) if path is not None else "<object>"
        raise ConfigurationError(
            f"PHAROX_BROKER={shown}: found {type(obj).__name__}; expected a LeaseBroker or a callable returning one"
        )
    return obj


def check(*, lease_seconds: int, max_moves: int, acquire_timeout: float) -> None:
    """`LeaseBroker` arguments a caller may get wrong: one clear line each."""
    if lease_seconds <= 0:
        raise ConfigurationError(f"lease_seconds={lease_seconds!r}: expected an integer > 0")
    if not isinstance(max_moves, int) or max_moves < 0:
        raise ConfigurationError(f"max_moves={max_moves!r}: expected an integer >= 0")
    if acquire_timeout < 0:
        raise ConfigurationError(f"acquire_timeout={acquire_timeout!r}: expected a number >= 0")


def site_book(
    storage: IStorage, policy: HealthPolicy, scope: str, delay: float, bans_to_bench: int, acquire_timeout: float
) -> SiteBook:
    """The broker's per-site standing, on the storage's own site store."""
    try:
        book = SiteBook(store_for(storage), policy, scope=scope, delay=delay, bans_to_bench=bans_to_bench)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if delay > acquire_timeout:
        logger.warning(
            "site_delay=%(delay)s s is longer than acquire_timeout=%(timeout)s s: a request to a site whose "
            "proxies all visited it lately gives up at once instead of waiting for the next polite slot",
            {"delay": delay, "timeout": acquire_timeout},
        )
    return book


def storage_blocks(storage: IStorage) -> bool:
    """Memory storages answer inline; anything else may block on I/O."""
    from .storage import is_memory_storage

    return not (isinstance(storage, InMemoryStorage) or is_memory_storage(storage))
