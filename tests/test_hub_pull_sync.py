"""Pulling from the Hub and keeping in sync with it (issue 5): ``pull`` pinned to commits,
``sync`` against changes made by other clients, errors that leave the registry unchanged,
tokens that are never stored, and the ``pem pull / push / sync`` commands.

Repos are seeded on the session's Hub-compatible server directly (``hub.add_commit``) or by
"another client" (``huggingface_hub.HfApi`` used by the test itself). Expected values come
from the bytes on the server (hashlib, safetensors), never from the registry.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from helpers import LLAMA_ID, make_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
CARD_TEXT = (
    "---\nlicense: mit\ntags:\n- sentiment\n- english\nbase_model: tiny-org/tiny-llama\nlibrary_name: peft\n---\n"
    "# A sentiment adapter\n"
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_repo(label: str) -> str:
    return f"pull-{uuid.uuid4().hex[:8]}/{label}-{uuid.uuid4().hex[:8]}"


def adapter_files(folder: Path, card: str | None = CARD_TEXT) -> dict[str, bytes]:
    files = {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes()}
    if card is not None:
        files[CARD] = card.encode()
    return files


def other_client(hub):
    """Another user of the Hub, with the real client (not through the registry)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url)


def replace_weights(hub, repo: str, folder: Path) -> str:
    """Another client commits new weights to ``repo``; returns the new head."""
    other_client(hub).upload_file(
        path_or_fileobj=str(folder / WEIGHTS), path_in_repo=WEIGHTS, repo_id=repo, commit_message="new weights",
    )
    return hub.head(repo)


def exported_tensors(registry, ref: str, target: Path) -> dict[str, torch.Tensor]:
    return load_file(str(registry.export(ref, target) / WEIGHTS))


def same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


def hub_links(registry) -> list[tuple]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from registry.db.models import HubLink

    with Session(registry.engine) as session:
        return [
            (link.module_id, link.direction, link.repo_id, link.revision, link.commit)
            for link in session.scalars(select(HubLink).order_by(HubLink.id))
        ]


def snapshot(registry) -> tuple:
    """Everything a failed Hub operation must leave as it was: modules, Hub links, blob files."""
    store = Path(registry.settings.store)
    blobs = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()) if store.exists() else []
    modules = [(m.ref, m.digest, m.kind) for m in registry.list()]
    return modules, hub_links(registry), blobs


def assert_one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message and "\n" not in message, message
    assert "Traceback" not in message


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-pull-adapters")
    return {"a": make_lora(root / "a", seed=41), "b": make_lora(root / "b", seed=42)}


@pytest.fixture
def seeded(hub, adapters) -> str:
    """A PEFT adapter repo (config, safetensors weights, a card) made by someone else."""
    repo = new_repo("seeded")
    hub.add_commit(repo, adapter_files(adapters["a"]), message="Upload adapter")
    return repo


# --- pull ------------------------------------------------------------------------------------------


def test_pull_registers_a_pinned_pulled_module(hub, registry, seeded, adapters, tmp_path: Path) -> None:
    info = registry.pull(seeded, task="sentiment", tags={"lang": "en"})  # default endpoint: HF_ENDPOINT
    assert info.created and info.kind == "pulled"
    assert info.name == seeded and info.ref == f"{seeded}@1"
    assert info.base_model == LLAMA_ID and info.peft_type == "LORA"
    assert info.task == "sentiment" and info.tags == {"lang": "en"}

    server_weights = hub.files(seeded)[WEIGHTS]
    details = registry.get(info.ref)
    source = details.source["hub"]
    assert source["repo_id"] == seeded
    assert source["commit"] == hub.head(seeded)
    assert source["file_sha256"] == sha256(server_weights)
    same_tensors(exported_tensors(registry, info.ref, tmp_path / "out"), load_safetensors(server_weights))

    # card metadata is kept
    card = details.source["card"]
    assert card["license"] == "mit"
    assert card["tags"] == ["sentiment", "english"]
    assert card["base_model"] == LLAMA_ID


def test_pull_with_name_and_explicit_endpoint(hub, registry, seeded) -> None:
    info = registry.pull(seeded, name="team/pulled", endpoint=hub.url)
    assert info.ref == "team/pulled@1" and info.kind == "pulled"
    source = registry.get("team/pulled").source["hub"]
    assert source["endpoint"].rstrip("/") == hub.url and source["commit"] == hub.head(seeded)


