"""proxy.py plugin loaded inside the kit's proxy.py subprocesses (not by tests).

proxy.py has no flag for the source address of upstream connections, but its
``resolve_dns`` hook may return one. Binding each proxy's outgoing connections
to its own loopback IP (127.0.0.2, ...) lets the target tell proxies apart, for
forwarded HTTP and CONNECT tunnels alike.
"""

from __future__ import annotations

import ipaddress
import os

from proxy.http.proxy import HttpProxyBasePlugin

#: Environment variable the kit sets to the outbound IP of one proxy process.
OUTBOUND_IP_ENV = "PHAROX_KIT_OUTBOUND_IP"


class BindOutboundPlugin(HttpProxyBasePlugin):
    """Connect upstream from ``$PHAROX_KIT_OUTBOUND_IP`` (any free port)."""

    def resolve_dns(self, host: str, port: int) -> tuple[str | None, tuple[str, int] | None]:
        source = os.environ.get(OUTBOUND_IP_ENV)
        if not source:
            return None, None
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:  # a host name: proxy.py honours the source address
            return None, (source, 0)
        if addr.version != 4:
            return None, None
        # proxy.py 2.4 drops the source address when the upstream is an IP
        # literal (new_socket_connection's fast path). The 32-bit number form of
        # the same IPv4 address is no literal to `ipaddress`, but getaddrinfo
        # (inet_aton rules) reads it as that address, so the bind is honoured.
        return str(int(addr)), (source, 0)
