"""Finding, exporting and removing modules: list filters, references, export, rm.

Expected values come from how the catalog was filled (written out by hand), from PEFT (which
loads the exported folders), from safetensors and hashlib; never from the registry's own code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import BERT_ID, LLAMA_ID, make_ia3, make_lora, tensors, tiny_bert, tiny_llama
from registry.errors import (
    AmbiguousReferenceError,
    InvalidNameError,
    ModuleInUseError,
    PemError,
    UnknownModuleError,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def refs(modules) -> list[str]:
    return [m.ref for m in modules]


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("adapters")
    return SimpleNamespace(
        llama4=make_lora(root / "llama4", seed=11, r=4),
        llama8=make_lora(root / "llama8", seed=12, r=8, lora_alpha=16),
        bert=make_lora(root / "bert", seed=13, model="bert", r=2, lora_alpha=4, task_type="SEQ_CLS"),
        ia3=make_ia3(root / "ia3", seed=14),
    )


@pytest.fixture
def catalog(registry, ad):
    """team/llama@1 (r4), team/llama@2 (r8), team/bert@1, other/ia3@1, each with a task and tags."""
    registry.add(ad.llama4, "team/llama", task="sentiment", tags={"lang": "en", "tier": "gold"})
    registry.add(ad.llama8, "team/llama", task="sentiment", tags={"lang": "en"})
    registry.add(ad.bert, "team/bert", task="nli", tags={"lang": "de", "tier": "gold"})
    registry.add(ad.ia3, "other/ia3", task="sentiment", tags={"lang": "en", "tier": "gold"})
    return registry


ALL = ["other/ia3@1", "team/bert@1", "team/llama@1", "team/llama@2"]


# --- list ---------------------------------------------------------------------------------------


def test_list_everything_sorted_by_name_then_version(catalog):
    assert refs(catalog.list()) == ALL


LIST_CASES = [
    ({"base_model": BERT_ID}, ["team/bert@1"]),
    ({"base_model": LLAMA_ID}, ["other/ia3@1", "team/llama@1", "team/llama@2"]),
    ({"base_model": "nobody/nothing"}, []),
    ({"peft_type": "LORA"}, ["team/bert@1", "team/llama@1", "team/llama@2"]),
    ({"peft_type": "lora"}, ["team/bert@1", "team/llama@1", "team/llama@2"]),
    ({"peft_type": "LoRA"}, ["team/bert@1", "team/llama@1", "team/llama@2"]),
    ({"peft_type": "ia3"}, ["other/ia3@1"]),
    ({"peft_type": "IA3"}, ["other/ia3@1"]),
    ({"peft_type": "(IA)^3"}, ["other/ia3@1"]),
    ({"peft_type": "loha"}, []),
    ({"task": "sentiment"}, ["other/ia3@1", "team/llama@1", "team/llama@2"]),
    ({"task": "nli"}, ["team/bert@1"]),
    ({"rank": 4}, ["team/llama@1"]),
    ({"rank": 8}, ["team/llama@2"]),
    ({"rank": 2}, ["team/bert@1"]),
    ({"rank": 16}, []),
    ({"tags": {"lang": "en"}}, ["other/ia3@1", "team/llama@1", "team/llama@2"]),
    ({"tags": {"lang": "en", "tier": "gold"}}, ["other/ia3@1", "team/llama@1"]),
    ({"tags": {"tier": "gold"}}, ["other/ia3@1", "team/bert@1", "team/llama@1"]),
    ({"tags": {"lang": "fr"}}, []),
    ({"tags": {"lang": "de", "tier": "silver"}}, []),
    ({"kind": "trained"}, ALL),
    ({"kind": "derived"}, []),
    ({"latest": True}, ["other/ia3@1", "team/bert@1", "team/llama@2"]),
    ({"latest": True, "peft_type": "lora"}, ["team/bert@1", "team/llama@2"]),
    ({"task": "sentiment", "peft_type": "lora", "tags": {"tier": "gold"}}, ["team/llama@1"]),
]


def test_list_filters(catalog):
    for filters, expected in LIST_CASES:
        assert refs(catalog.list(**filters)) == expected, filters


# --- get and references -------------------------------------------------------------------------


def test_get_latest_and_given_version(catalog, ad):
    latest = catalog.get("team/llama")
    assert latest.ref == "team/llama@2"
    assert latest.rank == 8 and latest.lora_alpha == 16.0
    assert latest.tags == {"lang": "en"}
    first = catalog.get("team/llama@1")
    assert first.ref == "team/llama@1"
    assert first.rank == 4 and first.lora_alpha == 8.0
    assert first.tags == {"lang": "en", "tier": "gold"}
    assert first.task == "sentiment"
    assert first.provenance is None
    original_file = ad.llama4 / "adapter_model.safetensors"
    assert first.source["file_sha256"] == hashlib.sha256(original_file.read_bytes()).hexdigest()
    assert catalog.resolve("team/llama").ref == "team/llama@2"
    assert catalog.resolve("team/llama@1").ref == "team/llama@1"


def test_digest_prefix_references(catalog, ad):
    digest = catalog.get("team/bert@1").digest
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    for prefix in (digest[:8], digest[:12], digest, digest[:10].upper()):
        assert catalog.resolve(f"sha256:{prefix}").ref == "team/bert@1"
        assert catalog.get(f"sha256:{prefix}").digest == digest


def test_digest_prefix_shared_by_two_names_is_ambiguous(catalog, ad):
    catalog.add(ad.ia3, "team/ia3-copy")
    digest = catalog.get("other/ia3").digest
    assert catalog.get("team/ia3-copy").digest == digest
    with pytest.raises(AmbiguousReferenceError) as exc:
        catalog.resolve(f"sha256:{digest[:8]}")
    message = str(exc.value)
    assert "other/ia3@1" in message and "team/ia3-copy@1" in message
    with pytest.raises(AmbiguousReferenceError):
        catalog.get(f"sha256:{digest}")


def test_unknown_references(catalog):
    # a digest prefix nobody has
    digests = {m.digest for m in catalog.list()}
    prefix = next(p for p in ("00000000", "ffffffff", "12345678") if not any(d.startswith(p) for d in digests))
    with pytest.raises(UnknownModuleError):
        catalog.resolve(f"sha256:{prefix}")

    # a name close to a registered one: suggested
    with pytest.raises(UnknownModuleError) as exc:
        catalog.get("team/lama")
    assert "did you mean" in str(exc.value)
    assert "team/llama" in str(exc.value)
    # nothing close: no suggestion
    with pytest.raises(UnknownModuleError) as exc:
        catalog.get("zzz/qqqqqqq")
    assert "did you mean" not in str(exc.value)

    # a version that does not exist: the existing ones are listed
    with pytest.raises(UnknownModuleError) as exc:
        catalog.get("team/llama@5")
    assert "team/llama" in str(exc.value)
    assert "1, 2" in str(exc.value)


INVALID_REFERENCES = [
    "noslash", "team/", "/x", "a//b", "team/x@0", "team/x@", "team/x@1@2", "sha256:abc", "sha256:xyz12345",
    "sha256:" + "a" * 65, "team/-x", "te..am/x", "team/x y", "",
]


def test_invalid_references(catalog):
    for ref in INVALID_REFERENCES:
        with pytest.raises(InvalidNameError):
            catalog.get(ref)
            pytest.fail(f"{ref!r} was accepted")


# --- export -------------------------------------------------------------------------------------


def _lora_or_ia3_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


@pytest.mark.parametrize(
    "ref, folder, base, inputs",
    [
        ("team/llama@1", "llama4", tiny_llama, {"input_ids": torch.tensor([[1, 5, 9, 33, 2, 7]])}),
        ("other/ia3@1", "ia3", tiny_llama, {"input_ids": torch.tensor([[1, 5, 9, 33, 2, 7]])}),
        ("team/bert@1", "bert", tiny_bert, {"input_ids": torch.tensor([[2, 17, 40, 3]])}),
    ],
)
def test_export_loads_in_peft_like_the_original(catalog, ad, tmp_path, ref, folder, base, inputs):
    from peft import PeftModel

    original_folder = getattr(ad, folder)
    target = tmp_path / "exported"
    returned = catalog.export(ref, target)
    assert Path(returned) == target
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    exported = PeftModel.from_pretrained(base(), target).eval()
    from_original = PeftModel.from_pretrained(base(), original_folder).eval()

    saved = tensors(original_folder)
    loaded = _lora_or_ia3_state(exported)
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        assert loaded[name].dtype == value.dtype, name
        assert torch.equal(loaded[name], value), name

    with torch.no_grad():
        out_exported = exported(**inputs).logits
        out_original = from_original(**inputs).logits
        out_base = base()(**inputs).logits
    assert torch.equal(out_exported, out_original)
    assert not torch.allclose(out_exported, out_base)  # the adapter does something: the check means something


def test_export_latest_into_an_existing_empty_folder(catalog, ad, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    catalog.export("team/llama", target)  # no version: the latest
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    exported = tensors(target)
    expected = tensors(ad.llama8)
    assert set(exported) == set(expected)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_export_refusals_change_nothing(catalog, tmp_path):
    parent = tmp_path / "exports"
    # a non-empty folder
    target = parent / "busy"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("keep me")
    (target / "adapter_config.json").write_text("{}")
    with pytest.raises(PemError):
        catalog.export("team/llama", target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert (target / "adapter_config.json").read_text() == "{}"
    # a file
    afile = parent / "afile"
    afile.write_text("x")
    with pytest.raises(PemError):
        catalog.export("team/llama", afile)
    assert afile.read_text() == "x"
    # an unknown module: no folder is created
    with pytest.raises(UnknownModuleError):
        catalog.export("team/nothing", parent / "out")
    assert sorted(p.name for p in parent.iterdir()) == ["afile", "busy"]  # no staging folder left behind


# --- remove -------------------------------------------------------------------------------------


def test_remove_deletes_the_row_and_its_unshared_blob(catalog):
    home = catalog.settings.home
    removed = catalog.get("team/bert@1")
    assert blob_path(home, removed.digest).is_file()
    files_before = blob_files(home)
    info = catalog.remove("team/bert@1")
    assert info.ref == "team/bert@1"
    assert refs(catalog.list()) == ["other/ia3@1", "team/llama@1", "team/llama@2"]
    assert not blob_path(home, removed.digest).exists()
    assert blob_files(home) == [p for p in files_before if p != blob_path(home, removed.digest)]
    with pytest.raises(UnknownModuleError):
        catalog.get("team/bert")


def test_remove_by_name_alone_is_refused(catalog):
    files = blob_files(catalog.settings.home)
    with pytest.raises(InvalidNameError, match=r"team/llama names no version: .*pem rm team/llama@2.*versions 1, 2"):
        catalog.remove("team/llama")
    assert refs(catalog.list()) == ALL
    assert blob_files(catalog.settings.home) == files


def test_remove_keeps_a_blob_another_module_uses(catalog, ad):
    home = catalog.settings.home
    catalog.add(ad.ia3, "team/ia3-copy")
    digest = catalog.get("other/ia3").digest
    catalog.remove("other/ia3@1")
    assert blob_path(home, digest).is_file()
    assert catalog.get("team/ia3-copy").digest == digest
    catalog.remove("team/ia3-copy@1")
    assert not blob_path(home, digest).exists()
    assert refs(catalog.list()) == ["team/bert@1", "team/llama@1", "team/llama@2"]


def _derive(registry, output_ref: str, input_refs: list[str]) -> None:
    """Record ``output_ref`` as derived from ``input_refs`` (as the composition engine would)."""
    from registry.db.models import Derivation, DerivationInput, Module

    def row(session: Session, ref: str) -> Module:
        ns_name, version = ref.split("@")
        ns, name = ns_name.split("/")
        return session.scalars(
            select(Module).where(Module.namespace == ns, Module.name == name, Module.version == int(version))
        ).one()

    with Session(registry.engine) as session, session.begin():
        output = row(session, output_ref)
        session.add(Derivation(
            module_id=output.id, expression=" + ".join(input_refs), canonical=" + ".join(input_refs),
            method="linear", method_version=1, parameters={}, results={}, environment={},
            identity="0" * 64,
        ))
        session.flush()
        for position, ref in enumerate(input_refs):
            source = row(session, ref)
            session.add(DerivationInput(
                module_id=output.id, position=position, input_id=source.id, input_digest=source.digest, a=1.0, b=1.0,
            ))


def test_remove_refuses_a_module_others_were_derived_from(catalog):
    home = catalog.settings.home
    _derive(catalog, "team/llama@2", ["team/llama@1"])
    provenance = catalog.get("team/llama@2").provenance
    assert provenance is not None and [i.ref for i in provenance.inputs] == ["team/llama@1"]

    digest = catalog.get("team/llama@1").digest
    with pytest.raises(ModuleInUseError) as exc:
        catalog.remove("team/llama@1")
    assert "team/llama@2" in str(exc.value)
    assert refs(catalog.list()) == ALL
    assert blob_path(home, digest).is_file()

    # once the derived module is gone, its input can go
    catalog.remove("team/llama@2")
    catalog.remove("team/llama@1")
    assert refs(catalog.list()) == ["other/ia3@1", "team/bert@1"]
    assert not blob_path(home, digest).exists()


def test_remove_unknown_or_invalid_reference(catalog):
    files = blob_files(catalog.settings.home)
    with pytest.raises(UnknownModuleError):
        catalog.remove("team/nothing@1")
    with pytest.raises(UnknownModuleError):
        catalog.remove("team/llama@9")
    with pytest.raises(InvalidNameError):
        catalog.remove("team//llama")
    assert refs(catalog.list()) == ALL
    assert blob_files(catalog.settings.home) == files