def test_pull_same_commit_again_is_a_no_op(hub, registry, seeded) -> None:
    first = registry.pull(seeded)
    before = snapshot(registry)
    again = registry.pull(seeded)
    assert not again.created and again.ref == first.ref and again.digest == first.digest
    by_commit = registry.pull(f"{seeded}@{hub.head(seeded)}")
    assert not by_commit.created and by_commit.ref == first.ref
    modules, _, blobs = snapshot(registry)
    assert modules == before[0] and blobs == before[2]
    assert [m.ref for m in registry.list()] == [first.ref]


def test_new_commit_gives_a_new_version_and_a_commit_can_be_pinned(
    hub, registry, seeded, adapters, tmp_path: Path
) -> None:
    first_commit = hub.head(seeded)
    first_weights = hub.files(seeded)[WEIGHTS]
    v1 = registry.pull(seeded)

    second_commit = replace_weights(hub, seeded, adapters["b"])
    assert second_commit != first_commit
    second_weights = hub.files(seeded)[WEIGHTS]
    v2 = registry.pull(seeded)
    assert v2.created and v2.ref == f"{seeded}@2" and v2.kind == "pulled"
    assert v2.digest != v1.digest
    source = registry.get(v2.ref).source["hub"]
    assert source["commit"] == second_commit and source["file_sha256"] == sha256(second_weights)
    same_tensors(exported_tensors(registry, v2.ref, tmp_path / "v2"), load_safetensors(second_weights))

    # REPO@COMMIT pins that commit, even though main has moved on
    pinned = registry.pull(f"{seeded}@{first_commit}", name="team/pinned")
    assert pinned.created and pinned.ref == "team/pinned@1"
    source = registry.get(pinned.ref).source["hub"]
    assert source["commit"] == first_commit and source["file_sha256"] == sha256(first_weights)
    assert pinned.digest == v1.digest
    same_tensors(exported_tensors(registry, pinned.ref, tmp_path / "pinned"), load_safetensors(first_weights))


def test_pull_refuses_pickle_only_weights(hub, registry, seeded, adapters) -> None:
    from registry.errors import UnsafeFormatError

    registry.pull(seeded)
    before = snapshot(registry)
    repo = new_repo("pickle")
    hub.add_commit(repo, {CONFIG: (adapters["a"] / CONFIG).read_bytes(), "adapter_model.bin": b"\x80\x04K\x01."})
    with pytest.raises(UnsafeFormatError) as info:
        registry.pull(repo)
    assert "pickle" in str(info.value)
    assert_one_line(info.value)
    assert snapshot(registry) == before


def test_pull_refuses_corrupt_weights_and_registers_nothing(hub, registry, adapters) -> None:
    from registry.errors import InvalidAdapterError

    repo = new_repo("corrupt")
    hub.add_commit(repo, {CONFIG: (adapters["a"] / CONFIG).read_bytes(), WEIGHTS: b"\x10\x00\x00\x00not safetensors"})
    before = snapshot(registry)
    with pytest.raises(InvalidAdapterError) as info:
        registry.pull(repo)
    assert_one_line(info.value)
    assert snapshot(registry) == before


# --- sync ------------------------------------------------------------------------------------------


def test_sync_detects_a_remote_update_and_pulls_it(hub, registry, seeded, adapters, tmp_path: Path) -> None:
    v1 = registry.pull(seeded)
    [status] = [s for s in registry.sync() if s.repo_id == seeded]
    assert (status.ref, status.direction, status.status) == (v1.ref, "pull", "up-to-date")
    assert status.commit == status.remote_commit == hub.head(seeded)

    pinned = hub.head(seeded)
    head = replace_weights(hub, seeded, adapters["b"])  # another client
    [status] = [s for s in registry.sync() if s.repo_id == seeded]
    assert (status.ref, status.status, status.pulled) == (v1.ref, "behind", None)
    assert status.commit == pinned and status.remote_commit == head
    assert [m.ref for m in registry.list()] == [v1.ref]  # sync alone pulls nothing

    statuses = [s for s in registry.sync(pull=True, endpoint=hub.url) if s.repo_id == seeded]
    pulled = [s.pulled for s in statuses if s.pulled]
    assert pulled == [f"{seeded}@2"]
    assert [m.ref for m in registry.list()] == [v1.ref, f"{seeded}@2"]
    source = registry.get(f"{seeded}@2").source["hub"]
    assert source["commit"] == head
    same_tensors(exported_tensors(registry, f"{seeded}@2", tmp_path / "v2"),
                 load_safetensors(hub.files(seeded)[WEIGHTS]))


