"""Example Scrapy project: a shop crawled through a pharox proxy pool."""
