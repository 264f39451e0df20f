"""How a response or an error becomes a verdict on the proxy, and when a benched proxy returns.

The policy is pure: it judges and computes cool-downs.  The broker applies verdicts to
the storage, so every door and every process sharing a storage judge alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

from pharox import ProxyHealthRecord, ProxyStatus

BENCHED = frozenset({ProxyStatus.BANNED, ProxyStatus.INACTIVE, ProxyStatus.SLOW})


class Verdict(str, Enum):
    """What one response or error says about the proxy that carried it."""

    OK = "ok"  # the proxy delivered an answer the site meant
    TARGET_ERROR = "target_error"  # 404/500 from the site: not the proxy's fault
    BAN = "ban"  # the site refuses this proxy (403, captcha page…)
    COOLDOWN = "cooldown"  # the site asks this proxy to pause (429, 503 + Retry-After)
    FAILURE = "failure"  # the proxy itself failed: refused, tunnel failed, timeout, 407

    @property
    def moves_request(self) -> bool:
        """Bans, cool-downs and proxy failures are worth another try on another proxy."""
        return self in _MOVES

    @property
    def site_refusal(self) -> bool:
        """The site's word on this proxy (a ban or a cool-down): held per (proxy, site),
        and the answer the caller gets when no other proxy can be tried."""
        return self is Verdict.BAN or self is Verdict.COOLDOWN


_MOVES = frozenset({Verdict.BAN, Verdict.COOLDOWN, Verdict.FAILURE})


BanDetector = Callable[[int | None, Any], bool | None]
ErrorClassifier = Callable[[BaseException], "Verdict | None"]

# Errors that are the caller's or the site's doing, whatever proxy carried the request:
# bad URLs and headers (requests' InvalidURL is both ValueError and OSError) and a
# target certificate that fails verification (ssl.SSLCertVerificationError is a
# ValueError too).
_CALLER_ERRORS = (ValueError, TypeError, LookupError)


@dataclass(frozen=True)
class HealthPolicy:
    """Ban / fail / slow / revive rules.

    - `ban_codes` ban the proxy at once (for the request's site, see `sites.py`);
      `cooldown_codes` (429), and a 503 carrying `Retry-After`, cool the (proxy, site)
      pair down for the time the site asks, without a strike;
      `proxy_failure_codes` (407) count as failures.
    - `max_failures` failures in a row make it INACTIVE; any answer resets the count,
      so a proxy is judged on its recent record, not one unlucky streak.
    - `slow_ms`: when the median of the last `slow_window` latencies exceeds it, SLOW.
    - Benched proxies come back after `cooldown()`: exponential in the number of
      strikes since the proxy last proved healthy, full jitter, never under
      `backoff_base`, never over `backoff_cap`.
    - `ban_detector(status_code, response)` may return True (ban), False (not a ban) or
      None (use the codes): body-based detection such as captcha pages.
    - `error_classifier(exc)` may return a Verdict for an exception, or None.
    - `flush_seconds`: routine successes are aggregated in memory and written to the
      storage at most this often per proxy (bounded writes, latency still visible).
    """

    ban_codes: frozenset[int] = frozenset({403})
    cooldown_codes: frozenset[int] = frozenset({429})
    proxy_failure_codes: frozenset[int] = frozenset({407})
    max_failures: int = 3
    slow_ms: int | None = None
    slow_window: int = 5
    backoff_base: float = 30.0
    backoff_cap: float = 1800.0
    flush_seconds: float = 60.0
    ban_detector: BanDetector | None = field(default=None, compare=False)
    error_classifier: ErrorClassifier | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ban_codes", frozenset(self.ban_codes))
        object.__setattr__(self, "cooldown_codes", frozenset(self.cooldown_codes))
        object.__setattr__(self, "proxy_failure_codes", frozenset(self.proxy_failure_codes))
        if self.max_failures < 1:
            raise ValueError(f"max_failures={self.max_failures!r}: expected an integer >= 1")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError(
                f"backoff_base={self.backoff_base!r}, backoff_cap={self.backoff_cap!r}: "
                "expected 0 < backoff_base <= backoff_cap"
            )
        if self.slow_ms is not None and self.slow_ms <= 0:
            raise ValueError(f"slow_ms={self.slow_ms!r}: expected a positive number of milliseconds")

    def judge(
        self,
        status_code: int | None = None,
        error: BaseException | None = None,
        response: Any = None,
    ) -> Verdict:
        """The verdict for one answer (status code) or one error."""
        if error is not None:
            if self.error_classifier is not None:
                custom = self.error_classifier(error)
                if custom is not None:
                    return Verdict(custom)
            if isinstance(error, _CALLER_ERRORS):
                return Verdict.TARGET_ERROR
            return Verdict.FAILURE
        if self.ban_detector is not None:
            banned = self.ban_detector(status_code, response)
            if banned is not None:
                return Verdict.BAN if banned else self._judge_code(status_code, response, bans=False)
        return self._judge_code(status_code, response, bans=True)

    def _judge_code(self, status_code: int | None, response: Any, *, bans: bool) -> Verdict:
        if status_code is None:
            return Verdict.OK
        if bans and status_code in self.ban_codes:
            return Verdict.BAN
        if status_code in self.cooldown_codes:
            return Verdict.COOLDOWN
        if status_code == 503 and _has_retry_after(response):
            return Verdict.COOLDOWN
        if status_code in self.proxy_failure_codes:
            return Verdict.FAILURE
        return Verdict.TARGET_ERROR if status_code >= 400 else Verdict.OK

    def cooldown(self, strikes: int, proxy_id: UUID, benched_at: datetime) -> float:
        """Seconds a proxy benched for the `strikes`-th time in a row stays out.

        The jitter is seeded by (proxy, bench time), so every process sharing the
        storage computes the same return time from what the storage holds.
        """
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** max(0, strikes - 1))
        rng = random.Random(f"{proxy_id}/{benched_at.timestamp():.6f}")
        return max(self.backoff_base, rng.uniform(0.0, ceiling))


def _has_retry_after(response: Any) -> bool:
    headers = getattr(response, "headers", None)
    try:
        return headers is not None and bool(headers.get("Retry-After"))
    except Exception:  # a headers object without a usable get: no header
        return False


def strikes_from_records(records: Sequence[ProxyHealthRecord]) -> int:
    """How many times in a row the proxy was benched, from its newest-first records.

    A revival record (ACTIVE right after a bench) does not clear the strikes; an
    ACTIVE record written after that (the proxy served again) does.
    """
    strikes = 0
    for index, record in enumerate(records):
        status = record.status_after
        if status in BENCHED:
            strikes += 1
            continue
        older = records[index + 1] if index + 1 < len(records) else None
        if older is None or older.status_after not in BENCHED:
            break
    return strikes
