"""What the urllib3 and requests doors share (`pharox_integrations.urllib3_support`).

Real urllib3 responses over an in-memory body, a real garbage-collected response and the
package's real closer thread; the exchange is a recorder of `close()` calls, since what
is under test is when and how often it is ended.
"""

from __future__ import annotations

import gc
import io
import pickle
from typing import Any

import pytest
import requests
from brokerhelpers import wait_for
from pharox import ProxyProtocol
from urllib3 import HTTPResponse, Timeout
from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError

from pharox_integrations import NoProxyAvailable
from pharox_integrations import requests as requests_door
from pharox_integrations import urllib3 as urllib3_door
from pharox_integrations.broker import HTTP_PROTOCOLS
from pharox_integrations.errors import ProxyAttempt
from pharox_integrations.routes import CLOSER
from pharox_integrations.urllib3_support import OpenExchanges, connect_timeout, socks_hint


class Recorder:
    """Stands in for an `Exchange`: records each `close(error)`."""

    def __init__(self, fail: bool = False) -> None:
        self.closed: list[BaseException | None] = []
        self.fail = fail

    def close(self, error: BaseException | None = None) -> None:
        self.closed.append(error)
        if self.fail:
            raise RuntimeError("the storage is down")


def streamed(n: int = 100) -> HTTPResponse:
    return HTTPResponse(body=io.BytesIO(b"x" * n), preload_content=False, status=200)


@pytest.fixture(autouse=True)
def closer_running() -> None:
    CLOSER.start()  # as every door's constructor does


def opened(record: OpenExchanges, fail: bool = False) -> Any:
    ex = Recorder(fail)
    assert record.add(ex) is ex  # type: ignore[arg-type]
    return ex


# ---------------------------------------------------------------------- OpenExchanges


def test_an_exchange_in_flight_is_counted_and_ended_once() -> None:
    record = OpenExchanges(defer_close=False)
    ex = opened(record)
    assert len(record) == 1
    record.end_unless_streaming(ex)
    record.end(ex)
    assert ex.closed == [None] and len(record) == 0


# `drain_conn()` too, through urllib3 releasing at the end of a real connection's body:
# test_urllib3_manager.py's streaming test covers it.
@pytest.mark.parametrize("finish", ["release_conn", "close"])
def test_a_streamed_body_holds_the_exchange_until_it_lets_go(finish: str) -> None:
    record = OpenExchanges(defer_close=False)
    ex = opened(record)
    response = streamed()
    record.stream(ex, response)
    record.end_unless_streaming(ex)  # the request's own code is done: the body still holds it
    assert ex.closed == [] and len(record) == 1
    assert response.read(10) == b"x" * 10
    getattr(response, finish)()
    assert ex.closed == [None] and len(record) == 0
    response.release_conn()
    response.close()
    assert ex.closed == [None]  # ended once, whatever is called after


def test_a_deferred_close_ends_on_the_closer_thread() -> None:
    record = OpenExchanges(defer_close=True)
    ex = opened(record)
    response = streamed()
    record.stream(ex, response)
    response.close()
    assert wait_for(lambda: ex.closed == [None])


def test_a_failed_read_ends_the_exchange_with_the_error() -> None:
    record = OpenExchanges(defer_close=False)
    ex = opened(record)
    response = streamed()
    record.stream(ex, response)
    cut = ProtocolError("Connection broken")
    try:
        raise cut
    except ProtocolError:
        response.release_conn()  # as urllib3 does while the failed read unwinds
    assert ex.closed == [cut]


def test_a_response_dropped_unread_ends_on_the_closer_thread() -> None:
    record = OpenExchanges(defer_close=True)
    ex = opened(record)
    response = streamed()
    record.stream(ex, response)
    del response
    gc.collect()
    assert wait_for(lambda: ex.closed == [None]) and len(record) == 0


def test_end_streams_ends_only_streamed_exchanges_and_keeps_going_past_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = OpenExchanges(defer_close=False)
    in_flight, failing, fine = opened(record), opened(record, fail=True), opened(record)
    responses = [streamed(), streamed()]
    record.stream(failing, responses[0])
    record.stream(fine, responses[1])
    assert record.end_streams() == 2
    assert failing.closed == [None] and fine.closed == [None] and in_flight.closed == []
    assert "recording a streamed answer's outcome failed" in caplog.text
    assert len(record) == 1  # the request in flight ends it on its way out
    record.end_unless_streaming(in_flight)
    assert in_flight.closed == [None] and len(record) == 0


# ---------------------------------------------------------------------- connect_timeout


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (None, None),
        (3, 3.0),
        (2.5, 2.5),
        ((1.5, 30), 1.5),
        ((None, 30), None),
        (Timeout(connect=4, read=30), 4.0),
        (Timeout(total=6), 6.0),
        (Timeout(read=30), None),
        (True, None),
    ],
)
def test_connect_timeout_reads_every_form_a_client_takes(timeout: Any, expected: float | None) -> None:
    assert connect_timeout(timeout) == expected


# ---------------------------------------------------------------------- SOCKS hint


def test_the_socks_hint_names_the_extra_only_when_socks_proxies_were_skipped() -> None:
    def none_left(**counts: int) -> NoProxyAvailable:
        return NoProxyAvailable("no proxy available in pool 'default'", counts=counts)

    hinted = socks_hint(none_left(wrong_protocol=2), HTTP_PROTOCOLS)
    assert "pip install 'pharox-integrations[socks]'" in str(hinted)
    assert "socks" not in str(socks_hint(none_left(busy=2), HTTP_PROTOCOLS))
    assert "socks" not in str(socks_hint(none_left(wrong_protocol=2), None))  # PySocks there: another reason
    assert "socks" not in str(socks_hint(none_left(wrong_protocol=2), HTTP_PROTOCOLS | {ProxyProtocol.SOCKS5}))


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error_type", "family"),
    [
        (requests_door.AllProxiesFailedError, requests.ConnectionError),
        (requests_door.ProxyAuthenticationError, requests.ConnectionError),
        (urllib3_door.AllProxiesFailedError, MaxRetryError),
        (urllib3_door.ProxyAuthenticationFailedError, HTTPError),
    ],
)
def test_all_proxies_failed_pickles_as_it_was_built(error_type: type[Exception], family: type[Exception]) -> None:
    attempts = [ProxyAttempt("http://10.0.0.1:3128", "failure", "refused")]
    error = error_type(attempts, "the only proxy tried failed: http://10.0.0.1:3128: failure (refused)")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is error_type and isinstance(back, family)
    assert str(back) == str(error) and back.args == error.args and back.attempts == attempts  # type: ignore[attr-defined]
