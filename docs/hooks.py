"""MkDocs hook: the settings reference table, generated from the package itself.

`<!-- settings-table -->` in a page becomes a table of every key of
`pharox_integrations.settings.SETTINGS_DOC`: its description comes from there, its
default from `PharoxSettings()`, its type and example from `SETTINGS_META` below.  A
key without an entry here fails the build, so a new setting cannot go undocumented.
"""

from __future__ import annotations

from typing import Any

from pharox_integrations.settings import SETTINGS_DOC, PharoxSettings

MARKER = "<!-- settings-table -->"

#: key -> (type, example).  Defaults are read from `PharoxSettings`, not repeated here.
SETTINGS_META: dict[str, tuple[str, str]] = {
    "PHAROX_STORAGE_URL": ("str", "sqlite:///pool.db"),
    "PHAROX_POOL": ("str", "shop"),
    "PHAROX_CONSUMER": ("str", "crawler-eu"),
    "PHAROX_PROXIES": ("list[str] or str", '["http://user:pass@127.0.0.1:3128", "socks5://127.0.0.1:1080"]'),
    "PHAROX_PROXIES_FILE": ("path", "proxies.txt"),
    "PHAROX_SELECTOR": ("str", "least_used"),
    "PHAROX_FILTERS": ("mapping or JSON", '{"country": "DE"}'),
    "PHAROX_LEASE_SECONDS": ("int", "120"),
    "PHAROX_ACQUIRE_TIMEOUT": ("float (s)", "10"),
    "PHAROX_MAX_CONCURRENCY": ("int", "4"),
    "PHAROX_BAN_CODES": ("list[int] or str", "[403, 451]"),
    "PHAROX_SITE_SCOPE": ("str", "host"),
    "PHAROX_SITE_DELAY": ("float (s)", "2"),
    "PHAROX_SITE_BANS_TO_BENCH": ("int", "2"),
    "PHAROX_LEASE_BLOCKS": ("bool", "true"),
    "PHAROX_MAX_FAILURES": ("int", "2"),
    "PHAROX_SLOW_MS": ("int (ms)", "3000"),
    "PHAROX_BACKOFF_BASE": ("float (s)", "60"),
    "PHAROX_BACKOFF_CAP": ("float (s)", "3600"),
    "PHAROX_BROKER": ("import path", "myproject.pool.broker"),
    "PHAROX_MAX_MOVES": ("int", "5"),
    "PHAROX_RETRY_TIMES": ("int", "3"),
    "PHAROX_ON_EXHAUSTED": ("str", "ignore_request"),
    "PHAROX_BAN_POLICY": ("import path", "myproject.bans.CaptchaPolicy"),
    "PHAROX_LOGSTATS_INTERVAL": ("float (s)", "0"),
    "PHAROX_DOWNLOAD_SLOT": ("bool", "false"),
    "PHAROX_GC_FREEZE": ("bool", "false"),
}

#: Keys whose default is not a field of `PharoxSettings` of the same name.
_DEFAULT_OVERRIDES = {"PHAROX_PROXIES": "none", "PHAROX_PROXIES_FILE": "none", "PHAROX_RETRY_TIMES": "none"}


def default_of(key: str) -> str:
    if key in _DEFAULT_OVERRIDES:
        return _DEFAULT_OVERRIDES[key]
    name = key.removeprefix("PHAROX_").lower()
    value: Any = getattr(PharoxSettings(), name)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(getattr(value, "value", value))


def settings_table() -> str:
    missing = sorted(set(SETTINGS_DOC) - set(SETTINGS_META))
    if missing:
        raise KeyError(f"docs/hooks.py SETTINGS_META lacks {', '.join(missing)}: document the new setting(s)")
    rows = ["| Key | Type | Default | Example | What it does |", "|---|---|---|---|---|"]
    for key, description in SETTINGS_DOC.items():
        kind, example = SETTINGS_META[key]
        text = description.replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | `{default_of(key)}` | `{example}` | {text} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, settings_table())
    return markdown


#: Written by the httpx door's author; until it lands, a stub keeps `--strict` builds green.
_PROXYWHIRL_PAGE = "migrate-from-proxywhirl.md"


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    if files.get_file_from_path(_PROXYWHIRL_PAGE) is None:
        from mkdocs.structure.files import File

        files.append(
            File.generated(
                config,
                _PROXYWHIRL_PAGE,
                content="# Migrating from proxywhirl\n\nThis guide is not written yet; see the "
                "[httpx quickstart](quickstart/httpx.md) for `AsyncPharoxTransport`.\n",
            )
        )
    return files
