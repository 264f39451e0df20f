"""The `PHAROX_*` settings schema and the proxy-list parser, shared by every door.

Settings come from a dict, a Scrapy `Settings` object or the environment.  Every value
is parsed and checked once, up front: a bad value fails at start-up with the key, the
value and what was expected, never later on the request path.  An unknown `PHAROX_*`
key (any case) in a dict or Scrapy settings is an error; in the environment, where
other programs' variables live too, it is one `PharoxSettingsWarning`.  Both name the
closest known key.

`PHAROX_PROXIES` given as one string (the environment's only form) is split into
entries at newlines, commas and spaces, but a password may contain those too, so a
piece only starts a new entry when it is one:

- a piece beginning with `scheme://` starts an entry;
- so does a piece that is a bare `host:port` or `[v6]:port`;
- an entry is complete once it ends in `@host:port` (its credentials are closed), or
  when it is a bare `host:port`: the next piece starts another entry.

Any other piece belongs to the entry before it, joined with the separator as written:
`"http://carl:Zq9 Wx7@127.0.0.1:3128"` is one entry whose password is `Zq9 Wx7`.  So a
password piece that itself looks like `xxx://…` or a bare `host:port`, or a
`user:pass@host:port` without its scheme right after a `scheme://host:port` entry,
reads differently: percent-encode it (`%20` for a space) or give a list or a file,
where every item or line is exactly one entry.  `#` starts a comment at the start of
a line or after a space.

Errors about an entry never show any part of its credentials: the whole user-info is
replaced by `***`, and when the entry has no recognisable `@host:port` end everything
after the scheme is (`'http://***'`).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from pharox import Proxy, ProxyFilters, ProxyProtocol, SelectorStrategy

from .errors import ConfigurationError, InvalidProxyURL


class SettingsSource(Protocol):
    """Anything with `.get(key)`: a dict, Scrapy `Settings`, `os.environ`."""

    def get(self, key: str, default: Any = None) -> Any: ...


# ---------------------------------------------------------------------------
# Proxy entries
# ---------------------------------------------------------------------------

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[^\]/@]+)\]|(?P<host>[^\s:/\[\]@]+)):(?P<port>\d{1,5})/?$")


@dataclass(frozen=True)
class ProxySpec:
    """One parsed proxy entry.  `repr` masks the password."""

    protocol: ProxyProtocol
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_proxy(cls, proxy: Proxy) -> ProxySpec:
        """The entry a stored pharox `Proxy` stands for."""
        creds = proxy.credentials
        return cls(
            ProxyProtocol(proxy.protocol),
            str(proxy.host),
            proxy.port,
            creds.user if creds else None,
            creds.password if creds else None,
        )

    @property
    def safe_url(self) -> str:
        """The URL without credentials (what logs and stats may show)."""
        return f"{self.protocol.value}://{format_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The URL with percent-encoded credentials every client decodes back exactly."""
        return build_proxy_url(self.protocol.value, self.host, self.port, self.username, self.password)

    @property
    def identity(self) -> tuple[str, str, int, str | None, str | None]:
        """Two entries are the same proxy only if the credentials match too:
        providers tell accounts apart by password on one host:port."""
        return (self.protocol.value, self.host.lower(), self.port, self.username, self.password)

    def __str__(self) -> str:
        return self.safe_url


