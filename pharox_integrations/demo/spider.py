"""The demo's Scrapy spider: the index of each demo site, then every product page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.http import Response


class DemoShopSpider(scrapy.Spider):
    """Follows the product links of the demo sites and yields one item per product.

    `site_url`: one site, or several separated by commas (the demo crawls its two)."""

    name = "demo_shop"

    def __init__(self, site_url: str = "http://127.0.0.1:8000", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_urls = [url.strip().rstrip("/") + "/" for url in site_url.split(",") if url.strip()]

    def parse(self, response: Response) -> Iterator[Any]:
        for href in response.css("a::attr(href)").getall():
            if href.startswith("/page/"):
                yield response.follow(href, callback=self.parse_product)

    def parse_product(self, response: Response) -> Iterator[dict[str, Any]]:
        yield {
            "url": response.url,
            "name": response.css("h1.name::text").get(),
            "price": float(response.css("p.price::text").get() or "nan"),
        }
