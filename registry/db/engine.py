"""Engines and sessions, and the check that the schema is the one this code expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry.errors import ConfigurationError, DatabaseError, RegistryNotInitializedError, SchemaOutdatedError

# The newest migration in migrations/versions. A test checks it against Alembic's head, so
# the two move together; keeping it here lets every command check the schema without
# importing Alembic (a third of a second of start-up).
SCHEMA_HEAD = "0007"  # web sessions (0007) on the server's tokens (0006)

SQLITE_BUSY_TIMEOUT_S = 30


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` as PostgreSQL through psycopg 3, the driver we ship."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(f"invalid database URL {url!r}: use e.g. sqlite:///path/registry.db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def sqlite_file_missing(url: str) -> str | None:
    """The path of a SQLite database file that does not exist yet, else None."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return None if Path(parsed.database).exists() else parsed.database
    return None


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


# Write transactions on SQLite start with BEGIN IMMEDIATE: the write lock is taken up front
# (waiting up to the busy timeout), instead of a read transaction failing at once with
# "database is locked" when it tries to upgrade while another process writes.
WRITE = {"pem_write": True}


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("pem_write") else "BEGIN")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_begin, not the driver
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # SQLite ignores foreign keys unless asked
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None when it has no registry schema."""
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError as exc:
        raise DatabaseError(f"cannot reach the database {engine.url.render_as_string()}: {first_line(exc)}") from None


def require_current_schema(engine: Engine) -> None:
    revision = current_revision(engine)
    if revision is None:
        raise RegistryNotInitializedError(
            f"no registry in {engine.url.render_as_string()}: run `pem init` to create it"
        )
    if revision != SCHEMA_HEAD:
        raise SchemaOutdatedError(
            f"the database schema is at revision {revision}, this pem needs {SCHEMA_HEAD}: run `pem db upgrade`"
        )


def first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__
