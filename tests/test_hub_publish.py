"""Publishing to the Hub (issue 5): ``push``, the model card and the provenance sidecar, PEFT
loading a pushed module straight from the suite's Hub server, and the round trip of a composed
module into a second, empty registry.

Everything runs against the session's Hub-compatible server (``hub`` fixture) through the real
``huggingface_hub`` client. Expected values are computed here: digests with hashlib over the
bytes the server holds, tensors with safetensors, model outputs with PEFT; never by the
registry. Each test uses repo names of its own (the server is shared by the session).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from helpers import LLAMA_ID, make_lora, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
SIDECAR = "pem-provenance.json"

# registry A: team/c = 0.7*team/a - 0.2*team/b, method exact.
EXPRESSION = "0.7*team/a - 0.2*team/b"
# (a, b) = (unsigned, signed) coefficient of each input, worked out by hand (SEMANTICS.md 2).
COEFFICIENTS = {"a": (0.7, 0.7), "b": (0.2, -0.2)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_repo(label: str) -> str:
    return f"pub-{uuid.uuid4().hex[:8]}/{label}-{uuid.uuid4().hex[:8]}"


def card_of(text: str):
    """(metadata dict, body) of a README.md, parsed by huggingface_hub itself."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(text)
    assert isinstance(card.data, ModelCardData)
    return card.data.to_dict(), card.text


def same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-publish-adapters")
    return {"a": make_lora(root / "a", seed=31), "b": make_lora(root / "b", seed=32, r=2)}


@pytest.fixture
def composed(hub, registry, adapters) -> SimpleNamespace:
    """Registry A: team/a, team/b and team/c (exact) registered; the inputs pushed first, then
    team/c, so that the card of team/c can name its inputs' repos. No ``endpoint=``: the
    registry's default endpoint (HF_ENDPOINT) is the suite's server."""
    registry.add(adapters["a"], "team/a")
    registry.add(adapters["b"], "team/b")
    registry.compose(EXPRESSION, "team/c", method="exact")
    repos = {k: new_repo(k) for k in "abc"}
    pushed = {k: registry.push(f"team/{k}", repos[k]) for k in "abc"}
    return SimpleNamespace(repos=repos, pushed=pushed)


@pytest.fixture
def registry_b(database_url: str, postgres, tmp_path: Path):
    """A second, empty registry: another home and another database of the same backend."""
    from registry import Registry

    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'registry-b.db'}"
    else:
        url = postgres.url(postgres.create())
    reg = Registry.init(tmp_path / "home-b", database_url=url, user="other-team")
    yield reg
    reg.close()


# --- push: what lands in the repo ---------------------------------------------------------------


