"""The request life cycle (`Exchange`): the outcome -> step table, without a network.

Every door's behaviour follows from these rules; tests/test_contract.py checks that
each door translates its client's events into them, through real proxies.
"""

from __future__ import annotations

import io
import warnings
from http.client import RemoteDisconnected
from typing import Any

import pytest
import urllib3
from brokerhelpers import give_back_kept_slots

from pharox_integrations import (
    AllProxiesFailed,
    HealthPolicy,
    LeaseBroker,
    NoProxyAvailable,
    ProxyAuthenticationFailed,
    ReportFailed,
    Step,
)
from pharox_integrations.exchange import describe_error, moves_keyword

URLS = [f"http://user{i}:secret{i}@127.0.0.1:{9100 + i}" for i in range(4)]


def make(urls: list[str] = URLS, **kw: Any) -> LeaseBroker:
    kw.setdefault("acquire_timeout", 0.5)
    return LeaseBroker.from_proxies(urls, **kw)


def assert_nothing_held(broker: LeaseBroker) -> None:
    assert broker.held == 0, broker.held_leases()
    give_back_kept_slots(broker)  # a lease block's free slots (shared storage) are not in use
    assert {p.current_leases for p in broker.proxies()} == {0}


def test_an_answer_returns_and_releases() -> None:
    broker = make()
    ex = broker.exchange()
    lease = ex.lease()
    assert ex.answered(200) is Step.RETURN
    assert lease.released and ex.attempts == []
    ex.close()
    assert broker.counters["bans"] == broker.counters["failures"] == 0
    assert_nothing_held(broker)


@pytest.mark.parametrize("status", [404, 500, 503])
def test_site_errors_return_and_are_not_the_proxys_fault(status: int) -> None:
    broker = make()
    ex = broker.exchange()
    ex.lease()
    assert ex.answered(status) is Step.RETURN
    assert {p.status for p in broker.proxies()} == {"active"}
    assert_nothing_held(broker)


def test_a_ban_moves_to_an_untried_proxy_until_the_budget_is_spent_then_returns() -> None:
    broker = make(max_moves=2)
    ex = broker.exchange()
    seen = []
    steps = []
    for _ in range(3):
        lease = ex.lease()
        seen.append(lease.proxy_id)
        steps.append(ex.answered(403))
    assert steps == [Step.MOVE, Step.MOVE, Step.RETURN]  # the caller gets the last ban answer
    assert len(set(seen)) == 3
    assert [a.outcome for a in ex.attempts] == ["ban"] * 3
    ex.close()
    assert broker.counters["bans"] == 3
    assert_nothing_held(broker)


def test_failures_raise_all_proxies_failed_naming_each_proxy_once_without_secrets() -> None:
    broker = make(URLS[:2])
    ex = broker.exchange(max_moves=5)
    steps = []
    while True:
        ex.lease()
        step = ex.failed(ConnectionRefusedError(111, "Connection refused"))
        steps.append(step)
        if step is not Step.MOVE:
            break
    assert steps == [Step.MOVE, Step.RAISE]
    error = ex.error
    assert isinstance(error, AllProxiesFailed) and not isinstance(error, ProxyAuthenticationFailed)
    text = str(error)
    assert text.startswith("all 2 proxies tried failed: ")
    assert text.count("127.0.0.1:9100") == 1 and text.count("127.0.0.1:9101") == 1
    assert "secret" not in text and "user" not in text and "\n" not in text
    assert "1 already tried" in text or "2 already tried" in text  # why it stopped moving
    ex.close()
    assert_nothing_held(broker)


def test_the_only_proxy_failing_is_tried_once() -> None:
    broker = make(URLS[:1])
    ex = broker.exchange()
    ex.lease()
    assert ex.failed(TimeoutError("timed out")) is Step.RAISE
    assert str(ex.error).startswith("the only proxy tried failed: http://127.0.0.1:9100: failure (TimeoutError")
    assert broker.counters["acquired"] == 1
    assert_nothing_held(broker)


def test_a_407_answer_is_the_proxys_refusal() -> None:
    broker = make(URLS[:2])
    ex = broker.exchange()
    ex.lease()
    assert ex.answered(407) is Step.MOVE
    ex.lease()
    assert ex.failed(OSError("Tunnel connection failed: 407"), status_code=407) is Step.RAISE
    assert isinstance(ex.error, ProxyAuthenticationFailed)
    assert [a.detail for a in ex.attempts] == ["HTTP 407", "HTTP 407"]
    assert_nothing_held(broker)


def test_a_dropped_keepalive_is_resent_once_on_the_same_proxy_then_counts() -> None:
    broker = make(URLS[:1])
    ex = broker.exchange()
    lease = ex.lease()
    assert ex.failed(RemoteDisconnected("Remote end closed connection without response")) is Step.RESEND
    assert ex.current is lease and not lease.released
    assert ex.failed(RemoteDisconnected("again")) is Step.RAISE
    assert broker.counters["failures"] == 1
    assert_nothing_held(broker)


def test_the_callers_own_error_is_raised_as_it_is_and_does_not_charge_the_proxy() -> None:
    broker = make()
    ex = broker.exchange()
    ex.lease()
    bad = ValueError("Invalid URL 'http://'")
    assert ex.failed(bad) is Step.RAISE
    assert ex.error is bad
    assert broker.counters["failures"] == 0
    assert_nothing_held(broker)


