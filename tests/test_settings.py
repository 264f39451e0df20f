"""PHAROX_* settings and proxy-list parsing: good input parses, bad input names key/line and expectation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pharox import ProxyProtocol, SelectorStrategy

from pharox_integrations import ConfigurationError, InvalidProxyURL, LeaseBroker, PharoxSettings, parse_proxy
from pharox_integrations.settings import PharoxSettingsWarning, parse_proxy_lines, split_proxy_string


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
            "PHAROX_GC_FREEZE": "no",
        }
    )
    assert s.pool == "shop" and s.selector is SelectorStrategy.LEAST_USED
    assert s.filters is not None and s.filters.country == "US"
    assert (s.lease_seconds, s.acquire_timeout, s.max_failures, s.slow_ms) == (60, 2.5, 5, 1500)
    assert s.ban_codes == (403, 429, 503) and s.download_slot is False and s.gc_freeze is False
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
        ({"PHAROX_PROXIES": ["http://a:1", "bogus entry"]}, r"PHAROX_PROXIES\[1\]: 'http://\*\*\*' is not a proxy URL"),
        (
            {"PHAROX_PROXY": "http://a:1"},
            r"unknown setting PHAROX_PROXY \(did you mean PHAROX_PROXIES\?\); known settings:",
        ),
        ({"pharox_pool": "shop"}, r"unknown setting pharox_pool \(did you mean PHAROX_POOL\?\); known settings:"),
        ({"PHAROX_BROKER": "x.y", "PHAROX_PROXIES": ["http://a:1"]}, r"PHAROX_BROKER is set together"),
        ({"PHAROX_PROXIES": ["a:1"], "PHAROX_PROXIES_FILE": "f"}, r"both set"),
        ({"PHAROX_PROXIES_FILE": "/nonexistent/list.txt"}, r"PHAROX_PROXIES_FILE='/nonexistent/list.txt': cannot read"),
        ({"PHAROX_DOWNLOAD_SLOT": "maybe"}, r"expected true or false"),
        ({"PHAROX_GC_FREEZE": "sometimes"}, r"PHAROX_GC_FREEZE='sometimes': expected true or false"),
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
    seeded = LeaseBroker.from_settings(
        {"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shop", "PHAROX_PROXIES": "http://a:1"}
    )
    seeded.close()
    with pytest.raises(ConfigurationError, match=r"PHAROX_POOL='shpo': no such pool in .* \(pools there: 'shop'\)"):
        LeaseBroker.from_settings({"PHAROX_STORAGE_URL": url, "PHAROX_POOL": "shpo"})


# -- PHAROX_PROXIES as one string: where entries split, and passwords that hold separators

PASSWORDS = ["Zq9 Wx7", "Zq9@Wx7:Kj2", "Zq9:Wx7/Kj2", "Zq9%zzWx7 Kj2", "Zq9/ Wx7,Kj2", "Zq9 Wx7@Kj2:8f"]


@pytest.mark.parametrize(
    ("text", "entries"),
    [
        ("http://carl:Zq9 Wx7@127.0.0.1:3128", ["http://carl:Zq9 Wx7@127.0.0.1:3128"]),
        ("http://a:1, socks5://b:2\nc:3 d:4  # a comment", ["http://a:1", "socks5://b:2", "c:3", "d:4"]),
        ("http://u:a, b@h:1,http://u:c d@h:2", ["http://u:a, b@h:1", "http://u:c d@h:2"]),
        ("u:p@h:1 v:q@h:2", ["u:p@h:1", "v:q@h:2"]),  # an entry ends at @host:port
        ("[::1]:80 http://u:a b@c:1", ["[::1]:80", "http://u:a b@c:1"]),
        ("http://u:a b:12 c@h:1", ["http://u:a", "b:12", "c@h:1"]),  # a bare host:port always starts one
    ],
)
def test_a_string_splits_only_where_an_entry_starts(text: str, entries: list[str]) -> None:
    assert split_proxy_string(text) == entries


def test_a_json_list_string_is_a_list_and_a_leading_ipv6_entry_is_not() -> None:
    as_json = PharoxSettings.from_mapping({"PHAROX_PROXIES": '["http://u:a b@c:1", "d:2"]'}).proxies
    assert [(p.safe_url, p.password) for p in as_json] == [("http://c:1", "a b"), ("http://d:2", None)]
    leading_v6 = PharoxSettings.from_mapping({"PHAROX_PROXIES": "[::1]:80 http://u:a b@c:1"}).proxies
    assert [(p.safe_url, p.password) for p in leading_v6] == [("http://[::1]:80", None), ("http://c:1", "a b")]


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_with_separators_parses_from_every_source(
    password: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = f"http://carlos:{password}@127.0.0.1:3128"
    _clean_environment(monkeypatch)
    monkeypatch.setenv("PHAROX_PROXIES", f"socks5://127.0.0.1:1080, {entry}\n127.0.0.1:3129")
    from_env = PharoxSettings.from_mapping(None).proxies
    assert [p.safe_url for p in from_env] == [
        "socks5://127.0.0.1:1080",
        "http://127.0.0.1:3128",
        "http://127.0.0.1:3129",
    ]
    from_list = PharoxSettings.from_mapping({"PHAROX_PROXIES": [entry]}).proxies
    file = tmp_path / "proxies.txt"
    file.write_text(entry + "\n", encoding="utf-8")
    from_file = PharoxSettings.from_mapping({"PHAROX_PROXIES_FILE": str(file)}).proxies
    for spec in (from_env[1], from_list[0], from_file[0]):
        assert (spec.username, spec.password) == ("carlos", password)


def _malformed(password: str) -> list[str]:
    return [
        f"http://carlos:{password}@127.0.0.1:99999",  # bad port
        f"http://carlos:{password}@127.0.0.1",  # no port
        f"http://carlos:{password}",  # no host at all
        f"http://carlos:{password}@",
        f"socks5://carlos:{password}@[zz::1]:1080",  # bad IPv6
        f"http://:{password}@127.0.0.1:3128",  # empty user name
        f"http://carlos@127.0.0.1:3128 {password}",  # no password, then a stray piece
        f"ftp://carlos:{password}@127.0.0.1:21",
    ]


def _assert_no_fragment(message: str, password: str) -> None:
    assert "carlos" not in message, message
    for i in range(len(password) - 3):
        assert password[i : i + 4] not in message, f"{password[i : i + 4]!r} of the password in: {message}"


@pytest.mark.parametrize("password", PASSWORDS)
def test_errors_about_an_entry_mask_its_whole_userinfo_in_every_source(
    password: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clean_environment(monkeypatch)
    file = tmp_path / "proxies.txt"
    for entry in _malformed(password):
        monkeypatch.setenv("PHAROX_PROXIES", f"http://127.0.0.1:3129, {entry}")
        file.write_text(f"http://127.0.0.1:3129\n{entry}\n", encoding="utf-8")
        sources: list[tuple[dict[str, object] | None, str]] = [
            (None, "PHAROX_PROXIES[1]: "),  # the environment string
            ({"PHAROX_PROXIES": ["http://127.0.0.1:3129", entry]}, "PHAROX_PROXIES[1]: "),
            ({"PHAROX_PROXIES_FILE": str(file)}, "proxies.txt line 2: "),
        ]
        for source, where in sources:
            with pytest.raises(InvalidProxyURL) as info:
                PharoxSettings.from_mapping(source)
            message = str(info.value)
            assert where in message and "\n" not in message, message
            _assert_no_fragment(message, password)


def test_the_masked_entry_keeps_its_host_when_the_entry_ends_in_one(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv("PHAROX_PROXIES", "http://carl:Zq9 Wx7@127.0.0.1:99999")
    with pytest.raises(InvalidProxyURL) as info:
        PharoxSettings.from_mapping(None)
    assert str(info.value) == "PHAROX_PROXIES[0]: 'http://***@127.0.0.1:99999' has port 99999; expected 1-65535"
    with pytest.raises(InvalidProxyURL) as info:
        parse_proxy("http://carl:Zq9@Wx7", where="proxies[0]")
    assert str(info.value) == (
        "proxies[0]: 'http://***' is not a proxy URL; expected scheme://[user:password@]host:port"
    )


# -- unknown keys


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("PHAROX_"):
            monkeypatch.delenv(name)


def test_unknown_environment_variables_give_one_warning_naming_the_closest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv("PHAROX_PROXIES", "http://127.0.0.1:3129")
    monkeypatch.setenv("PHAROX_MAX_FAILURE", "5")
    monkeypatch.setenv("pharox_pool", "shop")
    monkeypatch.setenv("PHAROX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")  # the test suite's own
    with pytest.warns(PharoxSettingsWarning) as record:
        broker = LeaseBroker.from_settings()
    broker.close()
    assert len(record) == 1
    assert str(record[0].message).startswith(
        "ignored unknown environment variables PHAROX_MAX_FAILURE (did you mean PHAROX_MAX_FAILURES?), "
        "pharox_pool (did you mean PHAROX_POOL?); known settings: PHAROX_ACQUIRE_TIMEOUT, "
    )
    assert record[0].filename == __file__  # points at the caller, not into the package
    assert issubclass(PharoxSettingsWarning, UserWarning)


def test_a_clean_environment_gives_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv("PHAROX_POOL", "shop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PharoxSettings.from_mapping(None).pool == "shop"


def test_a_lowercase_key_in_scrapy_settings_is_rejected_too() -> None:
    from scrapy.settings import Settings

    with pytest.raises(ConfigurationError, match=r"unknown setting pharox_proxies \(did you mean PHAROX_PROXIES\?\)"):
        PharoxSettings.from_mapping(Settings({"pharox_proxies": "http://a:1"}))
