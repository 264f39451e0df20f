"""Fetch every product of the shop's JSON API with requests, a proxy per request.

    python requests_example.py http://127.0.0.1:8000 24
"""

import sys

from pharox_config import make_broker

from pharox_integrations.requests import pharox_session


def main(site_url, pages):
    broker = make_broker()
    try:
        # pharox_session mounts PharoxAdapter for http:// and https://: every request
        # leases a proxy, and the lease goes back when the response body is consumed.
        with pharox_session(broker) as session:
            for page in range(1, pages + 1):
                response = session.get(f"{site_url}/api/items", params={"page": page}, timeout=15)
                response.raise_for_status()
                item = response.json()["item"]
                print(f"{item['id']:>3}  {item['name']:<12} {item['price']:>7.2f}")
        print(broker.health())  # pool counts and this process's success rate
    finally:
        broker.close()  # releases anything still held (nothing, normally)
    return 0 if broker.held == 0 else 1


if __name__ == "__main__":
    site = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    sys.exit(main(site, int(sys.argv[2]) if len(sys.argv) > 2 else 24))