def format_host(host: str) -> str:
    """Bracket IPv6 literals for use in a URL."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_proxy_url(scheme: str, host: str, port: int, username: str | None, password: str | None) -> str:
    """Proxy URL with credentials percent-encoded by `quote(safe="")`.

    pharox's `Proxy.url` uses `quote_plus`, which turns a space into `+`; clients then
    send a literal `+` and the proxy rejects the password.  `%20` round-trips.
    """
    auth = ""
    if username is not None:
        auth = quote(username, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        auth += "@"
    return f"{scheme}://{auth}{format_host(host)}:{port}"


def parse_proxy(entry: str, *, where: str = "proxy entry") -> ProxySpec:
    """Parse `scheme://user:pass@host:port`, bare `host:port` (http) or `[v6]:port`.

    The user-info part ends at the *last* `@`, so a raw `@`, `:`, `/` or space inside
    the password still parses; percent-encoded credentials are decoded.  Errors name
    `where` (setting and line) and never echo any part of the credentials.
    """
    text = entry.strip()
    if not text:
        raise InvalidProxyURL(f"{where}: empty proxy entry")
    scheme = "http"
    rest = text
    has_scheme = _SCHEME.match(text)
    if has_scheme:
        scheme = has_scheme.group("scheme").lower()
        rest = text[has_scheme.end() :]
    try:
        protocol = ProxyProtocol(scheme)
    except ValueError:
        supported = ", ".join(p.value for p in ProxyProtocol)
        raise InvalidProxyURL(f"{where}: unsupported proxy protocol {scheme!r} (supported: {supported})") from None
    shown = _masked(scheme, rest)
    userinfo, at, hostport = rest.rpartition("@")
    match = _HOSTPORT.match(hostport)
    if not match:
        raise InvalidProxyURL(f"{where}: {shown!r} is not a proxy URL; expected scheme://[user:password@]host:port")
    host = match.group("v6") or match.group("host")
    if match.group("v6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidProxyURL(f"{where}: {shown!r} has an invalid IPv6 address") from None
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise InvalidProxyURL(f"{where}: {shown!r} has port {port}; expected 1-65535")
    username = password = None
    if at:
        user_part, colon, pass_part = userinfo.partition(":")
        username = unquote(user_part)
        password = unquote(pass_part) if colon else None
        if not username.strip() or (password is not None and not password.strip()):
            raise InvalidProxyURL(f"{where}: {shown!r} has an empty user name or password")
        if password is None:
            raise InvalidProxyURL(f"{where}: {shown!r} has a user name but no password")
    return ProxySpec(protocol, host, port, username, password)


_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_PLAIN_HOST = re.compile(r"^[\w.-]+/?$")


def _masked(scheme: str, rest: str) -> str:
    """The entry as an error may show it: the whole user-info replaced by `***`.

    Where the user-info ends is only known when the entry ends in `@host:port`; without
    that end (a missing host or port, a password cut at a space or `#`), any part after
    the scheme may be a password fragment, so all of it is masked unless it is a plain
    host or host:port.
    """
    _userinfo, at, hostport = rest.rpartition("@")
    if at:
        return f"{scheme}://***@{hostport}" if _HOSTPORT.match(hostport) else f"{scheme}://***"
    if _HOSTPORT.match(rest) or _PLAIN_HOST.match(rest):
        return f"{scheme}://{rest}"
    return f"{scheme}://***"


def parse_proxy_lines(lines: Iterable[str], *, source: str) -> list[ProxySpec]:
    """Parse a list of entries; `#` comments and blank lines are skipped, duplicates
    dropped (first one kept), and a bad entry fails with its line number."""
    return _parse_entries((f"{source} line {number}", _strip_comment(raw)) for number, raw in enumerate(lines, start=1))


def split_proxy_string(text: str) -> list[str]:
    """The entries of one `PHAROX_PROXIES` string (the rule is in the module doc string)."""
    entries: list[str] = []
    for line in text.splitlines():
        pieces = re.split(r"([,\s]+)", _strip_comment(line).strip(", \t"))
        current = pieces[0]
        for separator, piece in zip(pieces[1::2], pieces[2::2], strict=True):
            if _starts_entry(piece) or _is_complete(current):
                entries.append(current)
                current = piece
            else:
                current += separator + piece
        if current:
            entries.append(current)
    return entries


def _starts_entry(piece: str) -> bool:
    return bool(_SCHEME.match(piece) or _HOSTPORT.match(piece))


def _is_complete(entry: str) -> bool:
    """True when nothing can follow: `…@host:port`, or a bare `host:port`."""
    _userinfo, at, hostport = entry.rpartition("@")
    return bool(_HOSTPORT.match(hostport)) if at else bool(_HOSTPORT.match(entry))


def _strip_comment(line: str) -> str:
    line = line.strip()
    if line.startswith("#"):
        return ""
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def _parse_entries(labelled: Iterable[tuple[str, str]]) -> list[ProxySpec]:
    """Parse `(where, entry)` pairs, skipping blank entries and dropping duplicates."""
    specs: list[ProxySpec] = []
    seen: set[tuple[str, str, int, str | None, str | None]] = set()
    for where, entry in labelled:
        if not entry.strip():
            continue
        spec = parse_proxy(entry, where=where)
        if spec.identity not in seen:
            seen.add(spec.identity)
            specs.append(spec)
    return specs


# ---------------------------------------------------------------------------
# The settings schema
# ---------------------------------------------------------------------------

ON_EXHAUSTED_CHOICES = ("close_spider", "ignore_request")

#: Every key the package reads, with a one-line description (docs are generated from it).
SETTINGS_DOC: dict[str, str] = {
    "PHAROX_STORAGE_URL": "storage URL: memory:// (default), sqlite:///file.db, postgresql+psycopg://…, mysql+pymysql://…",
    "PHAROX_POOL": "pool name to lease from (default 'default')",
    "PHAROX_CONSUMER": "consumer name leases are attributed to (default: pharox's 'default')",
    "PHAROX_PROXIES": (
        "list of proxy URLs, or one string of entries separated by newlines, commas or spaces; a new entry starts"
        " only at a scheme:// or a bare host:port, so a password may contain spaces and commas"
    ),
    "PHAROX_PROXIES_FILE": "path of a file with one proxy URL per line (# comments allowed)",
    "PHAROX_SELECTOR": "round_robin (default), first_available, least_used or lowest_latency",
    "PHAROX_FILTERS": 'mapping (or JSON object) of pharox ProxyFilters fields, e.g. {"country": "US"}',
    "PHAROX_LEASE_SECONDS": "lease duration in seconds; a crashed process's leases come back after it (default 300)",
    "PHAROX_ACQUIRE_TIMEOUT": "seconds to wait for a free proxy before NoProxyAvailable (default 30)",
    "PHAROX_MAX_CONCURRENCY": "max concurrent leases per proxy seeded from PHAROX_PROXIES (default unlimited)",
    "PHAROX_BAN_CODES": "HTTP status codes that ban the proxy for the request's site (default 403)",
    "PHAROX_MAX_FAILURES": "proxy failures in a row that make it INACTIVE (default 3)",
    "PHAROX_SLOW_MS": "median latency above which a proxy is marked SLOW (default off)",
    "PHAROX_BACKOFF_BASE": "first cool-down in seconds for a benched proxy (default 30)",
    "PHAROX_BACKOFF_CAP": "longest cool-down in seconds (default 1800)",
    "PHAROX_SITE_SCOPE": "what a site is (for bans, cool-downs, spacing): domain (registrable, default) or host",
    "PHAROX_SITE_DELAY": "seconds between two requests through one proxy to one site, across processes (default 0)",
    "PHAROX_SITE_BANS_TO_BENCH": "how many sites banning a proxy at once bench it everywhere (default 3)",
    "PHAROX_LEASE_BLOCKS": "shared storages: lease a few proxies at a time and lend them locally (default true)",
    "PHAROX_BROKER": "import path of a ready LeaseBroker (or a callable returning one); excludes the keys above",
    "PHAROX_MAX_MOVES": "how many other proxies a banned or failed request may move to, in every door (default 3)",
    "PHAROX_RETRY_TIMES": "deprecated name of PHAROX_MAX_MOVES",
    "PHAROX_ON_EXHAUSTED": "Scrapy: close_spider (default) or ignore_request when no proxy is available",
    "PHAROX_BAN_POLICY": "Scrapy: import path of a ban policy object/class (response_is_ban / exception_is_ban)",
    "PHAROX_LOGSTATS_INTERVAL": "Scrapy: seconds between pool-health log lines (default 60; 0 disables)",
    "PHAROX_DOWNLOAD_SLOT": "Scrapy: give each proxy its own download slot (default true)",
    "PHAROX_GC_FREEZE": (
        "Scrapy: keep the objects that exist when the spider opens out of the garbage collector's walks "
        "until it closes (default true)"
    ),
}


@dataclass(frozen=True)
class PharoxSettings:
    """The parsed `PHAROX_*` settings; one frozen object, built once."""

    storage_url: str = "memory://"
    pool: str = "default"
    consumer: str | None = None
    proxies: tuple[ProxySpec, ...] = ()
    selector: SelectorStrategy = SelectorStrategy.ROUND_ROBIN
    filters: ProxyFilters | None = None
    lease_seconds: int = 300
    acquire_timeout: float = 30.0
    max_concurrency: int | None = None
    ban_codes: tuple[int, ...] = (403,)
    site_scope: str = "domain"
    site_delay: float = 0.0
    site_bans_to_bench: int = 3
    lease_blocks: bool = True
    max_failures: int = 3
    slow_ms: int | None = None
    backoff_base: float = 30.0
    backoff_cap: float = 1800.0
    broker: Any = None  # an import path, or a ready LeaseBroker (or a callable returning one)
    max_moves: int = 3
    on_exhausted: str = "close_spider"
    ban_policy: str | None = None
    logstats_interval: float = 60.0
    download_slot: bool = True
    gc_freeze: bool = True
    explicit: frozenset[str] = frozenset()

    @property
    def configured(self) -> bool:
        """True when the settings say where proxies come from."""
        return bool(self.proxies or self.broker or "PHAROX_STORAGE_URL" in self.explicit)

    @classmethod
    def from_mapping(cls, source: SettingsSource | Mapping[str, Any] | None = None) -> PharoxSettings:
        """Read and check every `PHAROX_*` key of `source` (default: the environment)."""
        env = source is None
        src: Any = os.environ if source is None else source
        reader = _Reader(src)
        if env:
            _warn_unknown_environment(src)
        else:
            reader.reject_unknown()
        explicit = frozenset(k for k in SETTINGS_DOC if reader.has(k))
        proxies = reader.proxies()
        broker = reader.raw("PHAROX_BROKER")
        if isinstance(broker, str):
            broker = broker.strip()
        if broker and (proxies or reader.has("PHAROX_STORAGE_URL")):
            raise ConfigurationError(
                "PHAROX_BROKER is set together with PHAROX_PROXIES/PHAROX_PROXIES_FILE/"
                "PHAROX_STORAGE_URL; a ready broker brings its own storage and proxies: set one or the other"
            )
        base = reader.number("PHAROX_BACKOFF_BASE", 30.0, minimum=0.0, exclusive=True)
        cap = reader.number("PHAROX_BACKOFF_CAP", 1800.0, minimum=0.0, exclusive=True)
        if cap < base:
            raise ConfigurationError(f"PHAROX_BACKOFF_CAP={cap!r}: expected a number >= PHAROX_BACKOFF_BASE ({base!r})")
        site_scope = (reader.text("PHAROX_SITE_SCOPE") or "domain").lower()
        if site_scope not in ("domain", "host"):
            raise ConfigurationError(f"PHAROX_SITE_SCOPE={site_scope!r}: expected one of domain, host")
        on_exhausted = (reader.text("PHAROX_ON_EXHAUSTED") or "close_spider").lower()
        if on_exhausted not in ON_EXHAUSTED_CHOICES:
            raise ConfigurationError(
                f"PHAROX_ON_EXHAUSTED={on_exhausted!r}: expected one of {', '.join(ON_EXHAUSTED_CHOICES)}"
            )
        return cls(
            storage_url=reader.text("PHAROX_STORAGE_URL") or "memory://",
            pool=reader.text("PHAROX_POOL") or "default",
            consumer=reader.text("PHAROX_CONSUMER"),
            proxies=tuple(proxies),
            selector=reader.selector(),
            filters=reader.filters(),
            lease_seconds=int(reader.number("PHAROX_LEASE_SECONDS", 300, minimum=1, integer=True)),
            acquire_timeout=reader.number("PHAROX_ACQUIRE_TIMEOUT", 30.0, minimum=0.0),
            max_concurrency=reader.optional_int("PHAROX_MAX_CONCURRENCY"),
            ban_codes=reader.status_codes("PHAROX_BAN_CODES", (403,)),
            site_scope=site_scope,
            site_delay=reader.number("PHAROX_SITE_DELAY", 0.0, minimum=0.0),
            site_bans_to_bench=int(reader.number("PHAROX_SITE_BANS_TO_BENCH", 3, minimum=1, integer=True)),
            lease_blocks=reader.boolean("PHAROX_LEASE_BLOCKS", True),
            max_failures=int(reader.number("PHAROX_MAX_FAILURES", 3, minimum=1, integer=True)),
            slow_ms=reader.optional_int("PHAROX_SLOW_MS"),
            backoff_base=base,
            backoff_cap=cap,
            broker=broker,
            max_moves=_max_moves(reader),
            on_exhausted=on_exhausted,
            ban_policy=reader.text("PHAROX_BAN_POLICY"),
            logstats_interval=reader.number("PHAROX_LOGSTATS_INTERVAL", 60.0, minimum=0.0),
            download_slot=reader.boolean("PHAROX_DOWNLOAD_SLOT", True),
            gc_freeze=reader.boolean("PHAROX_GC_FREEZE", True),
            explicit=explicit,
        )


class PharoxSettingsWarning(UserWarning):
    """A setting that is not an error but probably a mistake (an unknown `PHAROX_*`
    environment variable).  Silence it with
    `warnings.filterwarnings("ignore", category=PharoxSettingsWarning)`."""


#: Environment variables with the prefix that are not settings: the test suite's
#: database URLs (tests/sqlhelpers.py).
_NOT_SETTINGS_PREFIX = "PHAROX_TEST_"


def _unknown_keys(keys: Iterable[Any]) -> list[str]:
    """Keys that look like settings (`PHAROX_` in any case) but are not one."""
    return sorted(k for k in keys if isinstance(k, str) and k.upper().startswith("PHAROX_") and k not in SETTINGS_DOC)


def _with_suggestions(unknown: list[str]) -> str:
    """`PHAROX_MAX_FAILURE (did you mean PHAROX_MAX_FAILURES?), ...`"""
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key.upper(), SETTINGS_DOC, n=1)
        named.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return ", ".join(named)


def _warn_unknown_environment(environ: Mapping[str, str]) -> None:
    """One warning naming every unknown `PHAROX_*` variable.

    A warning rather than an error: the environment is shared with other programs.  A
    warning rather than a log line: Python shows it on stderr with no logging set up
    (requests, httpx and urllib3 scripts), Scrapy routes warnings into its log
    (`logging.captureWarnings`), it is shown once per place even when many brokers are
    built, and `-W` / `filterwarnings` can silence or escalate it by category.
    """
    unknown = [k for k in _unknown_keys(environ) if not k.startswith(_NOT_SETTINGS_PREFIX)]
    if unknown:
        warnings.warn(
            f"ignored unknown environment variable{'s' if len(unknown) > 1 else ''} {_with_suggestions(unknown)};"
            f" known settings: {', '.join(sorted(SETTINGS_DOC))}",
            PharoxSettingsWarning,
            stacklevel=_stacklevel_outside_package(),
        )


def _stacklevel_outside_package() -> int:
    """The `stacklevel` that points a warning at the first caller outside this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def _max_moves(reader: _Reader) -> int:
    """PHAROX_MAX_MOVES, or its old name PHAROX_RETRY_TIMES (with a deprecation warning)."""
    if reader.has("PHAROX_RETRY_TIMES"):
        if reader.has("PHAROX_MAX_MOVES"):
            raise ConfigurationError("PHAROX_RETRY_TIMES and PHAROX_MAX_MOVES are both set: keep PHAROX_MAX_MOVES only")
        warnings.warn(
            "PHAROX_RETRY_TIMES is deprecated: use PHAROX_MAX_MOVES (the same meaning, in every door)",
            DeprecationWarning,
            stacklevel=4,
        )
        return int(reader.number("PHAROX_RETRY_TIMES", 3, minimum=0, integer=True))
    return int(reader.number("PHAROX_MAX_MOVES", 3, minimum=0, integer=True))


