"""The Alembic migrations and the ORM models describe the same schema, on SQLite and PostgreSQL.

`alembic check` is alembic.autogenerate.compare_metadata against the models: after upgrading an
empty database to head it must find nothing to do.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db import migrate
from registry.db.engine import SCHEMA_HEAD, current_revision, make_engine
from registry.db.models import Base, Blob, Derivation, DerivationInput, Module
from registry.errors import RegistryNotInitializedError

BACKENDS = pytest.mark.parametrize("fresh_database_url", ["sqlite", "postgresql"], indirect=True)
CATALOG_TABLES = {"blobs", "modules", "tags", "derivations", "derivation_inputs"}
MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"


def alembic_head() -> str:
    """The head read by Alembic straight from migrations/ (not through registry.db.migrate)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    heads = ScriptDirectory.from_config(config).get_heads()
    assert len(heads) == 1, f"the migrations have several heads: {heads}"
    return heads[0]


@pytest.fixture
def engine(fresh_database_url: str):
    engine = make_engine(fresh_database_url)
    yield engine
    engine.dispose()


def schema_differences(engine) -> list:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_schema_head_is_alembic_head():
    assert SCHEMA_HEAD == migrate.head_revision() == alembic_head()


@BACKENDS
def test_upgrade_from_empty_matches_the_models(engine):
    assert inspect(engine).get_table_names() == []
    assert current_revision(engine) is None
    migrate.upgrade(engine)
    assert current_revision(engine) == SCHEMA_HEAD
    assert CATALOG_TABLES <= set(Base.metadata.tables)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    assert schema_differences(engine) == []
    migrate.upgrade(engine)  # at head already: nothing to do, nothing broken
    assert current_revision(engine) == SCHEMA_HEAD


@BACKENDS
def test_downgrade_to_base_removes_every_table(engine):
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    assert inspect(engine).get_table_names() == ["alembic_version"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
    assert current_revision(engine) is None
    # and back up again, to the same schema
    migrate.upgrade(engine)
    assert current_revision(engine) == SCHEMA_HEAD
    assert schema_differences(engine) == []


@BACKENDS
def test_open_on_an_empty_database_says_run_pem_init(fresh_database_url, tmp_path: Path):
    from registry import Registry

    with pytest.raises(RegistryNotInitializedError) as exc:
        Registry.open(tmp_path / "home", database_url=fresh_database_url)
    assert "pem init" in str(exc.value)
    # once initialized, it opens
    Registry.init(tmp_path / "home", database_url=fresh_database_url).close()
    Registry.open(tmp_path / "home", database_url=fresh_database_url).close()


@BACKENDS
def test_open_after_downgrade_says_run_pem_init(engine, fresh_database_url, tmp_path: Path):
    from registry import Registry

    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    with pytest.raises(RegistryNotInitializedError):
        Registry.open(tmp_path / "home", database_url=fresh_database_url)


@BACKENDS
def test_an_input_of_a_derivation_cannot_be_deleted(engine):
    """The migration's ON DELETE RESTRICT holds on both backends (SQLite needs foreign_keys=ON)."""
    migrate.upgrade(engine)
    now = datetime.now(timezone.utc)

    def module(name: str) -> Module:
        return Module(
            namespace="team", name=name, version=1, kind="trained", digest="a" * 64, config_digest="c" * 64,
            peft_type="LORA", composable=True, unsupported=[], base_model="org/base", rank=4, lora_alpha=8.0,
            use_rslora=False, use_dora=False, target_modules=["q_proj"], layers={}, config={}, dtype="F32",
            num_parameters=10, size_bytes=100, owner="tester", created_at=now,
        )

    with Session(engine) as session, session.begin():
        session.add(Blob(digest="a" * 64, size_bytes=100, created_at=now))
        source, derived = module("source"), module("derived")
        session.add_all([source, derived])
        session.flush()
        session.add(Derivation(module_id=derived.id, expression="team/source", canonical="team/source@1",
                               method="linear", method_version=1, parameters={}, results={}, environment={},
                               identity="d" * 64, created_at=now))
        session.flush()
        session.add(DerivationInput(module_id=derived.id, position=0, input_id=source.id, input_digest="a" * 64,
                                    a=1.0, b=1.0))
        source_id = source.id

    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(delete(Module.__table__).where(Module.__table__.c.id == source_id))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM modules")).scalar() == 2
