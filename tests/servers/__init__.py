"""Real servers for tests: proxy.py / pproxy proxies and an HTTP(S) target.

The pytest fixtures built on these live in ``tests/conftest.py``; see README.md.
"""

from .proxies import SPECIAL_AUTH, DeadProxy, KitProxy, ProxyKit, ProxyStartError
from .target import BYTES_PATTERN, SeenRequest, TargetServer, expected_bytes, make_tls_target

__all__ = [
    "BYTES_PATTERN",
    "SPECIAL_AUTH",
    "DeadProxy",
    "KitProxy",
    "ProxyKit",
    "ProxyStartError",
    "SeenRequest",
    "TargetServer",
    "expected_bytes",
    "make_tls_target",
]
