"""The S3-compatible blob store (issue 11): ``PEM_STORE=s3://BUCKET/PREFIX`` with a local read cache.

A moto server (``moto.server.ThreadedMotoServer``) runs on 127.0.0.1 for the session; the
registry talks to it through the real, unpatched boto3 client, found by
``PEM_S3_ENDPOINT_URL`` and the usual ``AWS_*`` variables. Every test gets its own bucket
(versioned, so that "written once" can be counted). Catalog tests run on SQLite and
PostgreSQL; "two users" are two home folders (two caches) sharing the database and bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from independent import make_numpy_lora as make_adapter
from safetensors.numpy import load_file

from registry import Registry
from registry.errors import BlobStoreError, ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "team/blobs"
# Store behaviour the catalog backend does not change: SQLite only (each PostgreSQL catalog is a database to drop).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# --- the S3 server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server_class():
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class S3Server(ThreadedMotoServer):
        """moto's threaded server with two changes for these tests. ``stop()`` is an outage:
        it also closes the listening socket and every open connection (boto3 keeps pooled
        keep-alive connections, which werkzeug would otherwise go on serving). Writes are
        serialized: S3's conditional writes are atomic, while moto checks If-None-Match and
        then writes without a lock, so racing writers could both succeed."""

        def __init__(self, port: int):
            super().__init__("127.0.0.1", port, verbose=False)
            self.connections: set[socket.socket] = set()

        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)
            lock = threading.Lock()
            connections = self.connections

            def serialized(environ, start_response):
                if environ["REQUEST_METHOD"] in ("PUT", "POST", "DELETE"):
                    with lock:
                        return list(app(environ, start_response))
                return app(environ, start_response)

            class Handler(MotoRequestHandler):
                def setup(self) -> None:
                    super().setup()
                    connections.add(self.connection)

                def finish(self) -> None:
                    connections.discard(self.connection)
                    super().finish()

            self._server = make_server(self._ip_address, self._port, serialized, True, request_handler=Handler)
            self._server_ready_event.set()
            self._server.serve_forever()

        def stop(self) -> None:
            super().stop()
            self._server.server_close()
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return S3Server


def start_server(port: int):
    server = _moto_server_class()(port)
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = start_server(port)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "PEM_CACHE_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # outages fail in well under a second
    monkeypatch.setenv("PEM_S3_ENDPOINT_URL", endpoint)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def make_bucket(endpoint: str) -> str:
    name = f"pem-{uuid.uuid4().hex[:12]}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new versioned bucket; the environment points boto3 at the moto server."""
    _aws_env(monkeypatch, s3_server)
    monkeypatch.chdir(tmp_path)  # Registry.init mkdirs its store location: never in the repository
    return make_bucket(s3_server)


@pytest.fixture
def store_url(bucket: str) -> str:
    return f"s3://{bucket}/{PREFIX}"


def open_user(monkeypatch: pytest.MonkeyPatch, home: Path, database_url: str, store: str, *, init: bool = False,
              user: str = "tester") -> Registry:
    """A registry of one user: their own home (and so cache), the shared database and bucket."""
    monkeypatch.setenv("PEM_HOME", str(home))  # open_store finds the cache in the home folder
    opener = Registry.init if init else Registry.open
    return opener(home, database_url=database_url, store=store, user=user)


