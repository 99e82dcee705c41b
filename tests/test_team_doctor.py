"""``pem doctor`` (issue 11): database, blob store and Hub endpoint, each with the fix.

* A healthy registry: every check ok, exit 0; ``--json`` is a list of {name, ok, detail, fix}.
* No registry at the home: the database check fails with ``run `pem init```, exit 1, and
  doctor creates nothing (the home folder does not appear).
* An outdated schema: ``run `pem db upgrade```; after the upgrade doctor is happy again.
* An unreachable Hub is a warning (WARN, status "warn") with a fix, and the exit code stays 0
  when everything else is fine (only pull, push and sync need the Hub); any FAIL exits 1.

The Hub is the suite's own server (the ``hub`` fixture, at $HF_ENDPOINT).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect

from cli.main import pem
from registry import Registry
from registry.db import migrate
from registry.db.engine import SCHEMA_HEAD, make_engine

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there
CHECK_KEYS = {"name", "ok", "detail", "fix", "status"}


def invoke(*args: str):
    return CliRunner().invoke(pem, [str(a) for a in args], catch_exceptions=False)


def doctor_json(result, exit_code: int) -> dict[str, dict]:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    checks = json.loads(result.stdout)
    assert isinstance(checks, list)
    for check in checks:
        assert set(check) == CHECK_KEYS, check
        assert isinstance(check["ok"], bool) and isinstance(check["detail"], str) and check["detail"]
        assert (check["fix"] is None) == check["ok"], check  # a failing check always says what to do
        assert check["status"] == ("ok" if check["ok"] else "warn" if check["name"] == "hub" else "fail"), check
    by_name = {c["name"]: c for c in checks}
    assert len(by_name) == len(checks)
    return by_name


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("PEM_HOME", "PEM_DATABASE_URL", "PEM_STORE", "PEM_USER"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def initialized(home: Path, database_url: str, pem_env: dict[str, str]) -> Path:
    """A registry created by `pem init` at ``home`` (store folder included), on both backends."""
    Registry.init(home, database_url=database_url).close()
    return home


# --- healthy --------------------------------------------------------------------------------------


def test_doctor_on_a_healthy_registry(run_pem, initialized, hub):
    checks = doctor_json(run_pem("doctor", "--json"), 0)
    assert list(checks) == ["database", "lineage", "store", "hub"]  # a local store has no cache to check
    assert all(c["ok"] and c["fix"] is None for c in checks.values()), checks
    assert SCHEMA_HEAD in checks["database"]["detail"]
    assert hub.url.rstrip("/") in checks["hub"]["detail"]

    table = run_pem("doctor")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "database"], ["ok", "lineage"], ["ok", "store"], ["ok", "hub"]]
    assert "->" not in table.stdout

    api = Registry.doctor(initialized)
    assert [(c.name, c.ok) for c in api] == [("database", True), ("lineage", True), ("store", True), ("hub", True)]
    # Checking that the store is writable leaves nothing behind.
    assert list((initialized / "blobs" / "tmp").glob("*")) == []


# --- no registry ----------------------------------------------------------------------------------


def test_doctor_without_a_registry_creates_nothing(clean_env, tmp_path, hub):
    target = tmp_path / "no-registry-here"

    checks = doctor_json(invoke("doctor", "--home", target, "--json"), 1)
    assert not checks["database"]["ok"]
    assert checks["database"]["fix"] == "run `pem init`"
    assert str(target) in checks["database"]["detail"]
    assert not checks["store"]["ok"] and "pem init" in checks["store"]["fix"]
    assert checks["hub"]["ok"]
    assert not target.exists()

    table = invoke("doctor", "--home", target)
    assert table.exit_code == 1
    first = table.stdout.splitlines()[0]
    assert first.split()[:2] == ["FAIL", "database"] and first.endswith("-> run `pem init`"), first
    assert not target.exists()

    # Through PEM_HOME, and through the API: the same, and still nothing created.
    clean_env.setenv("PEM_HOME", str(target))
    assert not doctor_json(invoke("doctor", "--json"), 1)["database"]["ok"]
    api = {c.name: c for c in Registry.doctor(target)}
    assert (api["database"].ok, api["database"].fix) == (False, "run `pem init`")
    assert not target.exists()
    assert tree(tmp_path) == []


def test_doctor_on_an_existing_empty_home(clean_env, tmp_path, hub):
    """A home folder that exists but holds no registry: nothing is created inside it either."""
    target = tmp_path / "empty-home"
    target.mkdir()
    checks = doctor_json(invoke("doctor", "--home", target, "--json"), 1)
    assert (checks["database"]["ok"], checks["database"]["fix"]) == (False, "run `pem init`")
    assert tree(target) == []


@pytest.mark.parametrize("fresh_database_url", ["postgresql"], indirect=True)
def test_doctor_on_a_database_without_schema(clean_env, fresh_database_url, tmp_path, hub):
    clean_env.setenv("PEM_DATABASE_URL", fresh_database_url)
    checks = doctor_json(invoke("doctor", "--home", tmp_path / "home", "--json"), 1)
    assert not checks["database"]["ok"]
    assert "no registry schema" in checks["database"]["detail"]
    assert checks["database"]["fix"] == "run `pem init`"
    engine = make_engine(fresh_database_url)
    try:
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == []  # doctor only looked
    finally:
        engine.dispose()


def test_doctor_on_an_unreachable_database(clean_env, tmp_path, hub):
    clean_env.setenv("PEM_DATABASE_URL", "postgresql+psycopg://postgres:secret@127.0.0.1:9/nothing")
    checks = doctor_json(invoke("doctor", "--home", tmp_path / "home", "--json"), 1)
    assert not checks["database"]["ok"]
    assert "PEM_DATABASE_URL" in checks["database"]["fix"]
    assert "secret" not in json.dumps(checks)  # the password is never printed


# --- outdated schema ------------------------------------------------------------------------------


def test_doctor_on_an_outdated_schema(run_pem, initialized, database_url, hub):
    engine = make_engine(database_url)
    try:
        migrate.downgrade(engine, "0003")
    finally:
        engine.dispose()

    checks = doctor_json(run_pem("doctor", "--json"), 1)
    database = checks["database"]
    assert not database["ok"]
    assert database["fix"] == "run `pem db upgrade`"
    assert "0003" in database["detail"] and SCHEMA_HEAD in database["detail"]
    assert checks["store"]["ok"] and checks["hub"]["ok"]
    table = run_pem("doctor")
    assert table.exit_code == 1 and "-> run `pem db upgrade`" in table.stdout

    # The fix it names works.
    upgraded = run_pem("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert all(c["ok"] for c in doctor_json(run_pem("doctor", "--json"), 0).values())


# --- the Hub is optional --------------------------------------------------------------------------


def test_doctor_with_an_unreachable_hub_still_exits_0(run_pem, initialized, hub, monkeypatch):
    checks = doctor_json(run_pem("doctor", "--endpoint", UNREACHABLE, "--json"), 0)
    assert checks["database"]["ok"] and checks["store"]["ok"]
    assert not checks["hub"]["ok"]
    assert UNREACHABLE in checks["hub"]["detail"] and "only pull, push and sync" in checks["hub"]["detail"]
    assert checks["hub"]["fix"] and "HF_ENDPOINT" in checks["hub"]["fix"]

    table = run_pem("doctor", "--endpoint", UNREACHABLE)
    assert table.exit_code == 0, table.output
    hub_line = next(line for line in table.stdout.splitlines() if line.split()[1:2] == ["hub"])
    assert hub_line.startswith("WARN") and "->" in hub_line and "only pull, push and sync" in hub_line
    assert "FAIL" not in table.stdout

    # HF_ENDPOINT is what doctor checks by default; --endpoint wins over it.
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    assert not doctor_json(run_pem("doctor", "--json"), 0)["hub"]["ok"]
    assert doctor_json(run_pem("doctor", "--endpoint", hub.url, "--json"), 0)["hub"]["ok"]
    assert not {c.name: c for c in Registry.doctor(initialized)}["hub"].ok


def test_unreachable_hub_and_no_registry_exits_1(clean_env, tmp_path):
    target = tmp_path / "nothing"
    checks = doctor_json(invoke("doctor", "--home", target, "--endpoint", UNREACHABLE, "--json"), 1)
    assert not checks["database"]["ok"] and not checks["hub"]["ok"]
    assert not target.exists()


def test_doctor_with_a_missing_store(run_pem, initialized, hub):
    shutil.rmtree(initialized / "blobs")
    checks = doctor_json(run_pem("doctor", "--json"), 1)
    assert checks["database"]["ok"]
    assert not checks["store"]["ok"] and checks["store"]["fix"] == "run `pem init`"
    assert not (initialized / "blobs").exists()


def test_doctor_with_a_file_where_the_store_folder_should_be(run_pem, initialized, hub):
    shutil.rmtree(initialized / "blobs")
    (initialized / "blobs").write_bytes(b"not a folder")
    checks = doctor_json(run_pem("doctor", "--json"), 1)
    assert not checks["store"]["ok"]
    assert checks["store"]["detail"] == f"{initialized / 'blobs'} exists but is not a folder"
    assert "does not exist" not in checks["store"]["detail"] and "PEM_STORE" in checks["store"]["fix"]
    assert (initialized / "blobs").read_bytes() == b"not a folder"
