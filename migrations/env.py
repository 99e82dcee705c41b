"""Alembic environment: runs migrations on the registry's engine.

`pem init` passes its engine in ``config.attributes["engine"]``; the plain `alembic` command
builds one from PEM_DATABASE_URL / PEM_HOME like every other entry point.
"""

from contextlib import contextmanager
from typing import Iterator

from alembic import context
from sqlalchemy import Connection

from registry.config import Settings
from registry.db.engine import make_engine
from registry.db.models import Base
from registry.errors import DatabaseError

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Render the models' UTCDateTime as plain DateTime(timezone=True), so that migrations
    never import application code."""
    from registry.db.models import UTCDateTime

    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


@contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite alters a table by copying it and dropping the original; with foreign keys on,
    that DROP deletes (ON DELETE CASCADE) every tag, derivation, metadata event and Hub link
    of its rows, or fails (RESTRICT). SQLite's own procedure for schema changes: foreign keys
    off (a PRAGMA that only works outside a transaction), migrate, check every reference
    before committing, foreign keys on again."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.driver_connection  # no transaction is open on it yet
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")  # the pooled connection goes back as every other


def broken_references(connection: Connection) -> int:
    """Rows whose foreign key refers to no row (SQLite only; PostgreSQL always enforces)."""
    if connection.dialect.name != "sqlite":
        return 0
    return len(connection.exec_driver_sql("PRAGMA foreign_key_check").all())


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine(Settings.resolve().database_url)
    with engine.connect() as connection, sqlite_foreign_keys_off(connection), connection.begin():
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite alters tables by copying them
            compare_type=True,
            render_item=render_item,
        )
        before = broken_references(connection)
        context.run_migrations()
        after = broken_references(connection)
        if after > before:  # inside the transaction: raising rolls the whole upgrade back
            raise DatabaseError(
                f"the migration would leave {after - before} rows referring to missing rows; nothing was changed"
            )


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