def objects(endpoint: str, bucket: str) -> dict[str, int]:
    """key -> number of versions written."""
    counts: dict[str, int] = {}
    for page in s3_client(endpoint).get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", ()):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def live_keys(endpoint: str, bucket: str) -> set[str]:
    client = s3_client(endpoint)
    return {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", ())}


def blob_key(digest: str) -> str:
    return f"{PREFIX}/sha256/{digest[:2]}/{digest[2:]}"


# --- adapters -------------------------------------------------------------------------------------


def assert_same_tensors(exported: Path, source: Path) -> None:
    got = load_file(str(exported / "adapter_model.safetensors"))
    want = load_file(str(source / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# --- configuration --------------------------------------------------------------------------------


def test_settings_accept_s3_and_parse_the_cache_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from registry.config import Settings, cache_size_limit
    from registry.store import open_store
    from registry.store.s3 import S3BlobStore

    assert Settings.resolve(tmp_path, store="s3://bucket/some/prefix/").store == "s3://bucket/some/prefix/"
    with pytest.raises(ConfigurationError, match="names no bucket"):
        Settings.resolve(tmp_path, store="s3:///prefix")
    with pytest.raises(ConfigurationError, match="gs"):
        Settings.resolve(tmp_path, store="gs://bucket")

    monkeypatch.delenv("PEM_CACHE_SIZE", raising=False)
    assert cache_size_limit() == 20 * 1000**3
    for text, size in (("10GB", 10 * 1000**3), ("1.5GiB", 1536 * 1024**2), ("500 mb", 500 * 1000**2), ("4096", 4096)):
        monkeypatch.setenv("PEM_CACHE_SIZE", text)
        assert cache_size_limit() == size
    monkeypatch.setenv("PEM_CACHE_SIZE", "lots")
    with pytest.raises(ConfigurationError, match="PEM_CACHE_SIZE='lots'"):
        cache_size_limit()

    monkeypatch.setenv("PEM_CACHE_SIZE", "1MB")
    monkeypatch.setenv("PEM_S3_ENDPOINT_URL", "http://minio.example:9000")
    store = open_store("s3://bucket/some/prefix/", home=tmp_path)
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.location) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    assert store.key("ab" + "c" * 62) == "some/prefix/sha256/ab/" + "c" * 62
    assert store.cache.root == tmp_path / "cache" and store.cache.limit == 10**6
    assert store.endpoint_url == "http://minio.example:9000"


def test_importing_the_store_does_not_import_boto3(tmp_path: Path) -> None:
    code = ("import sys; from registry import Registry; from registry.store import open_store; "
            "open_store('s3://bucket/prefix', home=sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 's3transfer')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- a team on one bucket --------------------------------------------------------------------------


def test_add_compose_export_verify_gc(monkeypatch, tmp_path, database_url, s3_server, bucket, store_url) -> None:
    reg = open_user(monkeypatch, tmp_path / "alice", database_url, store_url, init=True, user="alice")
    try:
        a_dir, b_dir = make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)
        a = reg.add(a_dir, "team/a")
        b = reg.add(b_dir, "team/b")
        assert reg.add(a_dir, "team/a").created is False
        mix = reg.compose("team/a - 0.5*team/b", "team/mix")
        assert {m.ref for m in reg.list()} == {"team/a@1", "team/b@1", "team/mix@1"}

        # every blob is one object under the prefix, written once; the writer's file is the cached copy
        assert objects(s3_server, bucket) == {blob_key(d): 1 for d in (a.digest, b.digest, mix.digest)}
        assert reg.store.cache_info().files == 3
        assert not list(reg.store.temporary_files())

        reg.export("team/a", tmp_path / "out-a")
        assert_same_tensors(tmp_path / "out-a", a_dir)
        reg.export("team/mix", tmp_path / "out-mix")
        mixed = load_file(str(tmp_path / "out-mix" / "adapter_model.safetensors"))
        assert mixed.keys() == load_file(str(a_dir / "adapter_model.safetensors")).keys()

        report = reg.verify()
        assert report.ok and report.checked == 3 and report.rederived == 1, report

        # gc deletes the unreferenced object only: not the referenced ones, not other keys
        client = s3_client(s3_server)
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/notes.txt", Body=b"not a blob")
        client.put_object(Bucket=bucket, Key="elsewhere/sha256/00/" + "0" * 62, Body=b"outside the prefix")
        orphan = hashlib.sha256(b"orphan").hexdigest()  # stored, its row never committed (a crashed writer)
        client.put_object(Bucket=bucket, Key=blob_key(orphan), Body=b"orphan")
        assert reg.gc(grace_seconds=3600).blobs == []  # young: maybe a writer in flight
        gc = reg.gc(grace_seconds=0)
        assert gc.blobs == [orphan] and gc.bytes_freed == len(b"orphan")
        assert live_keys(s3_server, bucket) == {
            blob_key(a.digest), blob_key(b.digest), blob_key(mix.digest), f"{PREFIX}/notes.txt",
            "elsewhere/sha256/00/" + "0" * 62,
        }
        assert reg.verify().ok

        # removing a module deletes its object and its cached copy
        reg.remove("team/mix@1")
        assert blob_key(mix.digest) not in live_keys(s3_server, bucket)
        assert not reg.store.cache.path(mix.digest).exists()
    finally:
        reg.close()


def test_two_users_share_modules(monkeypatch, tmp_path, database_url, s3_server, bucket, store_url) -> None:
    alice = open_user(monkeypatch, tmp_path / "alice", database_url, store_url, init=True, user="alice")
    bob = open_user(monkeypatch, tmp_path / "bob", database_url, store_url, user="bob")
    try:
        a_dir = make_adapter(tmp_path / "a", seed=1)
        b_dir = make_adapter(tmp_path / "b", seed=2)
        a = alice.add(a_dir, "alice/a")
        b = bob.add(b_dir, "bob/b")
        assert {(m.ref, m.owner) for m in bob.list()} == {("alice/a@1", "alice"), ("bob/b@1", "bob")}
        assert {m.ref for m in alice.list()} == {"alice/a@1", "bob/b@1"}

        assert not (tmp_path / "bob" / "cache" / "sha256" / a.digest[:2] / a.digest[2:]).exists()
        bob.export("alice/a", tmp_path / "bob-a")  # downloaded into bob's cache
        assert_same_tensors(tmp_path / "bob-a", a_dir)
        assert (tmp_path / "bob" / "cache" / "sha256" / a.digest[:2] / a.digest[2:]).is_file()

        both = bob.compose("alice/a + bob/b", "bob/both")
        alice.export("bob/both", tmp_path / "alice-both")  # alice downloads what bob composed
        assert {i.ref for i in alice.get("bob/both").provenance.inputs} == {"alice/a@1", "bob/b@1"}
        again = alice.compose("alice/a + bob/b", "bob/both")  # the same derivation: the same module
        assert again.created is False and again.digest == both.digest
        assert objects(s3_server, bucket)[blob_key(both.digest)] == 1
        assert alice.verify().ok and bob.verify().ok
        assert b.digest != a.digest
    finally:
        alice.close()
        bob.close()


WORKER = r"""
import json, os, sys, time
from pathlib import Path
from registry import Registry
spec = json.loads(sys.argv[1])
reg = Registry.open(spec["home"], database_url=spec["url"], store=spec["store"], user=spec["user"])
go = Path(spec["go"])
while not go.exists():
    time.sleep(0.002)
out = {}
for key, folder, name in spec["adds"]:
    info = reg.add(folder, name)
    out[key] = {"ref": info.ref, "digest": info.digest, "created": info.created}
reg.close()
print(json.dumps(out))
"""


def test_concurrent_writers_of_two_users(monkeypatch, tmp_path, database_url, s3_server, bucket, store_url) -> None:
    reg = open_user(monkeypatch, tmp_path / "admin", database_url, store_url, init=True)
    folders = {"common": make_adapter(tmp_path / "common", seed=10)}
    for i in range(2):
        folders[f"own{i}"] = make_adapter(tmp_path / f"own{i}", seed=20 + i)
    go = tmp_path / "go"
    procs = []
    for i, user in enumerate(("alice", "bob")):
        spec = {"home": str(tmp_path / user), "url": database_url, "store": store_url, "user": user, "go": str(go),
                "adds": [("common", str(folders["common"]), "team/common"),
                         ("own", str(folders[f"own{i}"]), "team/own"),
                         ("copy", str(folders["common"]), f"{user}/copy")]}
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PEM_HOME": spec["home"], "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(0.5)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    try:
        modules = {m.ref: m for m in reg.list()}
        assert set(modules) == {"team/common@1", "team/own@1", "team/own@2", "alice/copy@1", "bob/copy@1"}
        assert sum(r["common"]["created"] for r in results) == 1  # registered once
        assert {r["common"]["ref"] for r in results} == {"team/common@1"}
        assert {r["own"]["digest"] for r in results} == {modules["team/own@1"].digest, modules["team/own@2"].digest}
        digests = {m.digest for m in modules.values()}
        assert len(digests) == 3
        assert objects(s3_server, bucket) == {blob_key(d): 1 for d in digests}  # each object written once
        for user in ("alice", "bob"):
            assert not list((tmp_path / user / "cache" / "tmp").iterdir())
        assert reg.verify().ok
    finally:
        reg.close()


# --- failures ---------------------------------------------------------------------------------------


def test_the_server_stopped_before_an_add(monkeypatch, tmp_path, database_url) -> None:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = start_server(port)
    _aws_env(monkeypatch, endpoint)
    monkeypatch.chdir(tmp_path)
    name = make_bucket(endpoint)
    store = f"s3://{name}/{PREFIX}"
    reg = open_user(monkeypatch, tmp_path / "home", database_url, store, init=True)
    try:
        first = reg.add(make_adapter(tmp_path / "a", seed=1), "team/a")  # the pool holds live connections
        server.stop()
        started = time.monotonic()
        with pytest.raises(BlobStoreError) as caught:
            reg.add(make_adapter(tmp_path / "b", seed=2), "team/b")
        message = str(caught.value)
        assert "\n" not in message and endpoint in message and name in message and "running" in message
        assert time.monotonic() - started < 10
        assert [m.ref for m in reg.list()] == ["team/a@1"]  # nothing registered
        assert not list(reg.store.temporary_files())  # the writer's local file is gone

        server = start_server(port)  # moto keeps its state in the process
        gc = reg.gc(grace_seconds=0)
        assert gc.blobs == [] and gc.temporary_files == []
        assert live_keys(endpoint, name) == {blob_key(first.digest)}
        assert reg.verify().ok
    finally:
        reg.close()
        server.stop()


def test_the_server_stopped_in_the_middle_of_a_multipart_upload(monkeypatch, tmp_path) -> None:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    servers = [start_server(port)]
    _aws_env(monkeypatch, endpoint)
    monkeypatch.chdir(tmp_path)
    name = make_bucket(endpoint)
    reg = open_user(monkeypatch, tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}", f"s3://{name}/{PREFIX}",
                    init=True)
    try:
        reg.store.multipart_threshold = reg.store.part_size = 5 * 1024 * 1024  # S3's smallest part
        big = make_adapter(tmp_path / "big", seed=3, r=8, hidden=90_000)  # 11.5 MB: three parts

        parts = []

        def outage_after_first_part(**kwargs):
            parts.append(kwargs)
            if len(parts) == 1:
                servers[0].stop()

        reg.store.client.meta.events.register("after-call.s3.UploadPart", outage_after_first_part)
        with pytest.raises(BlobStoreError, match="cannot reach the S3 endpoint"):
            reg.add(big, "team/big")
        assert reg.list() == []
        assert not list(reg.store.temporary_files())

        servers[0] = start_server(port)
        assert live_keys(endpoint, name) == set()
        # the abort could not reach the server: the upload is left to a lifecycle rule
        uploads = s3_client(endpoint).list_multipart_uploads(Bucket=name).get("Uploads", [])
        assert len(uploads) == 1 and uploads[0]["Key"].startswith(f"{PREFIX}/sha256/")

        reg.store.client.meta.events.unregister("after-call.s3.UploadPart", outage_after_first_part)
        info = reg.add(big, "team/big")  # with the server back, the multipart upload completes
        head = s3_client(endpoint).head_object(Bucket=name, Key=blob_key(info.digest))
        assert head["ETag"].strip('"').endswith("-3")
        assert reg.verify().ok
    finally:
        reg.close()
        servers[0].stop()


@SQLITE_ONLY
def test_an_object_deleted_behind_the_registrys_back(monkeypatch, tmp_path, database_url, s3_server, bucket,
                                                     store_url) -> None:
    alice = open_user(monkeypatch, tmp_path / "alice", database_url, store_url, init=True)
    bob = open_user(monkeypatch, tmp_path / "bob", database_url, store_url)
    try:
        a = alice.add(make_adapter(tmp_path / "a", seed=1), "team/a")
        alice.add(make_adapter(tmp_path / "b", seed=2), "team/b")
        s3_client(s3_server).delete_object(Bucket=bucket, Key=blob_key(a.digest))

        for reg in (alice, bob):  # alice still has a cached copy; verify asks the bucket all the same
            report = reg.verify()
            assert not report.ok
            assert [(f.ref, f.problem) for f in report.failures] == [
                ("team/a@1", f"blob sha256:{a.digest[:12]} is missing from the store")
            ]
        with pytest.raises(BlobStoreError, match=f"sha256:{a.digest} is missing from {store_url}"):
            bob.export("team/a", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert not list(bob.store.temporary_files())
    finally:
        alice.close()
        bob.close()


def test_a_missing_bucket_an_unreachable_endpoint_and_denied_access(monkeypatch, tmp_path, s3_server, bucket) -> None:
    from moto import settings as moto_settings

    from registry.store import open_store

    home = tmp_path / "home"
    missing = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", home=home)
    for action in (missing.check, lambda: missing.exists("a" * 64), lambda: list(missing.digests())):
        with pytest.raises(BlobStoreError, match=r"the bucket 'no-such-bucket-\w+' does not exist at .*create it"):
            action()
    with pytest.raises(BlobStoreError, match="does not exist"):
        with missing.writer() as writer:
            writer.write(b"x")
            writer.commit()
    assert not list(missing.temporary_files())

    monkeypatch.setenv("PEM_S3_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    unreachable = open_store(f"s3://{bucket}/x", home=home)
    with pytest.raises(BlobStoreError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:\d+ for bucket {bucket}"):
        unreachable.check()
    with pytest.raises(BlobStoreError, match="cannot reach"):
        unreachable.local_path("a" * 64)

    monkeypatch.setenv("PEM_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    denied = open_store(f"s3://{bucket}/x", home=home)
    with pytest.raises(BlobStoreError) as caught:
        denied.exists("a" * 64)
    assert str(caught.value).startswith(f"access to s3://{bucket}/x at {s3_server} denied (403")  # HEAD: no body
    assert "check the credentials" in str(caught.value)


def test_a_corrupt_object_is_never_cached(monkeypatch, tmp_path, s3_server, bucket, store_url) -> None:
    reg = open_user(monkeypatch, tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}", store_url, init=True)
    try:
        a = reg.add(make_adapter(tmp_path / "a", seed=1), "team/a")
        s3_client(s3_server).put_object(Bucket=bucket, Key=blob_key(a.digest), Body=b"tampered with")
        reg.store.cache_clear()
        with pytest.raises(BlobStoreError, match=rf"sha256:{a.digest[:12]} in {store_url} is corrupt.*nothing was cached"):
            reg.export("team/a", tmp_path / "out")
        assert not reg.store.cache.path(a.digest).exists()
        assert not list(reg.store.temporary_files())
    finally:
        reg.close()


# --- the cache ----------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_cache_evicts_least_recently_used_first(monkeypatch, tmp_path, database_url, bucket, store_url) -> None:
    alice = open_user(monkeypatch, tmp_path / "alice", database_url, store_url, init=True)
    try:
        infos = [alice.add(make_adapter(tmp_path / f"m{i}", seed=i), f"team/m{i}") for i in range(4)]
    finally:
        alice.close()
    size = infos[0].size_bytes
    assert all(i.size_bytes == size for i in infos)
    monkeypatch.setenv("PEM_CACHE_SIZE", str(int(size * 2.5)))  # room for two blobs
    bob = open_user(monkeypatch, tmp_path / "bob", database_url, store_url)
    try:
        cache = bob.store.cache
        cache.protect_seconds = 0
        a, b, c, d = (i.digest for i in infos)
        for digest in (a, b, a):  # a is now more recently used than b
            bob.store.local_path(digest)
            time.sleep(0.01)
        bob.store.local_path(c)  # over the limit: b goes
        assert {p.digest for p in infos if cache.path(p.digest).exists()} == {a, c}
        info = bob.store.cache_info()
        assert (info.files, info.bytes, info.limit, info.location) == (2, 2 * size, int(size * 2.5),
                                                                        str(tmp_path / "bob" / "cache"))
        assert "2 files" in str(info)

        # a reader that has a file open keeps reading it when the file is evicted
        with open(bob.store.local_path(a), "rb") as held:
            time.sleep(0.01)
            bob.store.local_path(d)
            time.sleep(0.01)
            bob.store.local_path(c)  # c touched last: a goes, although it is open
            assert not cache.path(a).exists()
            assert len(held.read()) == size
        bob.export("team/m0", tmp_path / "out")  # downloaded again
        assert_same_tensors(tmp_path / "out", tmp_path / "m0")

        # files handed out within protect_seconds are not evicted (a process may be about to open them)
        cache.protect_seconds = 60
        for digest in (a, b, c, d):
            bob.store.local_path(digest)
        assert bob.store.cache_info().files == 4
        cleared = bob.store.cache_clear()
        assert (cleared.files, cleared.bytes) == (4, 4 * size)
        assert bob.store.cache_info().files == 0
    finally:
        bob.close()


@SQLITE_ONLY
def test_a_corrupted_cached_file_is_downloaded_again(monkeypatch, tmp_path, database_url, bucket, store_url) -> None:
    reg = open_user(monkeypatch, tmp_path / "home", database_url, store_url, init=True)
    try:
        a_dir = make_adapter(tmp_path / "a", seed=1)
        a = reg.add(a_dir, "team/a")
        cached = reg.store.cache.path(a.digest)
        assert cached.is_file() and not os.access(cached, os.W_OK) or os.geteuid() == 0
        os.chmod(cached, 0o644)
        with open(cached, "r+b") as f:  # a flipped byte in the cached copy
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        reg.export("team/a", tmp_path / "out")  # noticed, dropped and downloaded again
        assert_same_tensors(tmp_path / "out", a_dir)
        assert reg.verify().ok

        # the same in a new process (a fresh store): truncated this time
        os.chmod(cached, 0o644)
        with open(cached, "r+b") as f:
            f.truncate(10)
        fresh = open_user(monkeypatch, tmp_path / "home", database_url, store_url)
        try:
            path = fresh.store.local_path(a.digest)
            assert path == cached and path.stat().st_size == a.size_bytes
            assert fresh.verify().ok
        finally:
            fresh.close()
    finally:
        reg.close()


@SQLITE_ONLY
def test_a_corrupted_cached_input_is_noticed_while_composing_and_downloaded_again(
    monkeypatch, tmp_path, database_url, bucket, store_url
) -> None:
    """compose hashes a cached input while reading it (no separate check pass): a damaged
    cached copy is noticed there, dropped, and downloaded again (checked on the way); the
    composition is then computed from the intact object."""
    reg = open_user(monkeypatch, tmp_path / "home", database_url, store_url, init=True)
    try:
        a = reg.add(make_adapter(tmp_path / "a", seed=1), "team/a")
        reg.add(make_adapter(tmp_path / "b", seed=2), "team/b")
        cached = reg.store.cache.path(a.digest)
        os.chmod(cached, 0o644)
        with open(cached, "r+b") as f:  # a flipped byte in the cached copy, same size
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        fresh = open_user(monkeypatch, tmp_path / "home", database_url, store_url)  # has hashed nothing yet
        try:
            c = fresh.compose("team/a + team/b", "team/c")
            assert c.created
            assert hashlib.sha256(cached.read_bytes()).hexdigest() == a.digest  # downloaded again
            report = fresh.verify()  # re-derives team/c from the intact inputs: same digest
            assert report.ok and report.rederived == 1
        finally:
            fresh.close()
    finally:
        reg.close()


# --- the store on its own ---------------------------------------------------------------------------


def test_multipart_and_conditional_writes_never_overwrite(monkeypatch, tmp_path, s3_server, bucket, store_url) -> None:
    from registry.store import open_store

    store = open_store(store_url, home=tmp_path / "home")
    store.multipart_threshold = store.part_size = 5 * 1024 * 1024
    data = np.random.default_rng(0).bytes(11 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    with store.writer() as writer:
        writer.write(data)
        assert writer.commit() == digest
    client = s3_client(s3_server)
    head = client.head_object(Bucket=bucket, Key=blob_key(digest))
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    assert store.size(digest) == len(data)
    assert abs(store.modified_at(digest) - time.time()) < 60
    assert list(store.digests()) == [digest]

    # another writer stored the digest first: the conditional put / complete answers 412, which
    # is success, and the object keeps its one version
    path = tmp_path / "copy"
    path.write_bytes(data)
    store._put_multipart(path, digest)
    small = b"small blob"
    small_digest = hashlib.sha256(small).hexdigest()
    client.put_object(Bucket=bucket, Key=blob_key(small_digest), Body=small)
    path.write_bytes(small)
    store._put(path, small_digest)
    assert objects(s3_server, bucket) == {blob_key(digest): 1, blob_key(small_digest): 1}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # the losing upload was aborted

    # a writer that never commits leaves nothing behind; one that crashed leaves a temporary file
    with store.writer() as writer:
        writer.write(b"abandoned")
    assert not list(store.temporary_files())
    crashed = store.writer()
    crashed.write(b"crashed")
    assert [p.name.startswith("incoming-") for p, _ in store.temporary_files()] == [True]
    crashed.abort()
    assert sorted(store.digests()) == sorted([digest, small_digest])
    store.delete(small_digest)
    store.delete(small_digest)  # idempotent
    assert not store.exists(small_digest) and store.exists(digest)


def test_a_local_blob_larger_than_the_writeback_step_is_stored_whole(tmp_path: Path) -> None:
    """The local writer sends data to disk as it goes (every WRITEBACK_EVERY bytes): a blob
    written in uneven chunks across several such steps is stored byte for byte, under the
    sha256 of its bytes, computed here by hashlib."""
    from registry.store.local import LocalBlobStore, LocalBlobWriter

    data = os.urandom(2 * LocalBlobWriter.WRITEBACK_EVERY + 12_345)
    store = LocalBlobStore(tmp_path / "blobs")
    with store.writer() as writer:
        for start in range(0, len(data), 3_000_001):
            writer.write(memoryview(data)[start:start + 3_000_001])
        digest = writer.commit()
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.local_path(digest).read_bytes() == data
    assert list(store.temporary_files()) == []
