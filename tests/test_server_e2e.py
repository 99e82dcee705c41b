"""Real ``pem serve`` processes on 127.0.0.1, driven by the real CLI (subprocesses) and the
Python API (issue 16): SQLite with a local store, and PostgreSQL with the moto S3 server.

What is compared with what: every remote answer against the local API (or the local CLI)
on the server's own database and store, opened directly by the test.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from independent import make_numpy_lora
from test_team_store import make_bucket, s3_server  # noqa: F401  (the session's moto server)

from registry import Registry
from registry.errors import AuthenticationError, PermissionDeniedError, ServerUnavailableError
from registry.remote import RemoteRegistry

ROOT = Path(__file__).resolve().parents[1]
STARTUP_BOUND_S = 120  # a bound on waiting for start-up, not a timing assertion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pem(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, with exactly ``env`` (plus PATH)."""
    result = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    if check and result.returncode != 0:
        raise AssertionError(f"pem {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


class Served:
    """A registry on disk (or PostgreSQL + bucket), its `pem serve` process and its tokens."""

    def __init__(self, root: Path, server_env: dict[str, str], replica_of: "Served | None" = None,
                 process_env: dict[str, str] | None = None):
        self.root = root
        self.server_env = server_env
        self.process_env = process_env or {}  # only for the `pem serve` process (PEM_FAULT)  # what the server's host has: the database and store settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"server-{self.port}.log"
        if replica_of is not None:  # another server on the same database and store
            self.token, self.token_id, self.admin_token = replica_of.token, replica_of.token_id, replica_of.admin_token
            self.process = None
            self.start()
            return
        pem("init", env=server_env)
        created = json.loads(pem("token", "create", "--user", "alice", "--role", "writer", "--json", env=server_env).stdout)
        self.token, self.token_id = created["token"], created["id"]
        self.admin_token = json.loads(pem("token", "create", "--user", "ada", "--role", "admin", "--json",
                                          env=server_env).stdout)["token"]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port)], cwd=ROOT, stdout=log, stderr=log,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **self.server_env, **self.process_env},
        )
        deadline = time.monotonic() + STARTUP_BOUND_S  # noqa: the bound of the wait, not an assertion
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"pem serve exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"pem serve did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def local(self) -> Registry:
        """The server's registry, opened directly (the reference every remote answer is held to)."""
        return Registry.open(self.server_env["PEM_HOME"], database_url=self.server_env.get("PEM_DATABASE_URL"),
                             store=self.server_env.get("PEM_STORE"))

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        return {"PEM_HOME": str(home), "PEM_REGISTRY_URL": self.url, "PEM_TOKEN": self.token, **extra}


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, tmp_path_factory, postgres, s3_server):  # noqa: F811
    root = tmp_path_factory.mktemp(f"served-{request.param}")
    # The server never talks to the Hub: pull and push go through the client's own Hub access.
    env = {"PEM_HOME": str(root / "server-home"), "PEM_USER": "server-os-user", "HF_ENDPOINT": "http://127.0.0.1:9"}
    saved = dict(os.environ)
    if request.param == "postgresql":
        env |= {"PEM_DATABASE_URL": postgres.url(postgres.create()), "PEM_S3_ENDPOINT_URL": s3_server, **AWS,
                "PEM_STORE": f"s3://{make_bucket(s3_server)}/blobs"}
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "PEM_S3"))})  # for .local()
    served = Served(root, env)
    yield served
    served.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [make_numpy_lora(tmp_path / f"adapter-{seed}", seed=seed) for seed in (11, 12)]


