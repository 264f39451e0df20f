"""The demo's requests and urllib3 workloads: fetch every product of the JSON API."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..broker import LeaseBroker
from ..exchange import describe_error


@dataclass
class ClientRun:
    """What one client fetched: product ids received and errors (safe to print)."""

    client: str
    ids: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _run(client: str, pages: int, threads: int, fetch: Callable[[int], object], done: Callable[[], None]) -> ClientRun:
    result = ClientRun(client)

    def one(page: int) -> None:
        try:
            data = fetch(page)
            if not isinstance(data, dict) or data.get("page") != page:
                raise ValueError(f"unexpected answer for page {page}")
            result.ids.append(page)
        except Exception as exc:  # reported in the demo's summary, never raised
            result.errors.append(f"page {page}: {describe_error(exc)}")
        finally:
            done()

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"demo-{client}") as pool:
        list(pool.map(one, range(1, pages + 1)))
    result.ids.sort()
    return result


def run_requests(
    broker: LeaseBroker, site_url: str, pages: int, *, threads: int = 4, done: Callable[[], None] = lambda: None
) -> ClientRun:
    """requests through `PharoxAdapter`: one lease per request, released with the body."""
    from ..requests import pharox_session

    with pharox_session(broker) as session:

        def fetch(page: int) -> object:
            response = session.get(f"{site_url}/api/items", params={"page": page}, timeout=10)
            response.raise_for_status()
            return response.json()

        return _run("requests", pages, threads, fetch, done)


def run_urllib3(
    broker: LeaseBroker, site_url: str, pages: int, *, threads: int = 4, done: Callable[[], None] = lambda: None
) -> ClientRun:
    """urllib3 through `PharoxProxyManager`, the drop-in for `urllib3.ProxyManager`."""
    from ..urllib3 import PharoxProxyManager

    with PharoxProxyManager(broker, maxsize=threads) as http:

        def fetch(page: int) -> object:
            response = http.request("GET", f"{site_url}/api/items?page={page}", timeout=10.0)
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            return json.loads(response.data)

        return _run("urllib3", pages, threads, fetch, done)
