"""The registry side of the vLLM plugin (registry.serving.pinning), without vLLM: references
pinned to digests, one export per digest checked against the digest, repairs that never delete
a served folder, refusals with their reasons. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import LLAMA_ID, make_ia3, make_lora
from registry import Registry
from registry.config import ServingSettings
from registry.errors import ConfigurationError
from registry.serving.pinning import Pinner, Refusal

SERVING_VARS = ("PEM_HOME", "PEM_DATABASE_URL", "PEM_REGISTRY_URL", "PEM_VLLM_BASE_MODEL", "PEM_VLLM_NAMESPACES",
                "PEM_VLLM_CACHE", "PEM_VLLM_POLL_SECONDS", "PEM_VLLM_SERVER_URL")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def settings(monkeypatch, tmp_path):
    for var in SERVING_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PEM_HOME", str(tmp_path / "unused-home"))
    monkeypatch.setenv("PEM_VLLM_CACHE", str(tmp_path / "served"))
    return ServingSettings.from_environment()


@pytest.fixture
def modules(registry, tmp_path):
    registry.add(make_lora(tmp_path / "x1", seed=1), "team/x")
    registry.add(make_lora(tmp_path / "x2", seed=2), "team/x")
    registry.add(make_lora(tmp_path / "dora", seed=3, use_dora=True), "team/dora")
    registry.add(make_ia3(tmp_path / "ia3", seed=4), "team/ia3")
    registry.set_alias("team/x", "prod", 1)
    return registry


def pinner_for(registry, settings) -> Pinner:
    return Pinner(settings, lambda: Registry.open(registry.settings.home, database_url=registry.settings.database_url))


def test_a_reference_is_pinned_to_its_digest_and_exported_once(modules, settings):
    pinner = pinner_for(modules, settings)
    v1 = modules.resolve("team/x@1")
    pinned = pinner.pin("team/x@prod", LLAMA_ID)
    assert (pinned.ref, pinned.digest, pinned.folder.parent) == ("team/x@1", v1.digest, settings.cache / v1.digest)
    assert sha256_of(pinned.folder / "adapter_model.safetensors") == v1.digest
    assert json.loads((pinned.folder / "adapter_config.json").read_text()) == modules.get("team/x@1").config
    inode = (pinned.folder / "adapter_model.safetensors").stat().st_ino
    # Another reference to the same digest shares the folder; nothing is written again.
    again = pinner.pin(f"sha256:{v1.digest[:12]}", LLAMA_ID)
    assert again.folder == pinned.folder and (again.folder / "adapter_model.safetensors").stat().st_ino == inode
    assert pinned.movable and not again.movable and pinner.pin("team/x@1", LLAMA_ID).movable is False
    assert sorted(p.name for p in settings.cache.iterdir()) == [v1.digest]  # no staging left behind
    assert len(list((settings.cache / v1.digest).iterdir())) == 1
    pinner.close()


def test_same_tensors_with_another_config_get_their_own_folder(modules, settings, tmp_path):
    """The digest covers tensors only; lora_alpha changes the adapter, so it must not share a
    folder (nor rewrite the one vLLM already reads)."""
    loud = modules.add(make_lora(tmp_path / "loud", seed=1, lora_alpha=32), "team/loud")
    twin = modules.add(make_lora(tmp_path / "twin", seed=1), "team/twin")  # same tensors and config as team/x@1
    v1 = modules.resolve("team/x@1")
    assert loud.digest == twin.digest == v1.digest
    pinner = pinner_for(modules, settings)
    quiet = pinner.pin("team/x@1", LLAMA_ID).folder
    quiet_config = (quiet / "adapter_config.json").read_text()
    loud_folder = pinner.pin("team/loud", LLAMA_ID).folder
    assert loud_folder != quiet and (quiet / "adapter_config.json").read_text() == quiet_config
    assert json.loads((loud_folder / "adapter_config.json").read_text())["lora_alpha"] == 32
    assert json.loads(quiet_config)["lora_alpha"] == 8
    # Sharing the digest is no ambiguity for the export: each module is exported by its version.
    assert pinner.pin("team/twin", LLAMA_ID).folder == quiet
    # A digest reference naming several modules is the registry's ambiguity, refused as such.
    with pytest.raises(Refusal, match=f"ambiguous: sha256:{v1.digest[:12]} matches 3 modules"):
        pinner.pin(f"sha256:{v1.digest[:12]}", LLAMA_ID)
    pinner.close()


def test_a_damaged_export_is_repaired_in_place_never_deleted(modules, settings):
    pinner = pinner_for(modules, settings)
    pinned = pinner.pin("team/x@1", LLAMA_ID)
    weights = pinned.folder / "adapter_model.safetensors"
    folder_inode = pinned.folder.stat().st_ino
    weights.write_bytes(b"damaged")
    (pinned.folder / "adapter_config.json").write_text("{}")
    repaired = pinner.pin("team/x@1", LLAMA_ID)
    assert repaired.folder == pinned.folder and pinned.folder.stat().st_ino == folder_inode
    assert sha256_of(weights) == pinned.digest
    assert json.loads((pinned.folder / "adapter_config.json").read_text()) == modules.get("team/x@1").config
    pinner.close()


def test_alias_moves_and_removals_are_seen_by_current_digest(modules, settings):
    pinner = pinner_for(modules, settings)
    assert pinner.current_digest("team/x@prod") == modules.resolve("team/x@1").digest
    modules.set_alias("team/x", "prod", 2)
    assert pinner.current_digest("team/x@prod") == modules.resolve("team/x@2").digest
    modules.remove_alias("team/x", "prod")
    assert pinner.current_digest("team/x@prod") is None
    pinner.close()


@pytest.mark.parametrize(
    ("name", "changes", "reason"),
    [
        ("team/nope", {}, "unknown in the registry: no module named team/nope"),
        ("team/dora", {}, "team/dora@1 is a DoRA module"),
        ("team/ia3", {}, "team/ia3@1 is of type IA3; vLLM serves LoRA only"),
        ("team/x@1", {"base_model": "org/other"}, f"team/x@1 is for base model '{LLAMA_ID}', this server serves 'org/other'"),
        ("team/x@1", {"namespaces": frozenset({"lab"})}, "namespace 'team' of team/x@1 is not in PEM_VLLM_NAMESPACES (lab)"),
        ("x", {}, "'x' is not a registry reference"),
    ],
)
def test_refusals_name_their_reason_and_export_nothing(modules, settings, name, changes, reason):
    pinner = pinner_for(modules, replace(settings, **changes))
    with pytest.raises(Refusal) as refused:
        pinner.pin(name, LLAMA_ID)
    assert str(refused.value).startswith(reason)
    assert not settings.cache.exists() or not any(settings.cache.iterdir())
    pinner.close()


def test_a_digest_reference_outside_the_allowed_namespaces_is_refused(modules, settings):
    pinner = pinner_for(modules, replace(settings, namespaces=frozenset({"lab"})))
    with pytest.raises(Refusal, match="namespace 'team' of sha256:"):
        pinner.pin(f"sha256:{modules.resolve('team/x@1').digest}", LLAMA_ID)


def test_an_unreachable_registry_is_a_refusal_and_the_next_call_reconnects(settings, tmp_path):
    home = tmp_path / "later"
    pinner = Pinner(settings, lambda: Registry.open(home))
    with pytest.raises(Refusal, match="registry unreachable: no registry at"):
        pinner.pin("team/x", LLAMA_ID)
    with pytest.raises(Refusal, match="registry unreachable"):
        pinner.current_digest("team/x")
    registry = Registry.init(home)
    registry.add(make_lora(tmp_path / "x", seed=1), "team/x")
    assert pinner.pin("team/x", LLAMA_ID).digest == registry.resolve("team/x").digest
    pinner.close()
    registry.close()


def test_an_unreachable_database_server_is_a_refusal(settings):
    pinner = Pinner(settings, lambda: Registry.open(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none"))
    with pytest.raises(Refusal, match="registry unreachable"):
        pinner.pin("team/x", LLAMA_ID)


def test_serving_settings_name_the_registry_explicitly_or_not_at_all(monkeypatch):
    for var in SERVING_VARS:
        monkeypatch.delenv(var, raising=False)
    assert ServingSettings.from_environment().registry_named is None  # never the default home
    monkeypatch.setenv("PEM_DATABASE_URL", "sqlite:////tmp/x.db")
    monkeypatch.setenv("PEM_VLLM_NAMESPACES", " team, lab ,")
    found = ServingSettings.from_environment()
    assert (found.registry_named, found.namespaces, found.poll_seconds) == ("PEM_DATABASE_URL", {"team", "lab"}, 10.0)
    for bad in ("0", "61", "soon", "nan"):
        monkeypatch.setenv("PEM_VLLM_POLL_SECONDS", bad)
        with pytest.raises(ConfigurationError, match="PEM_VLLM_POLL_SECONDS"):
            ServingSettings.from_environment()


def test_an_unwritable_cache_is_a_refusal(modules, settings, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    pinner = pinner_for(modules, replace(settings, cache=blocker / "served"))
    with pytest.raises(Refusal, match=f"cannot write the export cache {blocker / 'served'}"):
        pinner.pin("team/x@1", LLAMA_ID)
    pinner.close()
