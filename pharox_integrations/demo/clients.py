"""The demo's requests and urllib3 workloads: fetch every product of each site's JSON API."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..broker import LeaseBroker
from ..exchange import describe_error


@dataclass
class ClientRun:
    """What one client fetched: product ids received per site, and errors (safe to print)."""

    client: str
    ids: dict[str, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


Fetch = Callable[[str, int], object]  # (site URL, page) -> the decoded JSON answer


def _run(
    client: str, sites: dict[str, str], pages: int, threads: int, fetch: Fetch, done: Callable[[], None]
) -> ClientRun:
    """Every product of every site, one site after the other (`threads` requests at once)."""
    result = ClientRun(client, {name: [] for name in sites})
    work = [(name, page) for name in sites for page in range(1, pages + 1)]

    def one(job: tuple[str, int]) -> None:
        name, page = job
        try:
            data = fetch(sites[name], page)
            if not isinstance(data, dict) or data.get("page") != page:
                raise ValueError(f"unexpected answer for page {page}")
            result.ids[name].append(page)
        except Exception as exc:  # reported in the demo's summary, never raised
            result.errors.append(f"{name} page {page}: {describe_error(exc)}")
        finally:
            done()

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"demo-{client}") as pool:
        list(pool.map(one, work))
    for ids in result.ids.values():
        ids.sort()
    return result


def run_requests(
    broker: LeaseBroker,
    sites: dict[str, str],
    pages: int,
    *,
    threads: int = 4,
    done: Callable[[], None] = lambda: None,
) -> ClientRun:
    """requests through `PharoxAdapter`: one lease per request, released with the body."""
    from ..requests import pharox_session

    with pharox_session(broker) as session:

        def fetch(site_url: str, page: int) -> object:
            response = session.get(f"{site_url}/api/items", params={"page": page}, timeout=10)
            response.raise_for_status()
            return response.json()

        return _run("requests", sites, pages, threads, fetch, done)


def run_urllib3(
    broker: LeaseBroker,
    sites: dict[str, str],
    pages: int,
    *,
    threads: int = 4,
    done: Callable[[], None] = lambda: None,
) -> ClientRun:
    """urllib3 through `PharoxProxyManager`, the drop-in for `urllib3.ProxyManager`."""
    from ..urllib3 import PharoxProxyManager

    with PharoxProxyManager(broker, maxsize=threads) as http:

        def fetch(site_url: str, page: int) -> object:
            response = http.request("GET", f"{site_url}/api/items?page={page}", timeout=10.0)
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            return json.loads(response.data)

        return _run("urllib3", sites, pages, threads, fetch, done)
