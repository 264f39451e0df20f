"""A ready broker for `PHAROX_BROKER = "scrapy_brokers.current"`.

Scrapy deep-copies its settings, so a test hands the middleware a broker through
the documented import-path route instead of putting the object in the settings.
"""

from __future__ import annotations

from pharox_integrations import LeaseBroker

PATH = "scrapy_brokers.current"
_current: list[LeaseBroker] = []


def use(broker: LeaseBroker) -> str:
    """Make `broker` the one `current()` returns; gives the PHAROX_BROKER value."""
    _current[:] = [broker]
    return PATH


def current() -> LeaseBroker:
    return _current[0]
