"""proxy.py plugin used by the demo's proxies (loaded inside the proxy.py process only).

The demo site must tell its proxies apart to ban exactly one of them.  Two signals,
both set per proxy process through the environment:

- `PHAROX_DEMO_SOURCE_IP`: connect upstream from this loopback address, as a real
  proxy connects from its own IP (Linux routes all of 127.0.0.0/8 to loopback;
  elsewhere the demo leaves it unset);
- `PHAROX_DEMO_VIA`: a label sent to the site in `X-Demo-Via`, which works everywhere.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from proxy.http.proxy import HttpProxyBasePlugin

from . import SOURCE_IP_ENV, VIA_ENV, VIA_HEADER


class SourceAddressPlugin(HttpProxyBasePlugin):
    """Connect upstream from `$PHAROX_DEMO_SOURCE_IP`; label requests with `$PHAROX_DEMO_VIA`."""

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
        """Label the request, drop `Proxy-Authorization` from it, and ask the site to
        close the connection after its answer.

        proxy.py 2.4 strips `Proxy-Authorization` from the first request of a client
        connection only; later requests on the same kept-alive connection would reach
        the site with it.  A real proxy never forwards it, so neither does ours.

        proxy.py 2.4 also sends every later request of a kept-alive client connection
        to the upstream server of the first one, whatever host it names: a client that
        reuses its connection to the proxy for another site would get the first site's
        answer.  ``Connection: close`` ends each client connection with its answer, so
        every request reaches the site it names (the demo serves two sites).
        """
        if request.headers and b"proxy-authorization" in request.headers:
            request.del_header(b"proxy-authorization")
        if request.headers and b"connection" in request.headers:
            request.del_header(b"connection")
        request.add_header(b"Connection", b"close")
        via = os.environ.get(VIA_ENV)
        if via:
            request.add_header(VIA_HEADER.encode(), via.encode())
        return request
