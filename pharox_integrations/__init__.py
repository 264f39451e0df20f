"""Lease a proxy per request from a managed pharox pool.

One leasing core (`LeaseBroker`) and thin doors for Scrapy, requests, urllib3 and httpx.
"""

from .broker import LeaseBroker
from .errors import (
    AllProxiesFailed,
    ConfigurationError,
    InvalidProxyURL,
    NoProxyAvailable,
    PharoxIntegrationError,
    ProxyAttempt,
    ProxyAuthenticationFailed,
    ReportFailed,
    StorageUnavailable,
    UnknownStorage,
)
from .exchange import Exchange, Step
from .health import HealthPolicy, Verdict
from .lease import PoolHealth, ProxyLease, ProxyView
from .settings import PharoxSettings, PharoxSettingsWarning, ProxySpec, parse_proxy, parse_proxy_lines

__version__ = "0.1.0"

__all__ = [
    "AllProxiesFailed",
    "ConfigurationError",
    "Exchange",
    "HealthPolicy",
    "InvalidProxyURL",
    "LeaseBroker",
    "NoProxyAvailable",
    "PharoxIntegrationError",
    "PharoxSettings",
    "PharoxSettingsWarning",
    "PoolHealth",
    "ProxyAttempt",
    "ProxyAuthenticationFailed",
    "ProxyLease",
    "ProxySpec",
    "ProxyView",
    "ReportFailed",
    "Step",
    "StorageUnavailable",
    "UnknownStorage",
    "Verdict",
    "__version__",
    "parse_proxy",
    "parse_proxy_lines",
]
