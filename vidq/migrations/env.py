"""Alembic's environment for vidq's schema (run through ``vidq db``, not the alembic CLI).

``vidq.migrate`` hands over an open connection (online) or a URL (``--sql``,
offline). SQLite gets batch mode, since it cannot ALTER most things in place.
"""

from __future__ import annotations

from alembic import context

from vidq.db import Base
from vidq.migrate import VERSION_TABLE

config = context.config
target_metadata = Base.metadata


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        render_as_batch=bool(url and url.startswith("sqlite")),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
