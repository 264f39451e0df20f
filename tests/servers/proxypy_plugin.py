"""proxy.py plugin loaded inside the kit's proxy.py subprocesses (not by tests).

1. proxy.py has no flag for the source address of upstream connections, but its
   ``resolve_dns`` hook may return one. Binding each proxy's outgoing connections
   to its own loopback IP (127.0.0.2, ...) lets the target tell proxies apart, for
   forwarded HTTP and CONNECT tunnels alike.
2. proxy.py 2.4 keeps a client connection bound to the first upstream: on a
   kept-alive connection it sends later plain-HTTP requests to that upstream even
   when they name another host, and forwards their ``Proxy-Authorization``
   unchecked and unstripped. Real proxies do neither, and either would make door
   tests fail (or pass) for the proxy's sake. So forwarded plain-HTTP requests go
   upstream with ``Connection: close``: one request per client connection, as a
   proxy may choose. CONNECT tunnels are unaffected and keep alive.
"""

from __future__ import annotations

import ipaddress
import os

from proxy.http.parser import HttpParser
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

    def handle_client_request(self, request: HttpParser) -> HttpParser:
        if not request.is_https_tunnel:
            request.add_header(b"Connection", b"close")
            # Hop-by-hop; proxy.py strips them itself only on a connection's first request.
            request.del_headers([b"Proxy-Authorization", b"Proxy-Connection"])
        return request
