"""Fetch every product of the shop's JSON API with urllib3, a proxy per request.

    python urllib3_example.py http://127.0.0.1:8000 24
"""

import json
import sys

from pharox_config import make_broker

from pharox_integrations.urllib3 import PharoxProxyManager


def main(site_url, pages):
    broker = make_broker()
    try:
        # A drop-in for urllib3.ProxyManager(proxy_url): same request() API, but every
        # request leases a proxy from the pool and reports how it went.
        with PharoxProxyManager(broker) as http:
            for page in range(1, pages + 1):
                response = http.request("GET", f"{site_url}/api/items?page={page}", timeout=15.0)
                if response.status != 200:
                    raise SystemExit(f"page {page}: HTTP {response.status}")
                item = json.loads(response.data)["item"]
                print(f"{item['id']:>3}  {item['name']:<12} {item['price']:>7.2f}")
        print(broker.health())
    finally:
        broker.close()
    return 0 if broker.held == 0 else 1


if __name__ == "__main__":
    site = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    sys.exit(main(site, int(sys.argv[2]) if len(sys.argv) > 2 else 24))
