"""Bad input over HTTP, idempotency keys, request ids and the access log of the registry
server (issue 16), in-process with an ASGI test client.

Every refusal is a 4xx with ``{"error": {"type", "message", "request_id"}}`` and writes
nothing: no module row, no blob, no leftover upload file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import pytest
from independent import make_numpy_lora

from registry import Registry
from registry.server.app import ServerOptions, create_app
from registry.server.tokens import create_token

MAX_BODY = 4000
MAX_UPLOAD = 50_000


@pytest.fixture
def server(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch):
    from fastapi.testclient import TestClient

    uploads = tmp_path / "tmp"
    uploads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(uploads))  # where the server stages uploads
    registry = Registry.open(tmp_path / "home", database_url=database_url, user="server-os-user")
    token = create_token(registry, "bob", "writer").token
    admin = create_token(registry, "ada", "admin").token
    client = TestClient(create_app(registry, ServerOptions(max_body=MAX_BODY, max_upload=MAX_UPLOAD)))
    client.headers["Authorization"] = f"Bearer {token}"
    folder = make_numpy_lora(tmp_path / "adapter", seed=3)
    yield type("Server", (), dict(client=client, registry=registry, token=token, admin=admin, folder=folder,
                                  uploads=uploads))
    registry.close()


def upload_body(folder: Path, name: str, **overrides) -> bytes:
    weights = (folder / "adapter_model.safetensors").read_bytes()
    metadata = {"name": name, "config": json.loads((folder / "adapter_config.json").read_text()),
                "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_size": len(weights), **overrides}
    return json.dumps(metadata).encode() + b"\n" + overrides.pop("_weights", weights)


def assert_error(response, status: int, error_type: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert "\n" not in error["message"] and "Traceback" not in response.text
    for word in words:
        assert word in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def assert_nothing_written(server) -> None:
    assert server.registry.list() == []
    assert list(server.registry.store.digests()) == []
    assert list(server.uploads.iterdir()) == []  # no staged upload left behind


def test_junk_json_unknown_fields_and_missing_fields_are_refused(server):
    c = server.client
    assert_error(c.post("/api/v1/compose", content=b"{not json", headers={"Content-Type": "application/json"}),
                 422, "InvalidRequestError", "not valid JSON")
    assert_error(c.post("/api/v1/compose", json={"expression": "a/b", "name": "a/c", "owner": "mallory"}),
                 422, "InvalidRequestError", "unknown field 'owner'")
    assert_error(c.post("/api/v1/compose", json={"expression": "a/b"}), 422, "InvalidRequestError", "missing field 'name'")
    assert_error(c.post("/api/v1/compose", json=["a/b"]), 422, "InvalidRequestError")
    assert_error(c.post("/api/v1/adapters", content=b"no metadata line"), 422, "InvalidRequestError", "line of JSON")
    assert_error(c.post("/api/v1/adapters", content=b'{"name": "a/b", "junk": 1}\n'), 422, "InvalidRequestError")
    assert_nothing_written(server)


def test_json_bodies_over_the_limit_are_refused(server):
    big = {"ref": "team/x", "description": "x" * (MAX_BODY + 10)}
    assert_error(server.client.post("/api/v1/describe", json=big), 413, "RequestTooLargeError", str(MAX_BODY))

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(10):
            yield b" " * 1000

    assert_error(server.client.post("/api/v1/describe", content=chunks(), headers={"Content-Type": "application/json"}),
                 413, "RequestTooLargeError")
    assert_nothing_written(server)


def test_uploads_over_the_maximum_size_are_refused_while_streaming(server):
    weights = b"\0" * (MAX_UPLOAD + 1)
    declared_small = upload_body(server.folder, "team/big", weights_size=100, weights_sha256="0" * 64)
    body = declared_small.split(b"\n", 1)[0] + b"\n" + weights
    assert_error(server.client.post("/api/v1/adapters", content=body), 413, "RequestTooLargeError", str(MAX_UPLOAD))
    honest = upload_body(server.folder, "team/big", weights_size=MAX_UPLOAD + 1)
    assert_error(server.client.post("/api/v1/adapters", content=honest), 413, "RequestTooLargeError")
    assert_nothing_written(server)


def test_an_upload_that_does_not_match_its_digest_is_refused(server):
    weights = (server.folder / "adapter_model.safetensors").read_bytes()
    body = upload_body(server.folder, "team/x").split(b"\n", 1)[0] + b"\n" + weights[:-1] + b"\x01"
    assert_error(server.client.post("/api/v1/adapters", content=body), 422, "InvalidRequestError",
                 "declared", "nothing was registered")
    short = upload_body(server.folder, "team/x").split(b"\n", 1)[0] + b"\n" + weights[:-10]
    assert_error(server.client.post("/api/v1/adapters", content=short), 422, "InvalidRequestError", "stopped after")
    assert_nothing_written(server)
    assert server.client.post("/api/v1/adapters", content=upload_body(server.folder, "team/x")).status_code == 200


@pytest.mark.parametrize("name", ["../etc", "team/../../etc", "/etc/passwd", "team/x/../y", "team\\x", "team/.x"])
def test_path_tricks_in_names_are_refused(server, name: str):
    response = server.client.post("/api/v1/adapters", content=upload_body(server.folder, name))
    assert_error(response, 400, "InvalidNameError")
    assert_error(server.client.post("/api/v1/compose", json={"expression": "team/a", "name": name}), 400, "InvalidNameError")
    assert_nothing_written(server)


def test_a_damaged_blob_is_refused_by_the_server_not_sent(server):
    """The server checks a blob against its digest before sending it: a flipped byte is a 503
    naming the blob and its digest, and no bytes of it are served."""
    digest = server.registry.add(server.folder, "team/a").digest
    blob = Path(server.registry.store.local_path(digest))
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest  # independent of the registry's hashing
    assert server.client.get(f"/api/v1/blobs/{digest}").content == blob.read_bytes()
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    error = assert_error(server.client.get(f"/api/v1/blobs/{digest}"), 503, "CorruptBlobError", digest, "corrupt")
    assert "sha256 mismatch" in error["message"]


def test_path_tricks_in_blob_routes_find_nothing(server):
    for path in ("/api/v1/blobs/..%2F..%2Fregistry.db", "/api/v1/blobs/../../etc/passwd", f"/api/v1/blobs/{'a' * 63}"):
        response = server.client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "NotFoundError"


def test_idempotency_keys_apply_a_retried_write_once(server):
    c = server.client
    assert c.post("/api/v1/adapters", content=upload_body(server.folder, "team/x")).status_code == 200
    make_numpy_lora(server.folder.parent / "two", seed=4)
    assert c.post("/api/v1/adapters", content=upload_body(server.folder.parent / "two", "team/x")).status_code == 200
    move = {"name": "team/x", "alias": "prod", "version": 1}
    first = c.post("/api/v1/aliases/set", json=move, headers={"Idempotency-Key": "move-1"})
    server.registry.set_alias("team/x", "prod", 2)  # someone else moves it meanwhile
    retry = c.post("/api/v1/aliases/set", json=move, headers={"Idempotency-Key": "move-1"})
    assert retry.json() == first.json() and retry.headers["x-pem-replayed"] == "true"
    assert [(m.from_version, m.to_version) for m in server.registry.alias_log("team/x")] == [(None, 1), (1, 2)]
    other = c.post("/api/v1/aliases/set", json={**move, "version": 2}, headers={"Idempotency-Key": "move-1"})
    assert_error(other, 422, "InvalidRequestError", "already used")

    tag = {"ref": "team/x@1", "set": {}, "remove": []}
    c.post("/api/v1/tag", json={"ref": "team/x@1", "set": {"k": "v"}})
    untag = {**tag, "remove": ["k"]}
    first = c.post("/api/v1/tag", json=untag, headers={"Idempotency-Key": "untag-1"})
    assert first.status_code == 200
    assert c.post("/api/v1/tag", json=untag, headers={"Idempotency-Key": "untag-1"}).json() == first.json()
    assert c.post("/api/v1/tag", json=untag).status_code == 404  # without the key, the retry would fail
    assert [h.field for h in server.registry.history("team/x@1")] == ["tag:k", "tag:k"]

    admin = {"Authorization": f"Bearer {server.admin}", "Idempotency-Key": "rm-1"}
    server.registry.remove_alias("team/x", "prod")
    removed = c.post("/api/v1/remove", json={"ref": "team/x@2"}, headers=admin)
    assert removed.status_code == 200
    assert c.post("/api/v1/remove", json={"ref": "team/x@2"}, headers=admin).json() == removed.json()


def test_identity_comes_from_the_token_never_from_the_request(server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PEM_USER", "mallory")
    response = server.client.post("/api/v1/adapters", content=upload_body(server.folder, "team/x"),
                                  headers={"X-Pem-User": "mallory"})
    assert response.json()["owner"] == "bob"
    server.client.post("/api/v1/describe", json={"ref": "team/x", "description": "mine"})
    assert server.registry.history("team/x")[-1].by == "bob"


def test_server_errors_are_logged_with_the_request_id_returned(server, caplog, monkeypatch: pytest.MonkeyPatch):
    def broken(**_):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.registry, "list", broken)
    with caplog.at_level(logging.INFO, logger="pem.server"):
        response = server.client.get("/api/v1/modules")
    error = assert_error(response, 500, "ServerError", response.headers["x-request-id"])
    assert "disk on fire" not in response.text  # details stay in the server's log
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure and error["request_id"] in failure[0].getMessage() and "disk on fire" in str(failure[0].exc_info[1])


def test_access_log_has_user_route_status_and_time_never_the_token(server, caplog):
    with caplog.at_level(logging.INFO, logger="pem.server"):
        server.client.get("/api/v1/modules")
        server.client.get("/api/v1/module", params={"ref": "team/none"})
        server.client.get("/api/v1/modules", headers={"Authorization": "Bearer pem_wrong"})
    lines = [r.getMessage() for r in caplog.records if r.name == "pem.server.access"]
    assert len(lines) == 3
    assert "user=bob method=GET route=/api/v1/modules status=200 ms=" in lines[0]
    assert "user=bob method=GET route=/api/v1/module status=404" in lines[1]
    assert "user=- method=GET route=/api/v1/modules status=401" in lines[2]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert server.token not in logged and "pem_wrong" not in logged
