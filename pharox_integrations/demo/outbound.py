"""proxy.py plugin used by the demo's proxies (loaded inside the proxy.py process only).

proxy.py has no option for the source address of its upstream connections, but a
plugin's `resolve_dns` may return one.  Each demo proxy connects out from its own
loopback address (given in `PHAROX_DEMO_SOURCE_IP`), which is how the demo site
tells the proxies apart and bans exactly one of them.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from proxy.http.proxy import HttpProxyBasePlugin

SOURCE_IP_ENV = "PHAROX_DEMO_SOURCE_IP"


class SourceAddressPlugin(HttpProxyBasePlugin):
    """Open upstream connections from `$PHAROX_DEMO_SOURCE_IP` (any free port)."""

    def resolve_dns(self, host: str, port: int) -> tuple[str | None, tuple[str, int] | None]:
        source = os.environ.get(SOURCE_IP_ENV)
        if not source:
            return None, None
        target = "127.0.0.1" if host == "localhost" else host
        try:
            address = ipaddress.IPv4Address(target)
        except ValueError:
            return None, (source, 0)  # a host name: proxy.py binds the source itself
        if not address.is_loopback:
            return None, None  # a 127.x source address cannot reach anything else
        # proxy.py 2.4 connects to a dotted IPv4 literal without the source address;
        # the hexadecimal spelling of the same address takes the path that binds it.
        return hex(int(address)), (source, 0)

    def handle_client_request(self, request: Any) -> Any:
        """Drop `Proxy-Authorization` from every forwarded request.

        proxy.py 2.4 strips it from the first request of a client connection only; later
        requests on the same kept-alive connection reach the site with the header (and
        are not re-authenticated).  A real proxy never forwards it, so neither does ours.
        """
        if request.headers and b"proxy-authorization" in request.headers:
            request.del_header(b"proxy-authorization")
        return request
