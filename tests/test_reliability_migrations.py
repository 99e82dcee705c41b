"""Migrations with data in the tables (issue 8): a catalog written by the first schema (0001)
survives the upgrade to head (module_names filled with the highest version per name, the
next registration continues from it), the downgrade back to 0001 and, empty of tables, the
downgrade to base; on SQLite and PostgreSQL.

The rows are inserted with plain SQL against the 0001 schema (migrations/versions/0001_catalog.py),
the way an old pem would have left them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from sqlalchemy import inspect, text

from registry.db import migrate
from registry.db.engine import SCHEMA_HEAD, current_revision, make_engine

BACKENDS = pytest.mark.parametrize("fresh_database_url", ["sqlite", "postgresql"], indirect=True)
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64

BLOBS = [(D1, 100), (D2, 200), (D3, 300)]
# id, namespace, name, version, kind, digest; team/a has versions 1 and 3 (2 was removed)
MODULES = [
    (1, "team", "a", 1, "trained", D1),
    (2, "team", "a", 3, "trained", D2),
    (3, "team", "b", 1, "trained", D3),
    (4, "team", "mix", 1, "derived", D2),
]
TAGS = [(1, "lang", "en"), (1, "stage", "prod"), (4, "made-by", "compose")]
DERIVATION = (4, "team/a@1 + 0.5*team/b", "team/a@1 + 0.5*team/b@1", "module", 1)
INPUTS = [(4, 0, 1, D1, 1.0, 1.0), (4, 1, 3, D3, 0.5, 0.5)]


MODULE_COLUMNS = (
    "id, namespace, name, version, kind, digest, config_digest, peft_type, composable, unsupported, base_model, "
    "base_revision, task_type, task, rank, lora_alpha, use_rslora, use_dora, target_modules, layers, config, dtype, "
    "num_parameters, size_bytes, description, owner, source, created_at"
)
JSON_FIELDS = ("unsupported", "target_modules", "layers", "config", "source")


def _module_values(engine) -> str:
    """The VALUES clause of a 0001 modules row; JSON parameters cast on PostgreSQL."""
    def p(name: str) -> str:
        return f"CAST(:{name} AS JSON)" if engine.dialect.name == "postgresql" and name in JSON_FIELDS else f":{name}"

    return "VALUES (" + ", ".join(p(column.strip()) for column in MODULE_COLUMNS.split(",")) + ")"


def _module_row(module_id: int, namespace: str, name: str, version: int, kind: str, digest: str) -> dict:
    layers = {"layer.q_proj": {"params": {"lora_A": [4, 16], "lora_B": [16, 4]}, "rank": 4, "alpha": 8.0,
                               "scaling": 2.0}}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "tiny-org/tiny-llama"}
    return {
        "id": module_id, "namespace": namespace, "name": name, "version": version, "kind": kind, "digest": digest,
        "config_digest": f"{module_id:064d}", "peft_type": "LORA", "composable": True, "unsupported": "[]",
        "base_model": "tiny-org/tiny-llama", "base_revision": None, "task_type": "CAUSAL_LM", "task": "sentiment",
        "rank": 4, "lora_alpha": 8.0, "use_rslora": False, "use_dora": False,
        "target_modules": json.dumps(["q_proj", "v_proj"]), "layers": json.dumps(layers), "config": json.dumps(config),
        "dtype": "F32", "num_parameters": 256, "size_bytes": 1552, "description": f"module {module_id}",
        "owner": "old-pem", "source": json.dumps({"path": f"/old/{name}/{version}"}), "created_at": NOW,
    }


def insert_modules_and_tags(engine) -> None:
    """Blobs, modules and tags, as the 0001 schema holds them."""
    with engine.begin() as conn:
        for digest, size in BLOBS:
            conn.execute(text("INSERT INTO blobs (digest, size_bytes, created_at) VALUES (:d, :s, :t)"),
                         {"d": digest, "s": size, "t": NOW})
        for module in MODULES:
            conn.execute(text(f"INSERT INTO modules ({MODULE_COLUMNS}) {_module_values(engine)}"), _module_row(*module))
        for module_id, key, value in TAGS:
            conn.execute(text("INSERT INTO tags (module_id, key, value) VALUES (:m, :k, :v)"),
                         {"m": module_id, "k": key, "v": value})


def insert_0001_rows(engine) -> None:
    insert_modules_and_tags(engine)
    cast = "CAST(:{} AS JSON)" if engine.dialect.name == "postgresql" else ":{}"
    with engine.begin() as conn:
        module_id, expression, canonical, method, method_version = DERIVATION
        conn.execute(text(
            "INSERT INTO derivations (module_id, expression, canonical, method, method_version, parameters, results, "
            f"environment, identity, created_at) VALUES (:m, :e, :c, :method, :v, {cast.format('parameters')}, "
            f"{cast.format('results')}, {cast.format('environment')}, :identity, :t)"
        ), {"m": module_id, "e": expression, "c": canonical, "method": method, "v": method_version,
            "parameters": json.dumps({"rank": None}), "results": "{}", "environment": json.dumps({"torch": "2.x"}),
            "identity": "f" * 64, "t": NOW})
        for row in INPUTS:
            conn.execute(text(
                "INSERT INTO derivation_inputs (module_id, position, input_id, input_digest, a, b) "
                "VALUES (:m, :p, :i, :d, :a, :b)"
            ), dict(zip("mpidab", row)))


def assert_0001_rows(engine) -> None:
    with engine.connect() as conn:
        blobs = sorted(tuple(r) for r in conn.execute(text("SELECT digest, size_bytes FROM blobs")))
        assert [b for b in blobs if b[0] in {D1, D2, D3}] == sorted(BLOBS)
        modules = sorted(tuple(r) for r in conn.execute(
            text("SELECT id, namespace, name, version, kind, digest FROM modules WHERE owner = 'old-pem'")))
        assert modules == MODULES
        rows = conn.execute(text(
            "SELECT id, composable, use_rslora, target_modules, layers, config, source, description, created_at "
            "FROM modules WHERE owner = 'old-pem' ORDER BY id")).all()
        for row in rows:
            target_modules, layers, config, source = (json.loads(v) if isinstance(v, str) else v for v in row[3:7])
            assert bool(row.composable) is True and bool(row.use_rslora) is False
            assert target_modules == ["q_proj", "v_proj"] and config["r"] == 4
            assert layers["layer.q_proj"]["rank"] == 4 and source["path"].startswith("/old/")
            assert row.description == f"module {row.id}"
        tags = sorted(tuple(r) for r in conn.execute(text("SELECT module_id, key, value FROM tags")))
        assert [t for t in tags if t[0] <= 4] == sorted(TAGS)
        derivation = conn.execute(text(
            "SELECT module_id, expression, canonical, method, method_version FROM derivations "
            "WHERE module_id = 4")).one()
        assert tuple(derivation) == DERIVATION
        inputs = sorted(tuple(r) for r in conn.execute(text(
            "SELECT module_id, position, input_id, input_digest, a, b FROM derivation_inputs WHERE module_id = 4")))
        assert inputs == INPUTS


def make_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{layer}.lora_A.weight": (rng.standard_normal((4, 16)) * 0.3).astype(np.float32),
               f"{layer}.lora_B.weight": (rng.standard_normal((16, 4)) * 0.3).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "base_model_name_or_path": "tiny-org/tiny-llama"}))
    return folder


@BACKENDS
def test_a_catalog_with_data_survives_upgrade_and_downgrade(fresh_database_url: str, tmp_path: Path) -> None:
    from registry import Registry

    engine = make_engine(fresh_database_url)
    try:
        migrate.upgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        insert_0001_rows(engine)
        assert_0001_rows(engine)

        migrate.upgrade(engine)
        assert current_revision(engine) == SCHEMA_HEAD
        assert_0001_rows(engine)
        with engine.connect() as conn:
            counters = {f"{ns}/{n}": v for ns, n, v in conn.execute(
                text("SELECT namespace, name, last_version FROM module_names"))}
        assert counters == {"team/a": 3, "team/b": 1, "team/mix": 1}

        # the upgraded catalog reads through the API, and numbering continues after 3
        registry = Registry.open(tmp_path / "home", database_url=fresh_database_url, user="tester")
        try:
            assert [m.ref for m in registry.list()] == ["team/a@1", "team/a@3", "team/b@1", "team/mix@1"]
            assert registry.get("team/a@1").tags == {"lang": "en", "stage": "prod"}
            provenance = registry.get("team/mix").provenance
            assert provenance is not None and [i.ref for i in provenance.inputs] == ["team/a@1", "team/b@1"]
            assert {n.ref for n in registry.lineage("team/mix").nodes} == {"team/mix@1", "team/a@1", "team/b@1"}
            added = registry.add(make_adapter(tmp_path / "new", seed=9), "team/a")
            assert added.version == 4
            registry.add(make_adapter(tmp_path / "other", seed=10), "team/new")
        finally:
            registry.close()

        migrate.downgrade(engine, "0001")
        assert current_revision(engine) == "0001"
        assert_0001_rows(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT namespace, name, version FROM modules"))
            refs = sorted(f"{ns}/{n}@{v}" for ns, n, v in rows)
        assert refs == ["team/a@1", "team/a@3", "team/a@4", "team/b@1", "team/mix@1", "team/new@1"]
        assert set(inspect(engine).get_table_names()) == {
            "alembic_version", "blobs", "modules", "tags", "derivations", "derivation_inputs"}

        # up again over the same rows: the counters are rebuilt from what is there
        migrate.upgrade(engine)
        with engine.connect() as conn:
            counters = {f"{ns}/{n}": v for ns, n, v in conn.execute(
                text("SELECT namespace, name, last_version FROM module_names"))}
        assert counters == {"team/a": 4, "team/b": 1, "team/mix": 1, "team/new": 1}
        assert_0001_rows(engine)

        migrate.downgrade(engine, "base")
        assert current_revision(engine) is None
        assert inspect(engine).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()


@BACKENDS
def test_upgrading_a_catalog_without_derivations_keeps_every_tag_and_hub_link(fresh_database_url: str) -> None:
    """Rows that reference modules with ON DELETE CASCADE (tags, hub links) must not vanish
    when a migration rebuilds the modules table (SQLite's batch mode copies and drops it)."""
    engine = make_engine(fresh_database_url)
    try:
        migrate.upgrade(engine, "0003")
        insert_modules_and_tags(engine)  # a catalog of the previous schema: modules, tags, a hub link
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO hub_links (id, module_id, direction, endpoint, repo_id, revision, \"commit\", "
                "weights_oid, created_at) VALUES (1, 1, 'pull', 'https://hub.test', 'org/a', 'main', :c, :w, :t)"
            ), {"c": "c" * 40, "w": "w" * 40, "t": NOW})
        migrate.upgrade(engine)
        with engine.connect() as conn:
            tags = sorted(tuple(r) for r in conn.execute(text("SELECT module_id, key, value FROM tags")))
            links = conn.execute(text("SELECT module_id, repo_id FROM hub_links")).all()
            modules = conn.execute(text("SELECT count(*) FROM modules")).scalar()
        assert modules == len(MODULES)
        assert tags == sorted(TAGS), "tags were lost by the upgrade"
        assert [tuple(r) for r in links] == [(1, "org/a")], "hub links were lost by the upgrade"
    finally:
        engine.dispose()

