"""Fixtures shared by the suite.

Every test that touches a catalog runs twice: on SQLite (the embedded default) and on the
machine's PostgreSQL (the team deployment). For PostgreSQL the suite creates uniquely named
databases (a migrated template, then one copy per test) and drops them all at the end, so
runs never see each other's rows. PostgreSQL being down is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The Hub client reads these once, when first imported (peft and transformers import it):
# set them before anything else. HF_ENDPOINT is the suite's own Hub-compatible server (the
# `hub` fixture starts it on this port), so PEFT's loader reaches it too; no test ever
# reaches huggingface.co.
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="pem-test-hf-cache-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_ETAG_TIMEOUT"] = "2"
os.environ.setdefault("HF_TOKEN", "test-token")
for _var in ("PEM_HOME", "PEM_DATABASE_URL", "PEM_STORE", "PEM_USER", "PEM_REGISTRY_URL", "PEM_TOKEN"):
    os.environ.pop(_var, None)  # the developer's own registry never leaks into a test

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get("PEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def hub():
    """The suite's Hub-compatible server at $HF_ENDPOINT (tests use their own repo names)."""
    from hub_server import HubServer

    server = HubServer(port=HUB_PORT).start()
    yield server
    server.stop()


class PostgresDatabases:
    """Creates databases named pem_test_<run>_<n> and drops every one of them at the end."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:10]
        self.created: list[str] = []
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with self.admin.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # pragma: no cover - the machine's PostgreSQL is part of the suite
            pytest.exit(
                f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc.__class__.__name__}); start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                returncode=3,
            )

    def url(self, name: str) -> str:
        return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    def create(self, template: str | None = None) -> str:
        name = f"pem_test_{self.run}_{len(self.created)}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in reversed(self.created):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def migrated_templates(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One migrated empty catalog per backend, copied for each test (migrating is the slow part)."""
    from registry.db import migrate
    from registry.db.engine import make_engine

    sqlite_file = tmp_path_factory.mktemp("template") / "registry.db"
    pg_name = postgres.create()
    templates = {"sqlite": f"sqlite:///{sqlite_file}", "postgresql": postgres.url(pg_name)}
    for url in templates.values():
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
    return {"sqlite": str(sqlite_file), "postgresql": pg_name}


@pytest.fixture
def fresh_database_url(request: pytest.FixtureRequest, postgres: PostgresDatabases, tmp_path: Path) -> str:
    """An empty database (no schema) of the test's backend."""
    backend = request.param if hasattr(request, "param") else "sqlite"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return postgres.url(postgres.create())


@pytest.fixture(params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, postgres: PostgresDatabases, migrated_templates: dict[str, str], tmp_path: Path
) -> str:
    """A migrated, empty catalog of its own, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        target = tmp_path / "registry.db"
        shutil.copyfile(migrated_templates["sqlite"], target)
        return f"sqlite:///{target}"
    return postgres.url(postgres.create(template=migrated_templates["postgresql"]))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def registry(home: Path, database_url: str):
    from registry import Registry

    reg = Registry.open(home, database_url=database_url, user="tester")
    yield reg
    reg.close()


@pytest.fixture
def pem_env(monkeypatch: pytest.MonkeyPatch, home: Path, database_url: str) -> dict[str, str]:
    """Environment for CLI tests: the same catalog as the ``registry`` fixture."""
    env = {"PEM_HOME": str(home), "PEM_DATABASE_URL": database_url, "PEM_USER": "tester"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def run_pem(pem_env: dict[str, str]):
    """Run a pem command in-process with click's CliRunner; returns the Result."""
    from click.testing import CliRunner

    from cli.main import pem

    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(pem, [str(a) for a in args], catch_exceptions=False)

    return run
