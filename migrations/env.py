"""Alembic environment: runs migrations on the registry's engine.

`pem init` passes its engine in ``config.attributes["engine"]``; the plain `alembic` command
builds one from PEM_DATABASE_URL / PEM_HOME like every other entry point.
"""

from alembic import context

from registry.config import Settings
from registry.db.engine import make_engine
from registry.db.models import Base

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Render the models' UTCDateTime as plain DateTime(timezone=True), so that migrations
    never import application code."""
    from registry.db.models import UTCDateTime

    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or make_engine(Settings.resolve().database_url)
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite alters tables by copying them
            compare_type=True,
            render_item=render_item,
        )
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
