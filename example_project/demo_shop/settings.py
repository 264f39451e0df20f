"""Scrapy settings of the example project.

The `PHAROX_*` keys below are the one settings schema every door reads: the
requests and urllib3 examples next to this project load the same keys from this
module (see `pharox_config.py`).  Every key can be overridden from the environment,
e.g. `PHAROX_STORAGE_URL=sqlite:///pool.db scrapy crawl shop`.
"""

import os
from pathlib import Path

BOT_NAME = "demo_shop"
SPIDER_MODULES = ["demo_shop.spiders"]
NEWSPIDER_MODULE = "demo_shop.spiders"

ROBOTSTXT_OBEY = False
CONCURRENT_REQUESTS = 8
DOWNLOAD_TIMEOUT = 15
TELNETCONSOLE_ENABLED = False

# The middleware leases a proxy per request, reports the response, releases the lease.
# 610: after Scrapy's RetryMiddleware (550) and before HttpProxyMiddleware (750),
# which turns the lease's credentials into the Proxy-Authorization header.
DOWNLOADER_MIDDLEWARES = {
    "pharox_integrations.scrapy.PharoxProxyMiddleware": 610,
}

# Where the pool lives: memory:// (this process only), sqlite:///pool.db (the
# processes of one machine share it), postgresql+psycopg://user@host/db (a fleet).
PHAROX_STORAGE_URL = os.environ.get("PHAROX_STORAGE_URL", "memory://")
# Which pool of that storage to lease from.
PHAROX_POOL = os.environ.get("PHAROX_POOL", "default")
# Proxies to seed the pool with (one URL per line, # comments allowed); adding is
# idempotent, so every process of a fleet may seed the same file.
# `pharox-integrations demo --serve --proxies-file proxies.txt` writes a local one.
PHAROX_PROXIES_FILE = os.environ.get("PHAROX_PROXIES_FILE", str(Path(__file__).resolve().parent.parent / "proxies.txt"))
# Seconds to wait for a free proxy before giving up (NoProxyAvailable).
PHAROX_ACQUIRE_TIMEOUT = float(os.environ.get("PHAROX_ACQUIRE_TIMEOUT", "15"))
# Status codes that ban a proxy (it is benched, then revived after a cool-down).
PHAROX_BAN_CODES = [403, 429]
# Connection errors in a row that make a proxy INACTIVE.
PHAROX_MAX_FAILURES = 2
# First cool-down of a benched proxy, and the longest one (exponential backoff).
PHAROX_BACKOFF_BASE = float(os.environ.get("PHAROX_BACKOFF_BASE", "30"))
PHAROX_BACKOFF_CAP = 1800
# Scrapy only: how many other proxies a banned or failed request moves to.
PHAROX_MAX_MOVES = 5
# Scrapy only: when the pool is exhausted, close the spider (or "ignore_request").
PHAROX_ON_EXHAUSTED = "close_spider"