def test_sync_pull_again_registers_and_reports_nothing_new(hub, registry, seeded, adapters) -> None:
    """After ``sync(pull=True)`` brought the head in, a second one has nothing to pull: no
    status may claim a ``pulled`` version (the field is "the new version registered")."""
    registry.pull(seeded)
    replace_weights(hub, seeded, adapters["b"])
    assert [s.pulled for s in registry.sync(pull=True) if s.pulled] == [f"{seeded}@2"]
    before = snapshot(registry)

    statuses = registry.sync(pull=True)
    assert snapshot(registry) == before
    assert [(s.ref, s.pulled) for s in statuses if s.pulled] == []


def test_sync_pushed_module_changed_then_missing(hub, registry, adapters) -> None:
    registry.add(adapters["a"], "team/a")
    repo = new_repo("pushed")
    registry.push("team/a", repo)
    [status] = [s for s in registry.sync() if s.repo_id == repo]
    assert (status.ref, status.direction, status.status) == ("team/a@1", "push", "in-sync")

    head = replace_weights(hub, repo, adapters["b"])  # another client replaces the weights
    [status] = [s for s in registry.sync() if s.repo_id == repo]
    assert status.status == "changed" and status.remote_commit == head

    other_client(hub).delete_file(WEIGHTS, repo_id=repo, commit_message="remove weights")
    [status] = [s for s in registry.sync() if s.repo_id == repo]
    assert status.status == "missing" and status.remote_commit == hub.head(repo)


# --- errors ----------------------------------------------------------------------------------------


