"""One exception family for the package; every message is safe to log (no secrets)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class PharoxIntegrationError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(PharoxIntegrationError, ValueError):
    """A setting, proxy entry or storage URL is wrong; the message says which and why."""


class InvalidProxyURL(ConfigurationError):
    """A proxy entry cannot be parsed or uses a protocol we cannot lease."""


class UnknownStorage(ConfigurationError):
    """A storage URL names a scheme no storage handles."""


class StorageUnavailable(PharoxIntegrationError):
    """The storage cannot be reached (database down, driver missing at run time)."""


class NoProxyAvailable(PharoxIntegrationError):
    """No proxy of the pool could be leased before the acquire timeout.

    The message names the pool, the filters and why (counts per reason, and when the
    first benched proxy comes back; for a site that holds proxies off, the site and
    when the next one is usable there), so the caller can decide to wait or stop.
    """

    def __init__(
        self,
        message: str,
        *,
        pool: str = "",
        filters: str | None = None,
        counts: Mapping[str, int] | None = None,
        next_revival_in: float | None = None,
        site: str | None = None,
        next_usable_in: float | None = None,
    ) -> None:
        super().__init__(message)
        self.pool = pool
        self.filters = filters
        self.counts: dict[str, int] = dict(counts or {})
        self.next_revival_in = next_revival_in
        self.site = site  # the request's site, when its holds kept proxies off it
        self.next_usable_in = next_usable_in  # seconds until a proxy held off the site is usable there


@dataclass(frozen=True)
class ProxyAttempt:
    """What happened on one proxy during a request that was moved between proxies."""

    proxy: str  # the proxy URL without credentials
    outcome: str  # verdict: "ban", "failure", ...
    detail: str  # status code or exception summary, never a secret

    def __str__(self) -> str:
        return f"{self.proxy}: {self.outcome} ({self.detail})"


class AllProxiesFailed(PharoxIntegrationError):
    """Every proxy tried for one request failed; names each proxy once with its outcome.

    A door's subclass is also an error of its client's family; one whose constructor does
    not take a message (urllib3's `MaxRetryError`) overrides `_init_base`.
    """

    def __init__(self, attempts: Sequence[ProxyAttempt], message: str | None = None) -> None:
        self.attempts = list(attempts)
        if message is None:
            tried = "; ".join(str(a) for a in self.attempts) or "no attempt"
            message = f"all {len(self.attempts)} proxies tried failed: {tried}"
        self._init_base(message)

    def _init_base(self, message: str) -> None:
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt as it was built, whatever the client's family would pass (its args, or
        # urllib3's (pool, url, reason)); the attributes come back from `__dict__`.
        return (type(self), (self.attempts, str(self)), dict(self.__dict__))


class ProxyAuthenticationFailed(AllProxiesFailed):
    """The last proxy tried refused our credentials (HTTP 407 or SOCKS authentication)."""


class ReportFailed(PharoxIntegrationError):
    """Judging an outcome (a ban detector) or recording it (the storage) failed.

    The lease was released all the same; the cause is chained (`raise ... from`).
    """
