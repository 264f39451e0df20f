"""The shop spider: the product index, then one item per product page."""

import os

import scrapy


class ShopSpider(scrapy.Spider):
    """`scrapy crawl shop -a site_url=http://127.0.0.1:8000 -O items.json`."""

    name = "shop"

    def __init__(self, site_url=None, **kwargs):
        super().__init__(**kwargs)
        site = site_url or os.environ.get("DEMO_SITE_URL", "http://127.0.0.1:8000")
        self.start_urls = [site.rstrip("/") + "/"]

    def parse(self, response):
        for href in response.css("a::attr(href)").getall():
            if href.startswith("/page/"):
                yield response.follow(href, callback=self.parse_product)

    def parse_product(self, response):
        yield {
            "url": response.url,
            "name": response.css("h1.name::text").get(),
            "price": float(response.css("p.price::text").get()),
            # Which proxy served it, without credentials (set by the middleware).
            "proxy": response.meta.get("pharox_proxy"),
        }
