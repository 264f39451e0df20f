"""The `pharox-integrations` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import PharoxIntegrationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pharox-integrations",
        description="Lease a proxy per request from a managed pharox pool (Scrapy, requests, urllib3, httpx).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")
    db = verbs.add_parser("db", help="database schema for the SQL storages")
    db_verbs = db.add_subparsers(dest="db_verb", metavar="ACTION", required=True)
    init = db_verbs.add_parser("init", help="create or upgrade the schema")
    init.add_argument(
        "--storage", required=True, metavar="URL", help="sqlite:///…, postgresql+psycopg://…, mysql+pymysql://…"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "db" and args.db_verb == "init":
            from .storage import safe_storage_url
            from .storage.sql import init_schema

            init_schema(args.storage)
            print(f"schema ready in {safe_storage_url(args.storage)}")
            return 0
    except PharoxIntegrationError as exc:
        print(f"pharox-integrations: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
