"""The test Hub (tests/hub_server.py) driven by the real, unpatched huggingface_hub client.

Every call gets ``endpoint=hub.url`` explicitly: ``HF_ENDPOINT`` is read once, when
huggingface_hub is imported, and tests/conftest.py has already set it to a dead address.
``HF_HUB_CACHE`` is also read at import, so downloads get ``cache_dir=`` explicitly too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hub_server import HubServer, git_blob_oid, running_hub

TOKEN = "hub-test-token"
REPO = "org/adapter"
BINARY = bytes(range(256)) * 40 + b"\x00\xff"
README = b"---\nlibrary_name: peft\nbase_model: tiny-org/tiny-llama\n---\n# An adapter\n"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with running_hub() as server:
        yield server


@pytest.fixture
def api(hub: HubServer):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def uploaded(api, tmp_path: Path) -> dict[str, bytes]:
    """REPO with a README, a binary file and a nested file, uploaded by upload_folder."""
    files = {"README.md": README, "weights.bin": BINARY, "sub/dir/notes.txt": b"nested\n"}
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "upload", files), commit_message="Add adapter")
    return files


def test_create_repo_whoami_and_exist_ok(hub: HubServer, api) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    assert api.whoami()["name"] == hub.user
    url = api.create_repo(REPO)
    assert url == f"{hub.url}/{REPO}" and url.repo_id == REPO
    assert hub.repo_exists(REPO) and not hub.repo_exists("org/other")
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"]}  # like the real Hub
    assert len(hub.commits(REPO)) == 1

    assert api.create_repo(REPO, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(REPO)
    assert info.value.response.status_code == 409
    assert api.create_repo("bare-name") == f"{hub.url}/{hub.user}/bare-name"  # no namespace: the user's


def test_upload_folder_then_metadata(hub: HubServer, api, tmp_path: Path, uploaded: dict[str, bytes]) -> None:
    from huggingface_hub import RepoFile, RepoFolder

    head = hub.head(REPO)
    assert hub.files(REPO) == {**uploaded, ".gitattributes": hub.files(REPO)[".gitattributes"]}
    assert ("POST", "/api/validate-yaml") in hub.requests  # a README.md is validated first

    info = api.model_info(REPO)
    assert info.id == REPO and info.sha == head
    assert sorted(s.rfilename for s in info.siblings) == sorted([".gitattributes", *uploaded])
    detailed = api.model_info(REPO, files_metadata=True)
    assert {s.rfilename: s.blob_id for s in detailed.siblings}["weights.bin"] == git_blob_oid(BINARY)
    assert api.model_info(REPO, revision=head).sha == head

    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *uploaded])
    top = {e.path: e for e in api.list_repo_tree(REPO)}
    assert set(top) == {".gitattributes", "README.md", "weights.bin", "sub"}
    assert isinstance(top["sub"], RepoFolder) and isinstance(top["weights.bin"], RepoFile)
    assert top["weights.bin"].size == len(BINARY) and top["weights.bin"].blob_id == git_blob_oid(BINARY)
    assert top["weights.bin"].lfs is None
    nested = [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)]
    assert nested == ["sub/dir", "sub/dir/notes.txt"]

    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", head)]
    assert refs.tags == [] and refs.converts == []

    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits] == [c.id for c in hub.commits(REPO)]
    assert commits[0].commit_id == head and commits[0].title == "Add adapter" and commits[0].authors == [hub.user]
    assert len(commits) == 2 and hub.commits(REPO)[0].parent == commits[1].commit_id


def test_downloads_by_branch_commit_and_snapshot(hub: HubServer, uploaded, cache: Path, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    head = hub.head(REPO)
    by_branch = hf_hub_download(REPO, "weights.bin", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    assert Path(by_branch).read_bytes() == BINARY and f"/snapshots/{head}/" in by_branch
    by_commit = hf_hub_download(REPO, "weights.bin", revision=head, endpoint=hub.url, token=TOKEN,
                                cache_dir=tmp_path / "other-cache")
    assert Path(by_commit).read_bytes() == BINARY
    nested = hf_hub_download(REPO, "sub/dir/notes.txt", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    assert Path(nested).read_bytes() == b"nested\n"

    folder = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "snap-cache"))
    assert folder.name == head
    got = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == hub.files(REPO)


def test_resolve_headers_and_range(hub: HubServer, uploaded) -> None:
    url = f"{hub.url}/{REPO}/resolve/main/weights.bin"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        assert response.headers["X-Repo-Commit"] == hub.head(REPO)
        assert response.headers["ETag"] == f'"{git_blob_oid(BINARY)}"'
        assert int(response.headers["Content-Length"]) == len(BINARY)
        assert response.headers["X-Linked-Size"] is None and response.read() == b""
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as response:
        assert response.status == 206 and response.read() == BINARY[100:]
        assert response.headers["Content-Range"] == f"bytes 100-{len(BINARY) - 1}/{len(BINARY)}"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{hub.url}/api/spaces/x/y")
    assert info.value.code == 404 and "not implemented in test server" in json.load(info.value)["error"]


def test_second_upload_changes_one_file_then_noop(hub: HubServer, api, tmp_path: Path, uploaded) -> None:
    first = hub.head(REPO)
    changed = {**uploaded, "README.md": README + b"\nMore.\n"}
    folder = _folder(tmp_path / "second", changed)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Update card")
    assert info.oid == hub.head(REPO) != first
    new = hub.commits(REPO)[0]
    assert new.parent == first and new.title == "Update card"
    assert hub.files(REPO)["README.md"] == changed["README.md"]
    commit_bodies = [p for m, p in hub.requests if p.startswith(f"/api/models/{REPO}/commit/")]
    assert len(commit_bodies) == 2

    hub.requests.clear()
    again = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Nothing changed")
    assert again.oid == hub.head(REPO) == new.id  # the client skipped it: preupload sent matching oids
    assert not [p for m, p in hub.requests if "/commit/" in p]
    assert len(hub.commits(REPO)) == 3


def test_branches_deletes_and_parent_commit(hub: HubServer, api, cache: Path, uploaded) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    main_head = hub.head(REPO)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_branch(REPO, branch="dev")
    assert info.value.response.status_code == 409
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    assert hub.head(REPO) == main_head and "dev.txt" not in hub.files(REPO)
    assert hub.files(REPO, "dev")["dev.txt"] == b"dev only"
    assert {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches} == hub.branches(REPO)
    path = hf_hub_download(REPO, "dev.txt", revision="dev", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    assert Path(path).read_bytes() == b"dev only"
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO, revision="no-such-branch")

    api.create_commit(REPO, [CommitOperationDelete("weights.bin"), CommitOperationDelete("sub/")],
                      commit_message="Remove", revision="dev")
    assert sorted(hub.files(REPO, "dev")) == [".gitattributes", "README.md", "dev.txt"]

    with pytest.raises(HfHubHTTPError) as info:  # documented: fails if the branch moved on
        api.create_commit(REPO, [CommitOperationAdd("late.txt", b"late")], commit_message="Late",
                          parent_commit=hub.commits(REPO)[1].id)
    assert info.value.response.status_code == 412
    api.create_commit(REPO, [CommitOperationAdd("ok.txt", b"ok")], commit_message="On time", parent_commit=main_head)

    pr = api.create_commit(REPO, [CommitOperationAdd("pr.txt", b"pr")], commit_message="PR", create_pr=True)
    assert pr.pr_num == 1 and hub.files(REPO, "refs/pr/1")["pr.txt"] == b"pr"
    assert "pr.txt" not in hub.files(REPO)


def test_errors_map_to_client_exceptions(hub: HubServer, api, cache: Path, uploaded) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "a.txt", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "README.md", revision="f" * 40, endpoint=hub.url, token=TOKEN, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_commits(REPO, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no/such/dir"))
    assert api.file_exists(REPO, "README.md") and not api.file_exists(REPO, "missing.bin")
    assert api.repo_exists(REPO) and not api.repo_exists("org/missing")
    assert api.revision_exists(REPO, "main") and not api.revision_exists(REPO, "nope")


def test_tokens(hub: HubServer, api) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub.set_token({TOKEN})
    assert api.whoami()["name"] == hub.user
    api.create_repo(REPO)
    bad = HfApi(endpoint=hub.url, token="wrong-token")
    with pytest.raises(HfHubHTTPError) as info:
        bad.whoami()
    assert info.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as info:
        bad.model_info(REPO)
    assert info.value.response.status_code == 401 and not isinstance(info.value, RepositoryNotFoundError)
    hub.set_token(None)
    assert bad.model_info(REPO).id == REPO


def test_stop_and_restart_keep_url_and_content(hub: HubServer, api) -> None:
    import httpx2

    api.create_repo(REPO)
    url, head = hub.url, hub.head(REPO)
    hub.stop()
    with pytest.raises(httpx2.ConnectError):
        api.model_info(REPO)
    hub.start()
    assert hub.url == url and api.model_info(REPO).sha == head


def test_direct_seeding_helpers(hub: HubServer, api) -> None:
    commit = hub.add_commit("org/seeded", {"a.txt": b"A", "b/c.txt": b"C"}, message="Seed")
    assert api.model_info("org/seeded").sha == commit == hub.head("org/seeded")
    assert api.list_repo_commits("org/seeded")[0].title == "Seed"
    hub.add_commit("org/seeded", deletes=("a.txt",), branch="other")
    assert sorted(hub.files("org/seeded", "other")) == [".gitattributes", "b/c.txt"]
    assert hub.files("org/seeded", commit)["a.txt"] == b"A"


PEFT_ROUND_TRIP = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from helpers import make_lora, tensors, tiny_llama
    from huggingface_hub import HfApi
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    repo_id, local = sys.argv[1], Path(sys.argv[2])
    make_lora(local, seed=3)
    api = HfApi()  # no endpoint argument: HF_ENDPOINT, read at import, is the test Hub
    api.create_repo(repo_id)
    print("COMMIT", api.upload_folder(repo_id=repo_id, folder_path=local, commit_message="LoRA").oid)

    model = PeftModel.from_pretrained(tiny_llama(), repo_id)
    loaded, saved = get_peft_model_state_dict(model), tensors(local)
    assert loaded.keys() == saved.keys(), (sorted(loaded), sorted(saved))
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    print("LOADED", model.peft_config["default"].peft_type.value, len(saved))
    """
)


def test_peft_loads_an_adapter_from_the_hub(hub: HubServer, tmp_path: Path) -> None:
    """End to end: PEFT, unpatched, loads a LoRA that upload_folder pushed to the test Hub.

    PEFT takes no endpoint: it calls hf_hub_download and file_exists with the endpoint that
    huggingface_hub fixed at import (conftest's dead address in this process; ``file_exists`` is
    even bound to a module-level HfApi built then). So the round trip runs in a fresh interpreter
    whose HF_ENDPOINT is the server's URL. Saving and uploading happen there too: that keeps this
    process from importing torch just for this test.
    """
    tests_dir = Path(__file__).parent
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "peft-cache"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", PEFT_ROUND_TRIP, REPO, str(tmp_path / "lora")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED LORA" in result.stdout
    assert f"COMMIT {hub.head(REPO)}" in result.stdout
    assert sorted(hub.files(REPO)) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.files(REPO)["adapter_model.safetensors"] == (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    paths = [p for _, p in hub.requests]
    assert f"/{REPO}/resolve/main/adapter_config.json" in paths
    assert f"/{REPO}/resolve/main/adapter_model.safetensors" in paths
