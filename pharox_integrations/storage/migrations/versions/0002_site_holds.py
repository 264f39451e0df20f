"""Per-site holds: which proxy a site keeps off, why, and until when (``pxi_site_holds``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

One row per (proxy, site) pair, shared by every process on the database so a ban seen
by one worker keeps the others away too.  Times are epoch seconds in double precision
(microseconds survive, and no time zone to get wrong).  The rows go with their proxy
(ON DELETE CASCADE), so deleting a proxy or a pool needs no extra statement here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _uuid() -> sa.types.TypeEngine[object]:
    # Must be the very type of pxi_proxies.id (32 hex characters on MariaDB/MySQL) for the FK.
    return sa.Uuid().with_variant(sa.Uuid(native_uuid=False), "mysql", "mariadb")  # type: ignore[return-value]


def _site() -> sa.types.TypeEngine[object]:
    # A binary collation on MariaDB/MySQL: their default (…_general_ci) would treat
    # "café.example" and "cafe.example" as one site, which no other database does.
    return sa.String(255).with_variant(  # type: ignore[return-value]
        mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def upgrade() -> None:
    op.create_table(
        "pxi_site_holds",
        sa.Column(
            "proxy_id",
            _uuid(),
            sa.ForeignKey("pxi_proxies.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("site", _site(), primary_key=True),
        sa.Column("until", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("strikes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("keep_until", sa.Double(), nullable=False),
    )
    # A site's holds in force (`until > now`) are one range of this index; the primary
    # key, led by proxy_id, serves the per-proxy ban count.
    op.create_index("pxi_site_holds_site_until", "pxi_site_holds", ["site", "until"])
    op.create_index("pxi_site_holds_keep", "pxi_site_holds", ["keep_until"])  # purge


def downgrade() -> None:
    op.drop_table("pxi_site_holds")