_MISSING = object()


class _Reader:
    """Typed reads of one settings source; each error names key, value and expectation."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def raw(self, key: str) -> Any:
        try:
            value = self._source.get(key, None)
        except TypeError:  # objects whose get() takes one argument
            value = self._source.get(key)
        if isinstance(value, str) and not value.strip():
            return None
        return value

    def has(self, key: str) -> bool:
        return self.raw(key) is not None

    def reject_unknown(self) -> None:
        try:
            keys = list(self._source.keys())
        except (AttributeError, TypeError):
            return
        unknown = _unknown_keys(keys)
        if unknown:
            raise ConfigurationError(
                f"unknown setting {_with_suggestions(unknown)}; known settings: {', '.join(sorted(SETTINGS_DOC))}"
            )

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigurationError(f"{key}={value!r}: expected a string")
        return value.strip()

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        exclusive: bool = False,
        integer: bool = False,
    ) -> float:
        value = self.raw(key)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        try:
            if isinstance(value, bool):
                raise ValueError
            number: float = int(str(value).strip()) if integer else float(value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{key}={value!r}: expected {kind}") from None
        if minimum is not None and (number <= minimum if exclusive else number < minimum):
            sign = ">" if exclusive else ">="
            raise ConfigurationError(f"{key}={value!r}: expected {kind} {sign} {minimum:g}")
        return number

    def optional_int(self, key: str) -> int | None:
        value = self.raw(key)
        if value is None:
            return None
        return int(self.number(key, 0, minimum=0, exclusive=True, integer=True))

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigurationError(f"{key}={value!r}: expected true or false")

    def status_codes(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self.raw(key)
        if value is None:
            return default
        items = _split_list(value)
        codes: list[int] = []
        for item in items:
            try:
                code = int(str(item).strip())
            except ValueError:
                raise ConfigurationError(f"{key}={value!r}: expected a list of HTTP status codes (100-599)") from None
            if not 100 <= code <= 599:
                raise ConfigurationError(f"{key}={value!r}: {code} is not an HTTP status code (100-599)")
            codes.append(code)
        return tuple(codes)

    def selector(self) -> SelectorStrategy:
        value = self.text("PHAROX_SELECTOR")
        if value is None:
            return SelectorStrategy.ROUND_ROBIN
        try:
            return SelectorStrategy(value.lower())
        except ValueError:
            choices = ", ".join(s.value for s in SelectorStrategy)
            raise ConfigurationError(f"PHAROX_SELECTOR={value!r}: expected one of {choices}") from None

    def filters(self) -> ProxyFilters | None:
        value = self.raw("PHAROX_FILTERS")
        if value is None:
            return None
        if isinstance(value, ProxyFilters):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigurationError(
                    f'PHAROX_FILTERS={value!r}: expected a JSON object such as {{"country": "US"}}'
                ) from None
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"PHAROX_FILTERS={value!r}: expected a mapping of ProxyFilters fields")
        return filters_from_mapping(value, key="PHAROX_FILTERS")

    def proxies(self) -> list[ProxySpec]:
        inline = self.raw("PHAROX_PROXIES")
        path = self.text("PHAROX_PROXIES_FILE")
        if inline is not None and path:
            raise ConfigurationError("PHAROX_PROXIES and PHAROX_PROXIES_FILE are both set: set one of them")
        if path:
            file = Path(path).expanduser()
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigurationError(
                    f"PHAROX_PROXIES_FILE={path!r}: cannot read it ({exc.strerror or exc})"
                ) from None
            return parse_proxy_lines(lines, source=f"PHAROX_PROXIES_FILE {file.name}")
        if inline is None:
            return []
        if isinstance(inline, str) and _json_list(inline) is None:
            entries = split_proxy_string(inline)
        else:
            entries = [_strip_comment(entry) for entry in _split_list(inline)]
        return _parse_entries((f"PHAROX_PROXIES[{i}]", entry) for i, entry in enumerate(entries))


def _split_list(value: Any) -> list[str]:
    """A list setting given as a list, or as one string (Scrapy and env style)."""
    if isinstance(value, str):
        loaded = _json_list(value)
        if loaded is not None:
            return loaded
        return [part for part in re.split(r"[,\s]+", value.strip()) if part]
    if isinstance(value, Iterable):
        return [str(v) for v in value]
    return [str(value)]


def _json_list(text: str) -> list[str] | None:
    """The items of a string holding a JSON list (`'["a:1", "b:2"]'`), else None."""
    if not text.strip().startswith("["):  # a JSON list, or a bare [v6]:port entry
        return None
    try:
        loaded = json.loads(text)
    except ValueError:
        return None
    return [str(v) for v in loaded] if isinstance(loaded, list) else None


_FILTER_FIELDS = ("source", "country", "city", "isp", "asn", "latitude", "longitude", "radius_km")


def filters_from_mapping(value: Mapping[str, Any], *, key: str) -> ProxyFilters:
    """Build `ProxyFilters` from plain data; unknown fields and bad values name `key`."""
    unknown = sorted(set(value) - set(_FILTER_FIELDS) - {"all_of", "any_of", "none_of"})
    if unknown:
        raise ConfigurationError(
            f"{key}: unknown filter field(s) {', '.join(unknown)}; expected {', '.join(_FILTER_FIELDS)}, "
            "all_of, any_of, none_of"
        )
    data: dict[str, Any] = {k: v for k, v in value.items() if k in _FILTER_FIELDS}
    for clause in ("all_of", "any_of", "none_of"):
        if clause in value:
            children = value[clause]
            if not isinstance(children, list) or not all(isinstance(c, Mapping) for c in children):
                raise ConfigurationError(f"{key}.{clause}: expected a list of filter mappings")
            data[clause] = [filters_from_mapping(c, key=f"{key}.{clause}") for c in children]
    try:
        return ProxyFilters(**data)
    except ValueError as exc:
        raise ConfigurationError(f"{key}={dict(value)!r}: {exc}") from None


def describe_filters(filters: ProxyFilters | None) -> str | None:
    """A short human description of filters for error messages (predicates by name)."""
    if filters is None:
        return None
    parts = [f"{k}={getattr(filters, k)!r}" for k in _FILTER_FIELDS if getattr(filters, k) is not None]
    for clause in ("all_of", "any_of", "none_of"):
        children = getattr(filters, clause)
        if children:
            parts.append(f"{clause}[{'; '.join(describe_filters(c) or '' for c in children)}]")
    if filters.predicate is not None:
        name = getattr(filters.predicate, "__name__", None)
        parts.append(f"predicate={name}" if name else repr(filters.predicate))
    return ", ".join(parts) or None