def test_remote_work_gives_what_the_local_api_gives(served: Served, adapters: list[Path], tmp_path: Path):
    client_home = tmp_path / "client"
    env = served.client_env(client_home)
    pem("add", adapters[0], "--name", "e2e/a", env=env)
    pem("add", adapters[1], "--name", "e2e/b", "--tag", "lang=en", env=env)
    composed = pem("compose", "0.5*e2e/a - 0.25*e2e/b", "--name", "e2e/mix", env=env)
    assert composed.stdout.startswith("composed e2e/mix@1  sha256:")

    remote = Registry.open(served.url, token=served.token)
    assert isinstance(remote, RemoteRegistry)
    with served.local() as local:
        # the server composed exactly what the local API composes from the same inputs
        again = local.compose("0.5*e2e/a - 0.25*e2e/b", "e2e/mix-local")
        assert remote.get("e2e/mix").digest == again.digest
        # the merge methods' parameters travel too (CLI options and API keywords)
        pem("compose", "0.5*e2e/a + 0.5*e2e/b", "--name", "e2e/dare", "--method", "dare_ties", "--density", "0.5",
            "--seed", "3", "--rank", "4", env=env)
        dare = local.compose("0.5*e2e/a + 0.5*e2e/b", "e2e/dare-local", method="dare_ties", density=0.5, seed=3, rank=4)
        assert remote.get("e2e/dare").digest == dare.digest
        assert remote.check("0.5*e2e/a + 0.5*e2e/b", method="ties", density=0.5) == local.check(
            "0.5*e2e/a + 0.5*e2e/b", method="ties", density=0.5)
        for ref in ("e2e/mix", "e2e/a"):
            assert remote.get(ref) == local.get(ref)
            assert remote.lineage(ref) == local.lineage(ref)
            assert remote.contents(ref) == local.contents(ref)
            assert remote.descendants(ref) == local.descendants(ref)
        assert remote.list() == local.list()
        assert remote.list(tags={"lang": "en"}) == local.list(tags={"lang": "en"})
        local.export("e2e/mix", tmp_path / "local-export")
    remote.export("e2e/mix", tmp_path / "remote-export")
    pem("export", "e2e/mix", tmp_path / "cli-export", env=env)
    for exported in ("remote-export", "cli-export"):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert filecmp.cmp(tmp_path / "local-export" / name, tmp_path / exported / name, shallow=False)

    # the same commands print the same, with and without --json, remote and local
    for args in (["--json", "lineage"], ["lineage"], ["contents", "--json"], ["contents"], ["show", "--json"],
                 ["descendants"]):
        target = "e2e/a" if args[-1] == "descendants" else "e2e/mix"
        command = [a for a in args if a != "--json"] + [target] + (["--json"] if "--json" in args else [])
        remote_out = pem(*command, env=env).stdout
        local_out = pem(*command, env=served.server_env).stdout
        assert remote_out == local_out, command
    assert pem("list", env=env).stdout == pem("list", env=served.server_env).stdout
    pem("alias", "set", "e2e/a", "prod", "1", env=env)
    assert pem("alias", "list", "--json", env=env).stdout == pem("alias", "list", "--json", env=served.server_env).stdout
    admin = {**env, "PEM_TOKEN": served.admin_token}
    for command in (["rm", "e2e/mix@1", "--dry-run"], ["rm", "e2e/mix-local@1", "--dry-run", "--json"]):
        assert pem(*command, env=admin).stdout == pem(*command, env=served.server_env).stdout
    assert remote.complete_reference("e2e/") == served.local().complete_reference("e2e/")
    refused = pem("export", "e2e/mix", tmp_path / "cli-export", env=env, check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr  # the same rule as a local export
    pem("export", "e2e/a", tmp_path / "cli-export", "--force", env=env)
    assert filecmp.cmp(adapters[0] / "adapter_config.json", tmp_path / "cli-export" / "adapter_config.json") is False
    assert (tmp_path / "cli-export" / "adapter_model.safetensors").read_bytes() != (
        tmp_path / "local-export" / "adapter_model.safetensors").read_bytes()  # replaced by e2e/a's weights

    # the client keeps no database: only its read cache
    files = [p.relative_to(client_home).as_posix() for p in client_home.rglob("*") if p.is_file()]
    assert files and all(f.startswith("cache/") for f in files), files  # blobs and the cache's lock file
    assert not any(f.endswith((".db", "-wal", "-journal")) for f in files)

    log = served.log_path.read_text()
    assert "user=alice method=POST route=/api/v1/compose status=200" in log
    assert "user=alice method=POST route=/api/v1/adapters status=200" in log
    assert "user=alice method=GET route=/api/v1/lineage status=200" in log


def test_the_owner_is_the_token_user_whatever_pem_user_says(served: Served, adapters: list[Path], tmp_path: Path):
    env = served.client_env(tmp_path / "client", PEM_USER="mallory")
    pem("add", adapters[0], "--name", "owner/a", env=env)
    pem("tag", "owner/a", "stage=dev", env=env)
    pem("alias", "set", "owner/a", "prod", "1", env=env)
    assert json.loads(pem("show", "owner/a", "--json", env=env).stdout)["owner"] == "alice"
    assert [c["by"] for c in json.loads(pem("history", "owner/a", "--json", env=env).stdout)] == ["alice"]
    assert [m["by"] for m in json.loads(pem("alias", "log", "owner/a", "--json", env=env).stdout)] == ["alice"]


def test_refusals_are_one_line(served: Served, adapters: list[Path], tmp_path: Path):
    env = served.client_env(tmp_path / "client")
    pem("add", adapters[0], "--name", "refuse/a", env=env)
    refused = pem("rm", "refuse/a@1", env=env, check=False)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr == ("error: alice may not remove modules in namespace refuse: it needs the admin role "
                              "(token: writer)\n")
    missing = pem("show", "refuse/nothing", env=env, check=False)
    assert missing.returncode != 0 and missing.stderr.startswith("error: no module named refuse/nothing")
    for host_side in (["init"], ["db", "current"], ["token", "list"]):
        result = pem(*host_side, env=env, check=False)
        assert result.returncode != 0
        assert result.stderr == (f"error: pem {host_side[0]} runs on the registry server's host, against its "
                                 "database: run it there, without --registry or PEM_REGISTRY_URL\n")
    no_token = pem("list", env={"PEM_HOME": str(tmp_path / "c2"), "PEM_REGISTRY_URL": served.url}, check=False)
    assert no_token.returncode != 0 and no_token.stderr.count("\n") == 1 and "needs a token" in no_token.stderr


def test_login_stores_the_token_for_the_user_only(served: Served, tmp_path: Path):
    home = tmp_path / "client"
    env = {"PEM_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "cli.main", "login", served.url], input=served.token + "\n",
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    assert result.returncode == 0, result.stderr
    assert "as alice (writer)" in result.stdout
    credentials = home / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert pem("--registry", served.url, "list", env=env).returncode == 0  # no PEM_TOKEN: the stored one
    wrong = subprocess.run([sys.executable, "-m", "cli.main", "login", served.url, "--token", "pem_wrong"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    assert wrong.returncode != 0 and "unknown token" in wrong.stderr
    assert json.loads(credentials.read_text()) == {served.url: served.token}  # a refused token is not stored


def test_revoked_and_expired_tokens_are_refused_and_no_token_is_stored(served: Served, tmp_path: Path):
    created = json.loads(pem("token", "create", "--user", "tmp", "--role", "reader", "--expires", "1", "--json",
                             env=served.server_env).stdout)
    env = {"PEM_HOME": str(tmp_path / "c"), "PEM_REGISTRY_URL": served.url, "PEM_TOKEN": created["token"]}
    assert pem("list", env=env).returncode == 0
    pem("token", "revoke", created["id"], env=served.server_env)
    listed = json.loads(pem("token", "list", "--json", env=served.server_env).stdout)
    assert [t["revoked_at"] is not None for t in listed if t["id"] == created["id"]] == [True]
    assert all("token" not in t and created["token"] not in json.dumps(t) for t in listed)
    refused = pem("list", env=env, check=False)
    assert refused.returncode != 0
    assert refused.stderr == f"error: token {created['id']} of tmp was revoked: ask the registry's admin for a new one\n"

    expiring = json.loads(pem("token", "create", "--user", "exp", "--role", "reader", "--expires", "0.00001",
                              "--json", env=served.server_env).stdout)  # less than a second
    time.sleep(1.5)
    expired = pem("list", env={**env, "PEM_TOKEN": expiring["token"]}, check=False)
    assert expired.returncode != 0 and "expired" in expired.stderr

    tokens = [served.token, served.admin_token, created["token"], expiring["token"]]
    log = served.log_path.read_bytes()
    assert not any(t.encode() in log for t in tokens)
    if "PEM_DATABASE_URL" not in served.server_env:  # SQLite: the database files themselves
        files = list(Path(served.server_env["PEM_HOME"]).glob("registry.db*"))
        assert files
        for path in files:
            content = path.read_bytes()
            assert not any(t.encode() in content for t in tokens), path


def test_eight_concurrent_remote_writers_get_eight_gapless_versions(served: Served, tmp_path: Path):
    folders = [make_numpy_lora(tmp_path / f"w{i}", seed=100 + i) for i in range(8)]
    results: dict[int, int] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        try:
            client = RemoteRegistry(served.url, token=served.token, home=tmp_path / f"home{i}")
            start.wait()
            results[i] = client.add(folders[i], "conc/one").version
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(results.values()) == list(range(1, 9))
    with served.local() as local:
        by_version = {m.version: m.digest for m in local.list() if m.name == "conc/one"}
    assert sorted(by_version) == list(range(1, 9))
    assert len(set(by_version.values())) == 8


def test_the_client_cache_is_checked_by_digest(served: Served, adapters: list[Path], tmp_path: Path):
    home = tmp_path / "client"
    remote = RemoteRegistry(served.url, token=served.token, home=home)
    info = remote.add(adapters[0], "cache/a")
    remote.export("cache/a", tmp_path / "first")
    cached = remote.cache.path(info.digest)
    os.chmod(cached, 0o644)
    cached.write_bytes(b"\0" * cached.stat().st_size)  # damaged on disk
    again = RemoteRegistry(served.url, token=served.token, home=home)
    again.export("cache/a", tmp_path / "second")
    assert filecmp.cmp(tmp_path / "first" / "adapter_model.safetensors",
                       tmp_path / "second" / "adapter_model.safetensors", shallow=False)
    assert cached.read_bytes() == (tmp_path / "first" / "adapter_model.safetensors").read_bytes()


def test_python_api_errors_and_version_check(served: Served, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    remote = Registry.open(served.url, token=served.token)
    with pytest.raises(PermissionDeniedError, match="admin role"):
        remote.gc(dry_run=True)
    with pytest.raises(AuthenticationError):
        Registry.open(served.url, token="pem_nope").list()
    monkeypatch.setattr("registry.remote.API_VERSION", 2)
    with pytest.raises(ServerUnavailableError, match="upgrade pem-registry on the server"):
        Registry.open(served.url, token=served.token)
    with pytest.raises(ServerUnavailableError, match="cannot reach"):
        Registry.open(f"http://127.0.0.1:{free_port()}", token="x")
    monkeypatch.setenv("PEM_REGISTRY_URL", served.url)
    monkeypatch.setenv("PEM_HOME", str(tmp_path / "h"))
    monkeypatch.setattr("registry.remote.API_VERSION", 1)
    assert isinstance(Registry.open(token=served.token), RemoteRegistry)
    shutil.rmtree(tmp_path / "h", ignore_errors=True)


def test_remote_commands_import_neither_torch_nor_the_server_stack(served: Served, tmp_path: Path):
    env = served.client_env(tmp_path / "client")
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "cli.main", "list", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
    assert result.returncode == 0, result.stderr[-2000:]
    modules = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")][1:]
    assert "registry.remote" in modules
    assert sorted({m for m in modules if m.split(".")[0] in ("torch", "transformers", "peft", "fastapi", "uvicorn")}) == []


def test_doctor_against_a_server(served: Served, tmp_path: Path):
    env = served.client_env(tmp_path / "client", HF_ENDPOINT=os.environ["HF_ENDPOINT"])
    checks = {c["name"]: c for c in json.loads(pem("doctor", "--json", env=env, check=False).stdout)}
    assert checks["server"]["ok"] and served.url in checks["server"]["detail"]
    assert checks["token"]["ok"] and checks["token"]["detail"] == "alice: writer"
    assert checks["cache"]["ok"]
    bad = {c["name"]: c for c in json.loads(pem("doctor", "--json", env={**env, "PEM_TOKEN": "pem_bad"},
                                                check=False).stdout)}
    assert not bad["token"]["ok"] and "unknown token" in bad["token"]["detail"]


def test_replicas_survive_a_sigkill_in_a_stream_of_writes(postgres, s3_server, tmp_path: Path,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch):
    """Two replicas on one PostgreSQL and bucket; clients spread over both, each listing both
    URLs. Replica 1 is SIGKILLed while the clients write: they carry on with replica 2, and
    nothing is lost or applied twice."""
    import signal

    env = {"PEM_HOME": str(tmp_path / "server-home"), "PEM_DATABASE_URL": postgres.url(postgres.create()),
           "PEM_S3_ENDPOINT_URL": s3_server, "PEM_STORE": f"s3://{make_bucket(s3_server)}/blobs", **AWS}
    first = Served(tmp_path, env)
    second = Served(tmp_path, env, replica_of=first)
    clients = 4
    folders = {(i, v): make_numpy_lora(tmp_path / f"c{i}v{v}", seed=1000 + 10 * i + v) for i in range(clients) for v in (1, 2, 3)}
    done = threading.Semaphore(0)
    failures: list[BaseException] = []

    def script(i: int) -> None:
        order = [first.url, second.url] if i % 2 == 0 else [second.url, first.url]
        remote = RemoteRegistry(",".join(order), token=first.token, home=tmp_path / f"home{i}")
        name = f"rep/c{i}"
        steps = [
            lambda: remote.add(folders[(i, 1)], name),
            lambda: remote.set_alias(name, "prod", 1),
            lambda: remote.tag(f"{name}@1", {"stage": "one"}),
            lambda: remote.add(folders[(i, 2)], name),
            lambda: remote.compose(f"0.5*{name}@1 + 0.5*{name}@2", f"rep/d{i}"),
            lambda: remote.set_alias(name, "prod", 2),
            lambda: remote.tag(f"{name}@1", {"stage": "two"}),
            lambda: remote.add(folders[(i, 3)], name),
            lambda: remote.set_alias(name, "prod", 3),
            lambda: remote.describe(f"{name}@3", "third"),
        ]
        try:
            for step in steps:
                step()
                done.release()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=script, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for _ in range(clients * 3):  # a third of the writes are done: kill replica 1 mid-stream
        done.acquire()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=60)
    for t in threads:
        t.join()
    second_log = second.log_path.read_text()
    second.stop()
    assert failures == []
    assert first.process is None or first.process.returncode == -signal.SIGKILL

    for key, value in env.items():
        if key.startswith(("AWS_", "PEM_S3")):
            monkeypatch.setenv(key, value)
    with Registry.open(env["PEM_HOME"], database_url=env["PEM_DATABASE_URL"], store=env["PEM_STORE"]) as local:
        for i in range(clients):
            versions = [m for m in local.list() if m.name == f"rep/c{i}"]
            assert [m.version for m in versions] == [1, 2, 3]  # nothing lost, nothing added twice
            assert len({m.digest for m in versions}) == 3
            assert [m.version for m in local.list() if m.name == f"rep/d{i}"] == [1]
            moves = [(m.from_version, m.to_version) for m in local.alias_log(f"rep/c{i}")]
            assert moves == [(None, 1), (1, 2), (2, 3)]  # each move once
            assert local.get(f"rep/c{i}@1").tags == {"stage": "two"}
            assert [(c.old, c.new) for c in local.history(f"rep/c{i}@1")] == [(None, "one"), ("one", "two")]
            assert local.get(f"rep/c{i}@3").description == "third"
        report = local.verify()
        assert report.ok, report.failures
    assert second_log.count("status=200") > 0


def test_pull_and_push_through_the_server_use_the_clients_hub_access(served: Served, hub, tmp_path: Path):
    import uuid

    folder = make_numpy_lora(tmp_path / "hub-adapter", seed=77)
    repo = f"srv-{uuid.uuid4().hex[:8]}/pulled"
    commit = hub.add_commit(repo, {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
                                   "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes()})
    remote = RemoteRegistry(served.url, token=served.token, home=tmp_path / "client")
    pulled = remote.pull(repo, name="hubby/pulled")
    assert pulled.created and pulled.kind == "pulled" and pulled.owner == "alice"
    assert remote.pull(repo, name="hubby/pulled").created is False  # the same commit again: the same version
    with Registry.init(tmp_path / "reference", user="alice") as reference:  # the local API's pull, for comparison
        expected = reference.pull(repo, name="hubby/pulled")
        expected_source = reference.get(expected.ref).source
    details = remote.get(pulled.ref)
    assert details.digest == expected.digest
    assert details.source["hub"] == expected_source["hub"]
    assert details.source["hub"]["commit"] == commit

    pushed_repo = f"srv-{uuid.uuid4().hex[:8]}/pushed"
    remote.compose("0.5*hubby/pulled", "hubby/half")
    result = remote.push("hubby/half", pushed_repo)
    assert result.commit == hub.head(pushed_repo) and result.ref == "hubby/half@1"
    files = hub.files(pushed_repo)
    remote.export("hubby/half", tmp_path / "half")
    assert files["adapter_model.safetensors"] == (tmp_path / "half" / "adapter_model.safetensors").read_bytes()
    sidecar = json.loads(files["pem-provenance.json"])
    assert sidecar["module"]["digest"] == remote.get("hubby/half").digest
    assert [i["hub"]["repo_id"] for i in sidecar["derivation"]["inputs"]] == [repo]  # the pulled input's origin
    with served.local() as local:
        assert remote.sync() == local.sync()  # the client asks the Hub itself, from the server's links
        statuses = {(s.ref, s.direction): s.status for s in local.sync(endpoint=hub.url)
                    if s.ref.startswith("hubby/")}
    assert statuses == {("hubby/pulled@1", "pull"): "up-to-date", ("hubby/half@1", "push"): "in-sync"}
    newer = make_numpy_lora(tmp_path / "hub-adapter-2", seed=78)
    head = hub.add_commit(repo, {"adapter_model.safetensors": (newer / "adapter_model.safetensors").read_bytes()})
    behind = [s for s in remote.sync(pull=True) if s.repo_id == repo]
    assert [(s.status, s.pulled, s.remote_commit) for s in behind] == [("behind", "hubby/pulled@2", head)]
    assert remote.get("hubby/pulled@2").source["hub"]["commit"] == head
    assert os.environ["HF_TOKEN"] not in served.log_path.read_text()


def test_a_write_whose_answer_was_lost_is_never_applied_twice(tmp_path: Path, adapters: list[Path]):
    """The server dies after committing a keyed write, before sending its answer: the key and
    the answer were committed with the write, so the retry on another replica gets that answer
    and applies nothing."""
    env = {"PEM_HOME": str(tmp_path / "server-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    dying = Served(tmp_path, env, process_env={"PEM_FAULT": "idempotent-applied"})
    healthy = Served(tmp_path, env, replica_of=dying)
    try:
        remote = RemoteRegistry(f"{dying.url},{healthy.url}", token=dying.token, home=tmp_path / "client")
        first = remote.add(adapters[0], "lost/a")
        remote.add(adapters[1], "lost/a")
        # The first keyed write: the server dies after its commit; the retry goes to the other
        # replica, which answers from the receipt. Applied twice, the rm would fail (no such version).
        admin = RemoteRegistry(f"{dying.url},{healthy.url}", token=dying.admin_token, home=tmp_path / "admin")
        removal = admin.remove("lost/a@1")
        assert (removal.ref, removal.digest, removal.dry_run, removal.blob_freed) == ("lost/a@1", first.digest, False, True)
        assert dying.process.wait(timeout=60) == -9
        assert [m.ref for m in remote.list() if m.name == "lost/a"] == ["lost/a@2"]
        remote.tag("lost/a@2", {"stage": "x"})  # the other replica carries on
        assert [(c.field, c.new) for c in remote.history("lost/a@2")] == [("tag:stage", "x")]
    finally:
        dying.stop()
        healthy.stop()
