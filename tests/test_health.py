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
        (429, Verdict.BAN),
        (407, Verdict.FAILURE),
    ],
)
def test_status_code_verdicts(code: int, verdict: Verdict) -> None:
    assert HealthPolicy().judge(code) is verdict


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

