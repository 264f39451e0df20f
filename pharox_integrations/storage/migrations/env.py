"""Alembic environment for SqlStorage: always run programmatically on a given connection.

`pharox_integrations.storage.sql.init_schema` passes the connection and our own version
table name (so the migrations never touch another application's `alembic_version`).
"""

from __future__ import annotations

from alembic import context

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run these migrations through pharox_integrations.storage.sql.init_schema(url) "
        "or `pharox-integrations db init --storage URL`"
    )
context.configure(
    connection=connection,
    target_metadata=None,
    version_table=config.attributes.get("version_table", "pxi_alembic_version"),
    transactional_ddl=connection.dialect.name != "mysql",
)
with context.begin_transaction():
    context.run_migrations()
