"""The health policy (pharox_integrations/health.py): how an answer or an error becomes a verdict."""

from __future__ import annotations

import pytest

from pharox_integrations import HealthPolicy, Verdict


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (200, Verdict.OK),
        (404, Verdict.TARGET_ERROR),
        (500, Verdict.TARGET_ERROR),
        (503, Verdict.TARGET_ERROR),
        (403, Verdict.BAN),
        (429, Verdict.COOLDOWN),
        (407, Verdict.FAILURE),
    ],
)
def test_status_code_verdicts(code: int, verdict: Verdict) -> None:
    assert HealthPolicy().judge(code) is verdict


class _Answer:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def test_503_with_retry_after_is_a_cooldown_and_without_it_the_sites_error() -> None:
    policy = HealthPolicy()
    assert policy.judge(503, response=_Answer({"Retry-After": "5"})) is Verdict.COOLDOWN
    assert policy.judge(503, response=_Answer({})) is Verdict.TARGET_ERROR
    assert policy.judge(500, response=_Answer({"Retry-After": "5"})) is Verdict.TARGET_ERROR


def test_caller_and_certificate_errors_are_not_the_proxys_fault() -> None:
    import ssl

    import requests

    policy = HealthPolicy()
    assert policy.judge(error=requests.exceptions.InvalidURL("bad")) is Verdict.TARGET_ERROR
    assert policy.judge(error=ssl.SSLCertVerificationError("self-signed")) is Verdict.TARGET_ERROR
    assert policy.judge(error=requests.exceptions.ProxyError("tunnel failed")) is Verdict.FAILURE
    assert policy.judge(error=ConnectionRefusedError()) is Verdict.FAILURE


def test_body_based_ban_detector() -> None:
    policy = HealthPolicy(ban_detector=lambda status, body: "captcha" in body if body is not None else None)
    assert policy.judge(200, response="<h1>captcha</h1>") is Verdict.BAN
    assert policy.judge(200, response="<h1>ok</h1>") is Verdict.OK
    assert policy.judge(403) is Verdict.BAN