ERROR_CASES = {
    "pull-repo-not-found": lambda reg, repo: reg.pull(new_repo("absent")),
    "pull-revision-not-found": lambda reg, repo: reg.pull(f"{repo}@nope"),
    "pull-commit-not-found": lambda reg, repo: reg.pull(f"{repo}@{'0' * 40}"),
    "pull-dotdot": lambda reg, repo: reg.pull("../x"),
    "pull-three-parts": lambda reg, repo: reg.pull("a/b/c"),
    "push-dotdot": lambda reg, repo: reg.push(f"{repo}@1", "../x"),
    "push-three-parts": lambda reg, repo: reg.push(f"{repo}@1", "a/b/c"),
    "push-with-revision": lambda reg, repo: reg.push(f"{repo}@1", f"{repo}@main"),
    "push-space-in-name": lambda reg, repo: reg.push(f"{repo}@1", "org/two words"),
    "push-double-dash": lambda reg, repo: reg.push(f"{repo}@1", "org/x--y"),
    "pull-space-named": lambda reg, repo: reg.pull("org/two words", name="team/x"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_and_change_nothing(hub, registry, seeded, case: str) -> None:
    from registry.errors import PemError

    registry.pull(seeded)
    before = snapshot(registry)
    commits = {repo: len(hub.commits(repo)) for repo in [seeded]}
    with pytest.raises(PemError) as info:
        ERROR_CASES[case](registry, seeded)
    assert_one_line(info.value)
    assert snapshot(registry) == before
    assert {repo: len(hub.commits(repo)) for repo in commits} == commits


def test_error_classes_and_messages(hub, registry, seeded) -> None:
    from registry.errors import HubError, InvalidNameError

    with pytest.raises(HubError, match="not found"):
        registry.pull(new_repo("absent"))
    with pytest.raises(HubError, match="revision"):
        registry.pull(f"{seeded}@nope")
    for bad in ("../x", "a/b/c"):
        with pytest.raises(InvalidNameError, match="invalid Hub repo"):
            registry.pull(bad)


def test_unauthorized_is_an_error_and_the_token_is_sent(hub, registry, seeded, adapters, monkeypatch) -> None:
    from registry.errors import HubError

    registry.add(adapters["a"], "team/a")
    good = f"good-{uuid.uuid4().hex}"
    hub.set_token({good})
    try:
        monkeypatch.setenv("HF_TOKEN", "bad")
        before = snapshot(registry)
        for attempt in (lambda: registry.pull(seeded), lambda: registry.push("team/a", new_repo("denied"))):
            with pytest.raises(HubError, match="unauthorized") as info:
                attempt()
            assert_one_line(info.value)
        assert snapshot(registry) == before

        monkeypatch.setenv("HF_TOKEN", good)
        assert registry.pull(seeded).created
    finally:
        hub.set_token(None)


def test_network_down(hub, registry, seeded, adapters, run_pem) -> None:
    """The Hub unreachable: pull and push fail with one line, sync reports errors; nothing changes."""
    from registry.errors import HubError

    registry.pull(seeded)
    registry.add(adapters["b"], "team/b")
    pushed = new_repo("pushed")
    registry.push("team/b", pushed)
    before = snapshot(registry)
    hub.stop()
    try:
        for attempt in (lambda: registry.pull(seeded), lambda: registry.push("team/b", pushed),
                        lambda: registry.pull(new_repo("other"))):
            with pytest.raises(HubError) as info:
                attempt()
            assert_one_line(info.value)
            assert "reach" in str(info.value)
        statuses = registry.sync()
        assert {s.repo_id: s.status for s in statuses} == {seeded: "error", pushed: "error"}
        assert all(s.remote_commit is None and "\n" not in s.detail for s in statuses)

        result = run_pem("pull", seeded)
        assert result.exit_code == 1 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
        assert snapshot(registry) == before
    finally:
        hub.start()
    assert registry.pull(seeded).created is False  # back up, same content


# --- tokens are never stored -----------------------------------------------------------------------


def test_tokens_are_never_stored(hub, registry, seeded, adapters, run_pem, monkeypatch) -> None:
    from sqlalchemy import MetaData, select

    secret = f"hf_pemSecret{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    hub.set_token({secret})  # the operations below only succeed if the token is sent
    try:
        pulled = registry.pull(seeded)
        registry.push(pulled.ref, new_repo("republished"))
        registry.add(adapters["b"], "team/b")
        assert run_pem("push", "team/b", new_repo("cli")).exit_code == 0
        replace_weights(hub, seeded, adapters["b"])
        assert [s.pulled for s in registry.sync(pull=True) if s.pulled] == [f"{seeded}@2"]
    finally:
        hub.set_token(None)

    metadata = MetaData()
    metadata.reflect(registry.engine)
    dumped = []
    with registry.engine.connect() as conn:
        for table in metadata.sorted_tables:
            dumped += [repr(tuple(row)) for row in conn.execute(select(table))]
    assert any(seeded in row for row in dumped)  # the dump does hold what was pulled
    assert not [row for row in dumped if secret in row]

    home = Path(registry.settings.home)
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if secret.encode() in p.read_bytes()]


# --- the command line --------------------------------------------------------------------------------


def test_cli_pull_push_sync(hub, registry, run_pem, seeded, adapters) -> None:
    result = run_pem("pull", seeded, "--name", "team/p", "--json")
    assert result.exit_code == 0, result.output
    pulled = json.loads(result.stdout)
    assert pulled["ref"] == "team/p@1" and pulled["kind"] == "pulled"

    result = run_pem("pull", seeded, "--name", "team/p")
    assert result.exit_code == 0 and "already registered" in result.stdout and "team/p@1" in result.stdout

    target = new_repo("cli-pushed")
    result = run_pem("push", "team/p", target, "--branch", "release")
    assert result.exit_code == 0, result.output
    assert "team/p@1" in result.stdout and hub.head(target, "release")[:12] in result.stdout

    result = run_pem("sync", "--json")
    assert result.exit_code == 0, result.output
    statuses = {(s["ref"], s["direction"], s["repo_id"], s["revision"]): s for s in json.loads(result.stdout)}
    assert statuses[("team/p@1", "pull", seeded, "main")]["status"] == "up-to-date"
    assert statuses[("team/p@1", "push", target, "release")]["status"] == "in-sync"
    assert statuses[("team/p@1", "push", target, "release")]["commit"] == hub.head(target, "release")

    head = replace_weights(hub, seeded, adapters["b"])
    result = run_pem("sync", "--pull", "--json")
    assert result.exit_code == 0, result.output
    [status] = [s for s in json.loads(result.stdout) if s["direction"] == "pull"]
    assert status["status"] == "behind" and status["remote_commit"] == head and status["pulled"] == "team/p@2"
    assert registry.get("team/p@2").source["hub"]["commit"] == head


@pytest.mark.parametrize("args", [
    ("pull", "missing-org/missing-repo"),
    ("pull", "../x"),
    ("push", "team/none", "org/whatever"),
    ("push", "team/a", "a/b/c"),
    ("push", "team/a", "org/two words"),
], ids=["pull-missing", "pull-dotdot", "push-unknown-module", "push-three-parts", "push-space"])
def test_cli_errors_print_one_line(hub, registry, run_pem, adapters, args) -> None:
    registry.add(adapters["a"], "team/a")
    before = snapshot(registry)
    result = run_pem(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert snapshot(registry) == before