def test_push_trained_module_uploads_config_weights_card_and_sidecar(hub, registry, adapters) -> None:
    registry.add(adapters["a"], "team/a")
    repo = new_repo("trained")
    result = registry.push("team/a", repo)  # default endpoint: HF_ENDPOINT

    assert result.ref == "team/a@1" and result.repo_id == repo and result.branch == "main"
    assert result.commit == hub.head(repo)
    assert result.url == f"{hub.url}/{repo}"
    files = hub.files(repo)
    assert {CONFIG, WEIGHTS, CARD, SIDECAR} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    # the weights are the module's canonical blob: its sha256 is the module's digest
    assert sha256(files[WEIGHTS]) == registry.get("team/a").digest
    same_tensors(load_safetensors(files[WEIGHTS]), load_file(str(adapters["a"] / WEIGHTS)))
    config = json.loads(files[CONFIG])
    local = json.loads((adapters["a"] / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == LLAMA_ID
    assert config["r"] == local["r"] and config["lora_alpha"] == local["lora_alpha"]
    assert sorted(config["target_modules"]) == sorted(local["target_modules"])


def test_trained_model_card_and_sidecar(hub, registry, adapters) -> None:
    from registry.schemas import ProvenanceSidecar

    info = registry.add(adapters["a"], "team/a")
    repo = new_repo("card")
    registry.push("team/a", repo, endpoint=hub.url)
    files = hub.files(repo)

    meta, body = card_of(files[CARD].decode())
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == LLAMA_ID
    assert meta["base_model_relation"] == "adapter"
    assert "lora" in meta["tags"]
    assert LLAMA_ID in body

    raw = json.loads(files[SIDECAR])
    sidecar = ProvenanceSidecar.model_validate(raw)
    assert raw["schema"] == "pem-registry/provenance" and raw["schema_version"] == 1
    assert sidecar.module.name == "team/a" and sidecar.module.version == 1
    assert sidecar.module.digest == sha256(files[WEIGHTS]) == info.digest
    assert sidecar.module.kind == "trained"
    assert sidecar.module.peft_type == "LORA"
    assert sidecar.module.base_model == LLAMA_ID
    assert sidecar.derivation is None


def test_composed_model_card_names_input_repos_and_renders_provenance(hub, registry, composed) -> None:
    repos = composed.repos
    canonical = registry.get("team/c").provenance.canonical
    meta, body = card_of(hub.files(repos["c"])[CARD].decode())

    assert meta["library_name"] == "peft"
    base = meta["base_model"]
    assert sorted([base] if isinstance(base, str) else base) == sorted([repos["a"], repos["b"]])
    assert meta["base_model_relation"] == "merge"
    assert "lora" in meta["tags"]

    assert canonical in body
    assert "exact" in body
    rows = [line for line in body.splitlines() if line.startswith("|")]
    for key in "ab":
        row = [line for line in rows if f"team/{key}@1" in line]
        assert len(row) == 1, rows  # one table row per input
        assert repos[key] in row[0]
        assert f"{COEFFICIENTS[key][1]:+g}" in row[0] or f"{COEFFICIENTS[key][1]:g}" in row[0]


def test_composed_sidecar_has_the_provenance(hub, registry, composed) -> None:
    from registry.schemas import ProvenanceSidecar

    repos = composed.repos
    files = hub.files(repos["c"])
    raw = json.loads(files[SIDECAR])
    sidecar = ProvenanceSidecar.model_validate(raw)

    assert raw["schema"] == "pem-registry/provenance" and raw["schema_version"] == 1
    assert sidecar.module.name == "team/c" and sidecar.module.version == 1
    assert sidecar.module.kind == "derived"
    assert sidecar.module.digest == sha256(files[WEIGHTS])
    assert sidecar.module.base_model == LLAMA_ID
    derivation = sidecar.derivation
    assert derivation is not None
    assert derivation.expression == EXPRESSION
    assert derivation.canonical == registry.get("team/c").provenance.canonical
    assert derivation.method == "exact"
    expected = {
        sha256(hub.files(repos[k])[WEIGHTS]): (f"team/{k}@1", *COEFFICIENTS[k], repos[k], composed.pushed[k].commit)
        for k in "ab"
    }
    got = {i.digest: (i.ref, i.a, i.b, i.hub["repo_id"], i.hub["commit"]) for i in derivation.inputs}
    assert sorted(got) == sorted(expected)
    for digest, (ref, a, b, repo_id, commit) in expected.items():
        assert got[digest][0] == ref
        assert got[digest][1] == pytest.approx(a) and got[digest][2] == pytest.approx(b)
        assert got[digest][3:] == (repo_id, commit)
        assert commit == hub.head(repo_id)


def test_sidecar_validates_against_the_published_json_schema(hub, registry, composed) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from registry.schemas import ProvenanceSidecar

    schema = ProvenanceSidecar.model_json_schema(by_alias=True)
    for key in "abc":
        jsonschema.validate(json.loads(hub.files(composed.repos[key])[SIDECAR]), schema)


# --- PEFT loads what was pushed --------------------------------------------------------------------


def test_peft_loads_pushed_modules_from_the_hub(hub, registry, composed, tmp_path: Path) -> None:
    from peft import PeftModel

    input_ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        base_logits = tiny_llama()(input_ids).logits
    for key in ("a", "c"):
        exported = registry.export(f"team/{key}", tmp_path / f"export-{key}")
        with torch.no_grad():
            from_hub = PeftModel.from_pretrained(tiny_llama(), composed.repos[key]).eval()(input_ids).logits
            local = PeftModel.from_pretrained(tiny_llama(), str(exported)).eval()(input_ids).logits
        torch.testing.assert_close(from_hub, local, rtol=0, atol=0)
        assert not torch.allclose(from_hub, base_logits, atol=1e-4), f"team/{key} changed nothing"


# --- push: commits and branches ---------------------------------------------------------------------


def test_push_unchanged_content_makes_no_commit_and_is_in_sync(hub, registry, adapters) -> None:
    registry.add(adapters["a"], "team/a")
    repo = new_repo("same")
    first = registry.push("team/a", repo, message="first publication")
    assert hub.commits(repo)[0].title == "first publication"
    count = len(hub.commits(repo))

    again = registry.push("team/a", repo)
    assert len(hub.commits(repo)) == count
    assert again.commit == first.commit == hub.head(repo)

    statuses = [s for s in registry.sync() if s.repo_id == repo]
    assert {(s.ref, s.direction, s.revision, s.status) for s in statuses} == {("team/a@1", "push", "main", "in-sync")}
    assert all(s.commit == s.remote_commit == hub.head(repo) for s in statuses)


def test_push_to_a_new_branch_creates_it(hub, registry, adapters) -> None:
    registry.add(adapters["a"], "team/a")
    registry.add(adapters["b"], "team/b")
    repo = new_repo("branches")
    main = registry.push("team/a", repo, endpoint=hub.url)
    main_weights = hub.files(repo)[WEIGHTS]

    dev = registry.push("team/b", repo, branch="dev", endpoint=hub.url)
    assert dev.branch == "dev"
    assert "dev" in hub.branches(repo)
    assert dev.commit == hub.head(repo, "dev") != main.commit
    assert sha256(hub.files(repo, "dev")[WEIGHTS]) == registry.get("team/b").digest
    assert hub.head(repo) == main.commit and hub.files(repo)[WEIGHTS] == main_weights  # main untouched

    # a branch whose content equals main's: created, but no commit of its own
    same = registry.push("team/a", repo, branch="mirror", endpoint=hub.url)
    assert hub.branches(repo)["mirror"] == same.commit == main.commit

    statuses = {(s.ref, s.revision): s.status for s in registry.sync() if s.repo_id == repo}
    assert statuses == {("team/a@1", "main"): "in-sync", ("team/b@1", "dev"): "in-sync",
                        ("team/a@1", "mirror"): "in-sync"}


def test_push_private_creates_a_private_repo(hub, registry, adapters) -> None:
    from huggingface_hub import HfApi

    registry.add(adapters["a"], "team/a")
    repo = new_repo("private")
    registry.push("team/a", repo, private=True)
    assert HfApi(endpoint=hub.url).model_info(repo).private is True


# --- the round trip into a second registry -----------------------------------------------------------


def test_roundtrip_pull_keeps_digest_and_imports_provenance(hub, registry, registry_b, composed) -> None:
    repos = composed.repos
    info = registry_b.pull(repos["c"])  # default endpoint
    assert info.created and info.kind == "pulled"
    weights = hub.files(repos["c"])[WEIGHTS]
    assert info.digest == registry.get("team/c").digest == sha256(weights)

    provenance = registry_b.get(info.ref).provenance
    assert provenance is not None
    assert provenance.method == "exact"
    assert provenance.expression == EXPRESSION
    assert provenance.canonical == registry.get("team/c").provenance.canonical
    expected = {sha256(hub.files(repos[k])[WEIGHTS]): COEFFICIENTS[k] for k in "ab"}
    got = {i.digest: (i.a, i.b) for i in provenance.inputs}
    assert sorted(got) == sorted(expected)
    for digest, (a, b) in expected.items():
        assert got[digest] == (pytest.approx(a), pytest.approx(b))


def test_roundtrip_lineage_external_inputs_become_pulled(hub, registry_b, composed) -> None:
    repos = composed.repos
    digest = {k: sha256(hub.files(repos[k])[WEIGHTS]) for k in "abc"}
    info = registry_b.pull(repos["c"], endpoint=hub.url)

    lineage = registry_b.lineage(info.ref)
    assert lineage.root == info.ref
    nodes = {n.digest: n for n in lineage.nodes}
    assert sorted(nodes) == sorted(digest.values())
    assert nodes[digest["c"]].kind == "pulled" and nodes[digest["c"]].method == "exact"
    assert nodes[digest["a"]].kind == "external" and nodes[digest["b"]].kind == "external"
    edges = {e.input: (e.output, e.method, e.a, e.b) for e in lineage.edges}
    for k in "ab":
        assert edges[nodes[digest[k]].ref] == (info.ref, "exact", pytest.approx(COEFFICIENTS[k][0]),
                                               pytest.approx(COEFFICIENTS[k][1]))

    # pulling an input later turns its external node into an ordinary one
    pulled_a = registry_b.pull(repos["a"])
    assert pulled_a.kind == "pulled" and pulled_a.digest == digest["a"]
    lineage = registry_b.lineage(info.ref)
    nodes = {n.digest: n for n in lineage.nodes}
    assert sorted(nodes) == sorted(digest.values())
    assert nodes[digest["a"]].kind == "pulled" and nodes[digest["a"]].ref == pulled_a.ref
    assert nodes[digest["b"]].kind == "external"
    edges = {e.input: (e.a, e.b) for e in lineage.edges}
    assert set(edges) == {pulled_a.ref, nodes[digest["b"]].ref}
    assert edges[pulled_a.ref] == (pytest.approx(0.7), pytest.approx(0.7))

    contents = {t.digest: t for t in registry_b.contents(info.ref).terms}
    assert contents[digest["a"]].kind == "pulled" and contents[digest["b"]].kind == "external"
    assert contents[digest["b"]].b == pytest.approx(-0.2)

    # with every input registered, the provenance names them by their refs here
    pulled_b = registry_b.pull(repos["b"])
    provenance = registry_b.get(info.ref).provenance
    assert {i.ref: (i.a, i.b) for i in provenance.inputs} == {
        pulled_a.ref: (pytest.approx(0.7), pytest.approx(0.7)),
        pulled_b.ref: (pytest.approx(0.2), pytest.approx(-0.2)),
    }
    assert all(n.kind == "pulled" for n in registry_b.lineage(info.ref).nodes)