def test_a_generator_body_is_never_replayed() -> None:
    broker = make()
    ex = broker.exchange(body=(chunk for chunk in [b"a", b"b"]))
    assert not ex.replayable
    ex.lease()
    assert ex.answered(403) is Step.RETURN  # not moved: the body is spent
    ex2 = broker.exchange(body=iter([b"x"]))
    ex2.lease()
    assert ex2.failed(ConnectionRefusedError(111, "refused")) is Step.RAISE
    assert "the request body could not be replayed" in str(ex2.error)
    assert_nothing_held(broker)


def test_a_seekable_body_is_rewound_to_where_the_request_began() -> None:
    broker = make()
    body = io.BytesIO(b"head|payload")
    body.seek(5)
    ex = broker.exchange(body=body)
    assert ex.replayable
    ex.lease()
    body.read()  # the client sent it
    assert ex.answered(403) is Step.MOVE
    assert body.tell() == 5
    ex.lease()
    body.read()
    assert ex.failed(ConnectionResetError(104, "reset")) is Step.RESEND
    assert body.read() == b"payload"
    ex.close()
    assert_nothing_held(broker)


def test_a_non_seekable_stream_is_not_replayable() -> None:
    class Pipe(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

    broker = make()
    assert not broker.exchange(body=Pipe()).replayable


def test_a_streamed_answer_holds_its_lease_until_closed_and_a_read_error_counts() -> None:
    broker = make(URLS[:1])
    ex = broker.exchange()
    lease = ex.lease()
    assert ex.answered(200, streaming=True) is Step.RETURN
    assert not lease.released and broker.held == 1
    ex.close(error=ConnectionResetError(104, "reset while reading"))
    assert lease.released and broker.counters["failures"] == 1
    ex.close()  # twice is fine
    assert_nothing_held(broker)


def test_a_failing_ban_detector_or_storage_is_report_failed_and_releases() -> None:
    def detector(status: int | None, response: Any) -> bool | None:
        raise RuntimeError("detector bug")

    broker = make(policy=HealthPolicy(ban_detector=detector))
    ex = broker.exchange()
    ex.lease()
    with pytest.raises(ReportFailed, match="detector bug") as caught:
        ex.answered(200)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert_nothing_held(broker)

    fine = make()

    def broken(result: object) -> None:  # fault injection: a storage that cannot write
        raise RuntimeError("storage down")

    fine.storage.apply_health_check_result = broken  # type: ignore[method-assign]
    ex = fine.exchange()
    ex.lease()
    with pytest.raises(ReportFailed, match="storage down"):
        ex.answered(403)
    assert_nothing_held(fine)


def test_close_releases_a_lease_prepared_for_a_move_that_never_happened() -> None:
    broker = make()
    ex = broker.exchange()
    ex.lease()
    assert ex.answered(403) is Step.MOVE
    assert broker.held == 1  # the next proxy, leased for the move
    ex.close()  # the caller went away (cancelled) before sending again
    assert_nothing_held(broker)


def test_no_proxy_at_the_first_lease_is_no_proxy_available() -> None:
    broker = make(URLS[:1], acquire_timeout=5, max_concurrency=1)
    held = broker.acquire()
    with pytest.raises(NoProxyAvailable):
        broker.exchange(timeout=0.05).lease()  # the caller's timeout bounds the wait
    broker.release(held)
    assert_nothing_held(broker)


def test_move_budget_keyword_and_its_old_name() -> None:
    assert moves_keyword(None) is None
    assert moves_keyword(2) == 2
    with pytest.warns(DeprecationWarning, match="proxy_retries= is deprecated: use max_moves="):
        assert moves_keyword(None, proxy_retries=5) == 5
    with pytest.raises(ValueError, match="max_moves=-1"):
        moves_keyword(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="both given"):
            moves_keyword(1, proxy_retries=2)
    assert make().max_moves == 3


def test_errors_are_described_in_one_short_line() -> None:
    pool = urllib3.HTTPConnectionPool("127.0.0.1", 9)
    try:
        pool.urlopen("GET", "/", retries=False)
    except Exception as exc:  # a real nested urllib3 error: NewConnectionError in a wrapper
        text = describe_error(exc)
    assert text.startswith("ConnectionRefusedError: [Errno 111]"), text
    assert "object at 0x" not in text
    assert describe_error(OSError("http://user:pw@host:1 failed")) == "OSError: http://***@host:1 failed"


def test_a_tls_verdict_of_urllib3_is_the_reason_given() -> None:
    """urllib3's fingerprint and hostname checks raise its own errors (not ssl.SSLError),
    wrapped as urllib3 wraps them on a request through an HTTPS proxy."""
    from urllib3.exceptions import MaxRetryError, ProxyError, SSLError
    from urllib3.util.ssl_match_hostname import CertificateError

    hostname = CertificateError("hostname 'example.com' doesn't match 'localhost'")
    wrapped = MaxRetryError(None, "/", ProxyError("Unable to connect to proxy", SSLError(hostname)))  # type: ignore[arg-type]
    assert describe_error(wrapped) == "CertificateError: hostname 'example.com' doesn't match 'localhost'"
    fingerprint = MaxRetryError(None, "/", SSLError('Fingerprints did not match. Expected "4a", got "4b"'))  # type: ignore[arg-type]
    assert describe_error(fingerprint) == 'SSLError: Fingerprints did not match. Expected "4a", got "4b"'
