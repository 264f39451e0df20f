"""The `PHAROX_*` keys of the Scrapy project, for the requests and urllib3 examples.

One schema, one place: the scripts build their `LeaseBroker` from exactly the keys
the crawl uses, so they lease from the same pool (share it across processes with
`PHAROX_STORAGE_URL=sqlite:///pool.db` or PostgreSQL).
"""

from demo_shop import settings

from pharox_integrations import LeaseBroker


def pharox_settings():
    """Every `PHAROX_*` key of demo_shop/settings.py (Scrapy-only keys are harmless)."""
    return {key: value for key, value in vars(settings).items() if key.startswith("PHAROX_")}


def make_broker():
    return LeaseBroker.from_settings(pharox_settings())
