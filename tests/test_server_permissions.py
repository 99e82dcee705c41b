"""Who may do what on a registry server (issue 16): the whole matrix of role x namespace x
operation, over HTTP, in-process (an ASGI test client on the real FastAPI app).

Tokens: none, reader, writer (every namespace), writer for namespace ``team`` only, admin.
Every operation runs against a module in ``team`` and one in ``other``; namespace-less
operations (base add, gc, verify) too. The expected status of every cell is written out
below by hand from the issue's role table, not computed by the permission code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from independent import make_numpy_lora

from registry import Registry
from registry.db.models import ApiToken
from registry.server.app import ServerOptions, create_app
from registry.server.tokens import create_token

TOKENS = ("none", "reader", "writer", "writer@team", "admin")
X_ID, Y_ID = "tiny-org/tiny-llama", "tiny-org/tiny-llama-v2"
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "max_position_embeddings": 64}

# operation -> expected status for (none, reader, writer, writer@team, admin), in namespace team / other.
R = (401, 200, 200, 200, 200)  # reads: any token
MATRIX = {
    "list":          {"team": R, "other": R},
    "show":          {"team": R, "other": R},
    "resolve":       {"team": R, "other": R},
    "lineage":       {"team": R, "other": R},
    "descendants":   {"team": R, "other": R},
    "contents":      {"team": R, "other": R},
    "history":       {"team": R, "other": R},
    "alias log":     {"team": R, "other": R},
    "base list":     {"team": R, "other": R},
    "base show":     {"team": R, "other": R},
    "port check":    {"team": R, "other": R},
    "check":         {"team": R, "other": R},
    "blob":          {"team": R, "other": R},
    "push bundle":   {"team": R, "other": R},
    "hub links":     {"team": R, "other": R},
    "add":           {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "compose":       {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "port":          {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "alias set":     {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "alias rm":      {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "tag":           {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "describe":      {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "pull":          {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "push":          {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 403, 200)},
    "rm":            {"team": (401, 403, 403, 403, 200), "other": (401, 403, 403, 403, 200)},
    "base add":      {"team": (401, 403, 200, 200, 200), "other": (401, 403, 200, 200, 200)},
    "gc":            {"team": (401, 403, 403, 403, 200), "other": (401, 403, 403, 403, 200)},
    "verify":        {"team": (401, 403, 403, 403, 200), "other": (401, 403, 403, 403, 200)},
}


class World:
    """A registry with team/m@1 and other/m@1, two recorded hosts, and one token per role."""

    def __init__(self, root: Path):
        from fastapi.testclient import TestClient

        self.root = root
        self.registry = Registry.init(root / "home", user="setup")
        self.folder = make_numpy_lora(root / "adapter", seed=1)
        self.other_folder = make_numpy_lora(root / "adapter-2", seed=2)
        for ns in ("team", "other"):
            self.registry.add(self.folder, f"{ns}/m")
        for model_id in (X_ID, Y_ID):
            (root / model_id).mkdir(parents=True)
            (root / model_id / "config.json").write_text(json.dumps(LLAMA | {"vocab_size": 64 if model_id == X_ID else 80}))
            self.registry.add_base(model_id, config_path=root / model_id / "config.json")
        self.tokens = {
            "reader": create_token(self.registry, "rita", "reader").token,
            "writer": create_token(self.registry, "will", "writer").token,
            "writer@team": create_token(self.registry, "tess", "writer", ["team"]).token,
            "admin": create_token(self.registry, "ada", "admin").token,
        }
        self.client = TestClient(create_app(self.registry, ServerOptions()))

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[token]}"} if token != "none" else {}

    def upload(self, name: str, **extra) -> bytes:
        weights = (self.other_folder / "adapter_model.safetensors").read_bytes()
        metadata = {"name": name, "config": json.loads((self.other_folder / "adapter_config.json").read_text()),
                    "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_size": len(weights), **extra}
        return json.dumps(metadata).encode() + b"\n" + weights


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    world = World(tmp_path_factory.mktemp("permissions"))
    yield world
    world.registry.close()


def perform(world: World, operation: str, ns: str, token: str, key: str):
    """Do ``operation`` on namespace ``ns`` with ``token``; ``key`` makes its names unique.
    Preparation (an alias to remove, a module to delete) is done directly, as the setup user."""
    c, h, reg = world.client, world.headers(token), world.registry
    ref, digest = f"{ns}/m", reg.resolve(f"{ns}/m").digest
    reads = {
        "list": lambda: c.get("/api/v1/modules", headers=h),
        "show": lambda: c.get("/api/v1/module", params={"ref": ref}, headers=h),
        "resolve": lambda: c.get("/api/v1/resolve", params={"ref": ref}, headers=h),
        "lineage": lambda: c.get("/api/v1/lineage", params={"ref": ref}, headers=h),
        "descendants": lambda: c.get("/api/v1/descendants", params={"ref": ref}, headers=h),
        "contents": lambda: c.get("/api/v1/contents", params={"ref": ref}, headers=h),
        "history": lambda: c.get("/api/v1/history", params={"ref": ref}, headers=h),
        "alias log": lambda: c.get("/api/v1/alias-log", params={"name": ref}, headers=h),
        "base list": lambda: c.get("/api/v1/bases", headers=h),
        "base show": lambda: c.get("/api/v1/base", params={"id": X_ID}, headers=h),
        "port check": lambda: c.get("/api/v1/port-check", params={"ref": ref, "to": Y_ID}, headers=h),
        "check": lambda: c.post("/api/v1/check", json={"expression": f"0.5*{ref}"}, headers=h),
        "blob": lambda: c.get(f"/api/v1/blobs/{digest}", headers=h),
        "push bundle": lambda: c.get("/api/v1/push-bundle", params={"ref": ref}, headers=h),
        "hub links": lambda: c.get("/api/v1/hub-links", headers=h),
    }
    if operation in reads:
        return reads[operation]()
    if operation == "alias rm":
        reg.set_alias(ref, f"r-{key}", 1)
    if operation == "rm":
        reg.add(world.folder, f"{ns}/rm-{key}")
    writes = {
        "add": lambda: c.post("/api/v1/adapters", content=world.upload(f"{ns}/add-{key}"), headers=h),
        "compose": lambda: c.post("/api/v1/compose", json={"expression": f"0.5*{ref}", "name": f"{ns}/c-{key}"}, headers=h),
        "port": lambda: c.post("/api/v1/port", json={"ref": ref, "to": Y_ID, "name": f"{ns}/p-{key}"}, headers=h),
        "alias set": lambda: c.post("/api/v1/aliases/set", json={"name": ref, "alias": f"a-{key}", "version": 1}, headers=h),
        "alias rm": lambda: c.post("/api/v1/aliases/remove", json={"name": ref, "alias": f"r-{key}"}, headers=h),
        "tag": lambda: c.post("/api/v1/tag", json={"ref": ref, "set": {f"k-{key}": "v"}}, headers=h),
        "describe": lambda: c.post("/api/v1/describe", json={"ref": ref, "description": key}, headers=h),
        "pull": lambda: c.post("/api/v1/pulls", headers=h, content=world.upload(
            f"{ns}/pull-{key}", endpoint="https://hub.example", repo_id=f"org/{key}", commit="c" * 40)),
        "push": lambda: c.post("/api/v1/pushes", headers=h, json={
            "ref": ref, "digest": digest, "endpoint": "https://hub.example", "repo_id": f"org/{key}", "commit": "c" * 40,
            "weights_oid": "d" * 40}),
        "rm": lambda: c.post("/api/v1/remove", json={"ref": f"{ns}/rm-{key}@1"}, headers=h),
        "base add": lambda: c.post("/api/v1/bases", json={"base_model": f"tiny-org/b-{key}", "config": LLAMA}, headers=h),
        "gc": lambda: c.post("/api/v1/gc", json={"dry_run": True}, headers=h),
        "verify": lambda: c.post("/api/v1/verify", json={"ref": ref}, headers=h),
    }
    return writes[operation]()


CASES = [(op, ns, token) for op in MATRIX for ns in ("team", "other") for token in TOKENS]


@pytest.mark.parametrize("operation,ns,token", CASES, ids=[f"{o}-{n}-{t}" for o, n, t in CASES])
def test_permission_matrix(world: World, operation: str, ns: str, token: str):
    key = f"{operation.replace(' ', '')}-{ns}-{token.replace('@', '-')}"
    response = perform(world, operation, ns, token, key)
    expected = MATRIX[operation][ns][TOKENS.index(token)]
    assert response.status_code == expected, response.text
    if expected == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    if expected == 401:
        assert error["type"] == "AuthenticationError"
        assert "token" in error["message"]
    else:
        assert error["type"] == "PermissionDeniedError"
        role_needed = "admin" if operation in ("rm", "gc", "verify") else "writer"
        assert f"the {role_needed} role" in error["message"]  # names the missing right
        if operation not in ("gc", "verify", "base add"):
            assert f"namespace {ns}" in error["message"]  # and the namespace


def test_a_refused_write_changes_nothing(world: World):
    before = [m.ref for m in world.registry.list()]
    aliases = world.registry.alias_log("other/m")
    assert perform(world, "compose", "other", "writer@team", "refused").status_code == 403
    assert perform(world, "alias set", "other", "reader", "refused").status_code == 403
    assert perform(world, "add", "other", "writer@team", "refused").status_code == 403
    assert [m.ref for m in world.registry.list()] == before
    assert world.registry.alias_log("other/m") == aliases


def test_writes_are_recorded_as_the_token_user(world: World):
    assert perform(world, "tag", "team", "writer@team", "who").status_code == 200
    assert perform(world, "alias set", "team", "writer", "who").status_code == 200
    added = perform(world, "add", "team", "writer@team", "who")
    assert added.json()["owner"] == "tess"
    assert world.registry.get("team/add-who").owner == "tess"
    assert world.registry.history("team/m")[-1].by == "tess"
    assert world.registry.alias_log("team/m")[-1].by == "will"


def test_revoked_and_expired_tokens_and_strangers_are_refused(world: World, tmp_path: Path):
    from datetime import timedelta

    from registry.db.models import utcnow
    from registry.server.tokens import revoke_token

    revoked = create_token(world.registry, "rob", "admin")
    expired = create_token(world.registry, "eve", "admin", expires_days=1)
    valid = create_token(world.registry, "val", "reader", expires_days=1)
    revoke_token(world.registry, revoked.id)
    with world.registry._write_session() as session:
        session.get(ApiToken, expired.id).expires_at = utcnow() - timedelta(seconds=1)
    for token, words in ((revoked.token, "revoked"), (expired.token, "expired"), ("pem_" + "x" * 43, "unknown token")):
        response = world.client.get("/api/v1/modules", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
        assert words in response.json()["error"]["message"]
        assert token not in response.text
    assert world.client.get("/api/v1/modules", headers={"Authorization": f"Bearer {valid.token}"}).status_code == 200
    assert world.client.get("/api/v1/modules", headers={"Authorization": valid.token}).status_code == 401  # no scheme


def test_public_read_opens_reads_only(world: World):
    from fastapi.testclient import TestClient

    public = TestClient(create_app(world.registry, ServerOptions(public_read=True)))
    assert public.get("/api/v1/modules").status_code == 200
    assert public.get("/api/v1/lineage", params={"ref": "team/m"}).status_code == 200
    refused = public.post("/api/v1/tag", json={"ref": "team/m", "set": {"x": "y"}})
    assert refused.status_code == 401
    assert public.post("/api/v1/check", json={"expression": "team/m"}).status_code == 200


def test_open_routes(world: World):
    assert world.client.get("/healthz").json() == {"status": "ok"}
    assert world.client.get("/api/v1/version").json()["api"] == 1
    paths = world.client.get("/openapi.json").json()["paths"]
    assert "/api/v1/compose" in paths and "/api/v1/modules" in paths
