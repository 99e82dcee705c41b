"""Migration 0005: module ids are never reused on SQLite (issue 14, item 1).

It rebuilds the modules table (AUTOINCREMENT cannot be added in place). With foreign keys on,
the rebuild's DROP TABLE would delete every tag, derivation, metadata event and Hub link of
its rows (ON DELETE CASCADE) or fail on the RESTRICT ones; so a registry of schema 0004 with
a row in every table is upgraded, and every row of every table must be there afterwards,
unchanged, on SQLite and PostgreSQL (where the migration changes nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from independent import make_numpy_lora as make_adapter
from sqlalchemy import inspect, text
from test_reliability_migrations import MODULES, NOW, insert_0001_rows

from registry.db import migrate
from registry.db.engine import SCHEMA_HEAD, current_revision, make_engine

BACKENDS = pytest.mark.parametrize("fresh_database_url", ["sqlite", "postgresql"], indirect=True)


def insert_0004_rows(engine) -> None:
    """Rows in the tables 0003 and 0004 added, referring to the 0001 rows (modules 1 to 4)."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO hub_links (id, module_id, direction, endpoint, repo_id, revision, \"commit\", weights_oid, "
            "created_at) VALUES (1, 1, 'pull', 'https://hub.test', 'org/a', 'main', :c, :w, :t), "
            "(2, 4, 'push', 'https://hub.test', 'org/mix', 'main', :c, :w, :t)"
        ), {"c": "c" * 40, "w": "w" * 40, "t": NOW})
        conn.execute(text(
            "INSERT INTO aliases (id, namespace, name, alias, module_id, updated_at) "
            "VALUES (1, 'team', 'a', 'prod', 2, :t)"
        ), {"t": NOW})
        conn.execute(text(
            "INSERT INTO alias_events (id, namespace, name, alias, from_version, to_version, at, \"by\") "
            "VALUES (1, 'team', 'a', 'prod', NULL, 1, :t, 'old-pem'), (2, 'team', 'a', 'prod', 1, 3, :t, 'old-pem')"
        ), {"t": NOW})
        conn.execute(text(
            "INSERT INTO metadata_events (id, module_id, field, old, new, at, \"by\") "
            "VALUES (1, 1, 'tag:stage', NULL, 'prod', :t, 'old-pem'), (2, 4, 'description', NULL, 'mix', :t, 'old-pem')"
        ), {"t": NOW})
        if engine.dialect.name == "postgresql":  # the rows above carry their ids: move the sequences on
            for table in ("modules", "hub_links", "aliases", "alias_events", "metadata_events"):
                conn.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))


def every_row(engine) -> dict[str, list[tuple]]:
    tables = sorted(set(inspect(engine).get_table_names()) - {"alembic_version"})
    with engine.connect() as conn:
        return {t: sorted((tuple(repr(v) for v in row) for row in conn.execute(text(f"SELECT * FROM {t}"))))
                for t in tables}


def rows_of_0004_tables(engine, before: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """Every row of the tables ``before`` has; the tables added since must be empty."""
    after = every_row(engine)
    assert all(after[t] == [] for t in set(after) - set(before))
    return {t: after[t] for t in before}


@BACKENDS
def test_upgrading_a_populated_0004_registry_keeps_every_row(fresh_database_url: str, tmp_path: Path) -> None:
    from registry import Registry

    engine = make_engine(fresh_database_url)
    try:
        migrate.upgrade(engine, "0001")
        insert_0001_rows(engine)
        migrate.upgrade(engine, "0004")
        insert_0004_rows(engine)
        before = every_row(engine)
        counts = {table: len(rows) for table, rows in before.items()}
        assert counts == {"aliases": 1, "alias_events": 2, "base_models": 0, "blobs": 3, "derivation_inputs": 2,
                          "derivations": 1, "hub_links": 2, "metadata_events": 2, "module_names": 3,
                          "modules": len(MODULES), "tags": 3}

        migrate.upgrade(engine, "0005")
        assert current_revision(engine) == "0005"
        assert every_row(engine) == before
        migrate.upgrade(engine)  # the later migrations only add tables
        assert current_revision(engine) == SCHEMA_HEAD
        assert rows_of_0004_tables(engine, before) == before
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # on again for later users
        with pytest.raises(Exception, match="(?i)foreign key"):  # still enforced after the upgrade
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO tags (module_id, key, value) VALUES (99, 'k', 'v')"))

        migrate.downgrade(engine, "0004")  # and back, and up again: the rows stay
        assert current_revision(engine) == "0004"
        assert every_row(engine) == before
        migrate.upgrade(engine)
        assert rows_of_0004_tables(engine, before) == before

        # The newest module (team/mix, id 4) removed, the next one gets 5, never 4 again.
        with Registry.open(tmp_path / "home", database_url=fresh_database_url, user="tester") as registry:
            registry.remove("team/mix@1")
            added = registry.add(make_adapter(tmp_path / "new", seed=9), "team/new")
        with engine.connect() as conn:
            new_id = conn.execute(text("SELECT id FROM modules WHERE name = 'new'")).scalar_one()
        assert (added.ref, new_id) == ("team/new@1", 5)
    finally:
        engine.dispose()
