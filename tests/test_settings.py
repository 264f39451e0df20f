"""PHAROX_* settings and proxy-list parsing: good input parses, bad input names key/line and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pharox import ProxyProtocol, SelectorStrategy

from pharox_integrations import ConfigurationError, InvalidProxyURL, LeaseBroker, PharoxSettings, parse_proxy
from pharox_integrations.settings import parse_proxy_lines


def test_full_url_with_percent_encoded_credentials() -> None:
    spec = parse_proxy("http://us%40er:p%40ss%3Aw%2Frd%20x@proxy.example:3128")
    assert (spec.protocol, spec.host, spec.port) == (ProxyProtocol.HTTP, "proxy.example", 3128)
    assert (spec.username, spec.password) == ("us@er", "p@ss:w/rd x")
    # Re-encoded with %20 (not '+'): every client decodes the same password back.
    assert spec.url == "http://us%40er:p%40ss%3Aw%2Frd%20x@proxy.example:3128"
    assert "p@ss" not in repr(spec) and "p%40ss" not in str(spec)


def test_raw_special_characters_in_password_parse_up_to_the_last_at() -> None:
    spec = parse_proxy("socks5://user:p@ss:w/rd@10.0.0.1:1080")
    assert (spec.username, spec.password, spec.host, spec.port) == ("user", "p@ss:w/rd", "10.0.0.1", 1080)


def test_bare_host_port_is_http_and_ipv6_is_bracketed() -> None:
    assert parse_proxy("127.0.0.1:8080").protocol is ProxyProtocol.HTTP
    v6 = parse_proxy("http://[::1]:8080")
    assert v6.host == "::1" and v6.safe_url == "http://[::1]:8080"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("ftp://h:21", "unsupported proxy protocol 'ftp'"),
        ("http://host", r"expected scheme://\[user:password@\]host:port"),
        ("http://host:99999", "port 99999"),
        ("http://[zz::1]:80", "invalid IPv6"),
        ("http://user@host:80", "no password"),
    ],
)
def test_bad_entries_say_why(entry: str, expected: str) -> None:
    with pytest.raises(InvalidProxyURL, match=expected):
        parse_proxy(entry, where="PHAROX_PROXIES line 3")


def test_errors_never_echo_credentials() -> None:
    with pytest.raises(InvalidProxyURL) as info:
        parse_proxy("http://alice:s3cret@host", where="x")
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)


def test_file_lines_comments_blanks_duplicates_and_line_numbers(tmp_path: Path) -> None:
    lines = ["# my proxies", "", "http://a:1", "b:2  # inline comment", "http://a:1", "socks5://u:p@c:3"]
    specs = parse_proxy_lines(lines, source="list.txt")
    assert [s.safe_url for s in specs] == ["http://a:1", "http://b:2", "socks5://c:3"]
    with pytest.raises(InvalidProxyURL, match=r"list.txt line 2: .*not a proxy URL"):
        parse_proxy_lines(["http://ok:1", "nonsense"], source="list.txt")


def test_same_host_port_with_other_password_is_another_proxy() -> None:
    specs = parse_proxy_lines(["http://u:one@h:1", "http://u:two@h:1"], source="s")
    assert len(specs) == 2


def test_settings_from_dict_with_every_type() -> None:
    s = PharoxSettings.from_mapping(
        {
            "PHAROX_PROXIES": ["http://a:1", "http://b:2"],
            "PHAROX_POOL": "shop",
            "PHAROX_SELECTOR": "LEAST_USED",
            "PHAROX_FILTERS": '{"country": "US"}',
            "PHAROX_LEASE_SECONDS": "60",
            "PHAROX_ACQUIRE_TIMEOUT": 2.5,
            "PHAROX_BAN_CODES": "403, 429, 503",
            "PHAROX_MAX_FAILURES": 5,
            "PHAROX_SLOW_MS": "1500",
            "PHAROX_DOWNLOAD_SLOT": "false",
        }
    )
    assert s.pool == "shop" and s.selector is SelectorStrategy.LEAST_USED
    assert s.filters is not None and s.filters.country == "US"
    assert (s.lease_seconds, s.acquire_timeout, s.max_failures, s.slow_ms) == (60, 2.5, 5, 1500)
    assert s.ban_codes == (403, 429, 503) and s.download_slot is False
    assert [p.safe_url for p in s.proxies] == ["http://a:1", "http://b:2"]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    f = tmp_path / "proxies.txt"
    f.write_text("# fleet\nhttp://u:p@127.0.0.1:3128\n127.0.0.2:3128\n")
    monkeypatch.setenv("PHAROX_PROXIES_FILE", str(f))
    monkeypatch.setenv("PHAROX_POOL", "env-pool")
    s = PharoxSettings.from_mapping(None)
    assert s.pool == "env-pool" and len(s.proxies) == 2 and s.configured


def test_settings_from_scrapy_settings() -> None:
    from scrapy.settings import Settings

    s = PharoxSettings.from_mapping(Settings({"PHAROX_PROXIES": "http://a:1\nhttp://b:2", "PHAROX_MAX_MOVES": 2}))
    assert len(s.proxies) == 2 and s.max_moves == 2


def test_the_old_name_of_max_moves_warns_and_still_works() -> None:
    with pytest.warns(DeprecationWarning, match="PHAROX_RETRY_TIMES is deprecated: use PHAROX_MAX_MOVES"):
        s = PharoxSettings.from_mapping({"PHAROX_RETRY_TIMES": 4})
    assert s.max_moves == 4 and PharoxSettings().max_moves == 3
    with pytest.raises(ConfigurationError, match="PHAROX_RETRY_TIMES and PHAROX_MAX_MOVES are both set"):
        PharoxSettings.from_mapping({"PHAROX_RETRY_TIMES": 4, "PHAROX_MAX_MOVES": 2})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"PHAROX_LEASE_SECONDS": "soon"}, r"PHAROX_LEASE_SECONDS='soon': expected an integer"),
        ({"PHAROX_LEASE_SECONDS": 0}, r"PHAROX_LEASE_SECONDS=0: expected an integer >= 1"),
        ({"PHAROX_ACQUIRE_TIMEOUT": -1}, r"PHAROX_ACQUIRE_TIMEOUT=-1: expected a number >= 0"),
        ({"PHAROX_SELECTOR": "random"}, r"PHAROX_SELECTOR='random': expected one of first_available"),
        ({"PHAROX_BAN_CODES": "403,abc"}, r"PHAROX_BAN_CODES=.*expected a list of HTTP status codes"),
        ({"PHAROX_BAN_CODES": [403, 700]}, r"700 is not an HTTP status code"),
        ({"PHAROX_FILTERS": "{bad json"}, r"PHAROX_FILTERS=.*expected a JSON object"),
        ({"PHAROX_FILTERS": {"colour": "red"}}, r"PHAROX_FILTERS: unknown filter field\(s\) colour"),
        ({"PHAROX_BACKOFF_BASE": 60, "PHAROX_BACKOFF_CAP": 10}, r"PHAROX_BACKOFF_CAP=10.0: expected a number >="),
        ({"PHAROX_ON_EXHAUSTED": "panic"}, r"PHAROX_ON_EXHAUSTED='panic': expected one of close_spider"),
        ({"PHAROX_PROXIES": ["http://a:1", "bogus entry"]}, r"PHAROX_PROXIES line 2"),
        ({"PHAROX_PROXY": "http://a:1"}, r"unknown setting PHAROX_PROXY; known settings:"),
        ({"PHAROX_BROKER": "x.y", "PHAROX_PROXIES": ["http://a:1"]}, r"PHAROX_BROKER is set together"),
        ({"PHAROX_PROXIES": ["a:1"], "PHAROX_PROXIES_FILE": "f"}, r"both set"),
        ({"PHAROX_PROXIES_FILE": "/nonexistent/list.txt"}, r"PHAROX_PROXIES_FILE='/nonexistent/list.txt': cannot read"),
        ({"PHAROX_DOWNLOAD_SLOT": "maybe"}, r"expected true or false"),
    ],
)
def test_bad_settings_name_key_value_and_expectation(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PharoxSettings.from_mapping(settings)


def test_unknown_storage_lists_what_exists() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown storage URL 'redis://u:\*\*\*@h/0'; supported: memory://"):
        LeaseBroker.from_settings({"PHAROX_STORAGE_URL": "redis://u:pw@h/0", "PHAROX_PROXIES": ["http://a:1"]})


def test_broker_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mybrokers.py").write_text(
        "from pharox_integrations import LeaseBroker\nbroker = LeaseBroker.from_proxies(['http://a:1'], pool='p')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    broker = LeaseBroker.from_settings({"PHAROX_BROKER": "mybrokers.broker"})
    assert broker.pool == "p"
    with pytest.raises(ConfigurationError, match=r"PHAROX_BROKER='mybrokers.nothing': cannot import"):
        LeaseBroker.from_settings({"PHAROX_BROKER": "mybrokers.nothing"})


def test_broker_object_in_scrapy_settings_survives_their_copies() -> None:
    from scrapy.settings import Settings

    ready = LeaseBroker.from_proxies(["http://a:1"], pool="ready")
    settings = Settings({"PHAROX_BROKER": ready}).copy()
    assert LeaseBroker.from_settings(settings) is ready
    with pytest.raises(ConfigurationError, match=r"PHAROX_BROKER=<object>: found int; expected a LeaseBroker"):
        LeaseBroker.from_settings({"PHAROX_BROKER": 42})


def test_an_unknown_pool_fails_at_start_up_naming_the_pools_there(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/pool.db"
    from pharox_integrations.storage.sql import init_schema

    init_schema(url)
    seeded = LeaseBroker.from_settings({"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shop", "PHAROX_PROXIES": "http://a:1"})
    seeded.close()
    with pytest.raises(ConfigurationError, match=r"PHAROX_POOL='shpo': no such pool in .* \(pools there: 'shop'\)"):
        LeaseBroker.from_settings({"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shpo"})
