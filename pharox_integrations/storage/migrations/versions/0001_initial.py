"""Initial SqlStorage schema: pools, consumers, proxies, leases, bounded health ring.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _uuid() -> sa.types.TypeEngine[object]:
    # 32 hex characters on MariaDB/MySQL: MariaDB's native UUID does not sort like Python's.
    return sa.Uuid().with_variant(sa.Uuid(native_uuid=False), "mysql", "mariadb")  # type: ignore[return-value]


def _datetime() -> sa.types.TypeEngine[object]:
    # Naive UTC; microseconds on MariaDB/MySQL too (their DATETIME defaults to seconds).
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")  # type: ignore[return-value]


def upgrade() -> None:
    op.create_table(
        "pxi_pools",
        sa.Column("id", _uuid(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("description", sa.Text),
    )
    op.create_table(
        "pxi_consumers",
        sa.Column("id", _uuid(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
    )
    op.create_table(
        "pxi_proxies",
        sa.Column("id", _uuid(), primary_key=True),
        sa.Column(
            "pool_id", _uuid(), sa.ForeignKey("pxi_pools.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("checked_at", _datetime(), nullable=False),
        sa.Column("cred_user", sa.String(255)),
        sa.Column("cred_password", sa.String(255)),
        sa.Column("source", sa.String(255)),
        sa.Column("country", sa.String(64)),
        sa.Column("city", sa.String(255)),
        sa.Column("latitude", sa.Float),
        sa.Column("longitude", sa.Float),
        sa.Column("isp", sa.String(255)),
        sa.Column("asn", sa.BigInteger),
        sa.Column("max_concurrency", sa.Integer),
        sa.Column("current_leases", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pick_stamp", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("latency_rank", sa.Integer, nullable=False, server_default="2147483647"),
        sa.Column("health_seq", sa.BigInteger, nullable=False, server_default="0"),
    )
    # One index per selector order, each led by (pool, status) so a pick reads the
    # first few entries of its pool's active range and never the whole table.
    op.create_index("pxi_proxies_first", "pxi_proxies", ["pool_id", "status", "id"])
    op.create_index(
        "pxi_proxies_round_robin", "pxi_proxies", ["pool_id", "status", "pick_stamp", "id"]
    )
    op.create_index(
        "pxi_proxies_least_used", "pxi_proxies", ["pool_id", "status", "current_leases", "id"]
    )
    op.create_index(
        "pxi_proxies_latency", "pxi_proxies", ["pool_id", "status", "latency_rank", "id"]
    )
    op.create_table(
        "pxi_leases",
        sa.Column("id", _uuid(), primary_key=True),
        sa.Column(
            "proxy_id", _uuid(), sa.ForeignKey("pxi_proxies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("pool_id", _uuid(), nullable=False),
        sa.Column("consumer_id", _uuid(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("acquired_at", _datetime(), nullable=False),
        sa.Column("expires_at", _datetime(), nullable=False),
        sa.Column("released_at", _datetime()),
    )
    # The expiry sweep (and counting active leases) reads only the active head of this
    # index, however much history the table holds.  Few indexes on purpose: every
    # lease inserts into each and every release updates them.
    op.create_index("pxi_leases_expiry", "pxi_leases", ["status", "expires_at"])
    op.create_index("pxi_leases_proxy", "pxi_leases", ["proxy_id"])  # FK, delete_proxy
    op.create_table(
        "pxi_health",
        sa.Column(
            "proxy_id",
            _uuid(),
            sa.ForeignKey("pxi_proxies.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("record_id", _uuid(), nullable=False),
        sa.Column("checked_at", _datetime(), nullable=False),
        sa.Column("reachable", sa.Boolean, nullable=False),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("status_before", sa.String(16)),
        sa.Column("status_after", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
    )


def downgrade() -> None:
    for table in ("pxi_health", "pxi_leases", "pxi_proxies", "pxi_consumers", "pxi_pools"):
        op.drop_table(table)
