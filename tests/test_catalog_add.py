"""Registering adapters (Registry.add): metadata, versioning, deduplication and digests.

Every expected value comes from how the adapters were built (the arguments given to PEFT),
from the safetensors library, from hashlib, or from the canonical file format written out by
hand below; never from the registry's own code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import BERT_ID, LLAMA_ID, make_ia3, make_lora, tensors, tiny_llama
from registry.errors import PemError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
TORCH_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
LLAMA_PREFIX = "base_model.model.model.layers"
BERT_PREFIX = "base_model.model.bert.encoder.layer"


# --- independent helpers ------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(
    path: Path, entries: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file written by hand, tensors laid out in the order given."""
    header: dict[str, object] = {}
    data = b""
    for name, t in entries:
        raw = tensor_bytes(t)
        header[name] = {"dtype": TORCH_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    raw_header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + data)


def canonical_bytes(named: dict[str, torch.Tensor]) -> bytes:
    """The documented canonical form: tensors sorted by name and packed, header with sorted keys,
    compact JSON, only {"format": "pt"} as metadata, padded with spaces to 8 bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name in sorted(named):
        raw = tensor_bytes(named[name])
        header[name] = {"dtype": TORCH_DTYPES[named[name].dtype], "shape": list(named[name].shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    raw_header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    return struct.pack("<Q", len(raw_header)) + raw_header + data


def with_weights(src: Path, dst: Path, named: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A copy of the adapter folder ``src`` whose weights file holds ``named``."""
    dst.mkdir(parents=True)
    shutil.copyfile(src / CONFIG, dst / CONFIG)
    save_file(named, str(dst / WEIGHTS), metadata=metadata)
    return dst


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG).read_text())
    config.update(changes)
    (dst / CONFIG).write_text(json.dumps(config))
    return dst


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def numel(folder: Path) -> int:
    return sum(t.numel() for t in tensors(folder).values())


def refs(registry) -> list[tuple[str, str]]:
    return [(m.ref, m.digest) for m in registry.list()]


# --- adapters, built once -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("adapters")
    ns = SimpleNamespace()
    ns.llama = make_lora(root / "llama", seed=1)  # r=4, alpha=8, q_proj+v_proj, 2 layers, hidden 16
    ns.llama2 = make_lora(root / "llama2", seed=2)
    ns.bert = make_lora(root / "bert", seed=3, model="bert", r=2, lora_alpha=4, task_type="SEQ_CLS")
    ns.ia3 = make_ia3(root / "ia3", seed=4, task_type="CAUSAL_LM")
    ns.patterns = make_lora(
        root / "patterns", seed=5, r=4, lora_alpha=8, use_rslora=True,
        rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 16},
    )
    ns.dora = make_lora(root / "dora", seed=6, use_dora=True)
    original = tensors(ns.llama)
    ns.bf16 = with_weights(ns.llama, root / "bf16", {k: v.to(torch.bfloat16) for k, v in original.items()})

    from peft import LoHaConfig, get_peft_model

    loha = get_peft_model(tiny_llama(), LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    loha.save_pretrained(root / "loha")
    ns.loha = root / "loha"
    return ns


# --- metadata -----------------------------------------------------------------------------------


def test_add_llama_lora_metadata(registry, ad):
    info = registry.add(ad.llama, "team/llama", task="sentiment", tags={"lang": "en"})
    assert info.created is True
    assert (info.name, info.version, info.ref, info.kind) == ("team/llama", 1, "team/llama@1", "trained")
    assert info.peft_type == "LORA"
    assert info.base_model == LLAMA_ID and info.base_revision is None
    assert info.task == "sentiment" and info.task_type is None
    assert info.rank == 4 and info.lora_alpha == 8.0 and info.use_rslora is False and info.use_dora is False
    assert info.target_modules == ["q_proj", "v_proj"]
    assert info.dtype == "F32"
    assert info.num_parameters == numel(ad.llama) == 2 * 2 * (4 * 16 + 16 * 4)
    assert info.tags == {"lang": "en"}
    assert info.owner == "tester"
    assert info.composable is True

    details = registry.get("team/llama")
    assert details.unsupported == []
    expected_layers = {f"{LLAMA_PREFIX}.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert set(details.layers) == expected_layers
    for layer in expected_layers:
        assert details.layers[layer]["params"] == {"lora_A": [4, 16], "lora_B": [16, 4]}
        assert details.layers[layer]["rank"] == 4
        assert details.layers[layer]["alpha"] == 8.0
        assert details.layers[layer]["scaling"] == pytest.approx(8 / 4)
    assert details.config == json.loads((ad.llama / CONFIG).read_text())


def test_add_bert_lora_metadata(registry, ad):
    info = registry.add(ad.bert, "team/bert")
    assert info.peft_type == "LORA"
    assert info.base_model == BERT_ID
    assert info.task_type == "SEQ_CLS"
    assert info.rank == 2 and info.lora_alpha == 4.0
    assert info.target_modules == ["query", "value"]
    assert info.dtype == "F32"
    # LoRA A/B on query and value of 2 layers, plus the classifier PEFT saves (modules_to_save).
    assert info.num_parameters == numel(ad.bert) == 2 * 2 * (2 * 16 + 16 * 2) + (2 * 16 + 2)
    details = registry.get("team/bert")
    for i in (0, 1):
        for m in ("query", "value"):
            layer = details.layers[f"{BERT_PREFIX}.{i}.attention.self.{m}"]
            assert layer["params"] == {"lora_A": [2, 16], "lora_B": [16, 2]}
            assert layer["rank"] == 2 and layer["alpha"] == 4.0
    # The classifier saved whole (modules_to_save) has no defined arithmetic.
    assert info.composable is False
    assert "modules_to_save" in details.unsupported


def test_add_ia3_metadata(registry, ad):
    info = registry.add(ad.ia3, "team/ia3")
    assert info.peft_type == "IA3"
    assert info.base_model == LLAMA_ID
    assert info.task_type == "CAUSAL_LM"
    assert info.rank is None and info.lora_alpha is None
    assert info.target_modules == ["down_proj", "k_proj", "v_proj"]
    assert info.dtype == "F32"
    assert info.num_parameters == numel(ad.ia3) == 2 * (16 + 16 + 32)
    assert info.composable is True
    details = registry.get("team/ia3")
    assert details.unsupported == []
    expected = {}
    for i in (0, 1):
        expected[f"{LLAMA_PREFIX}.{i}.self_attn.k_proj"] = ([16, 1], False)
        expected[f"{LLAMA_PREFIX}.{i}.self_attn.v_proj"] = ([16, 1], False)
        expected[f"{LLAMA_PREFIX}.{i}.mlp.down_proj"] = ([1, 32], True)
    assert set(details.layers) == set(expected)
    for layer, (shape, feedforward) in expected.items():
        assert details.layers[layer]["params"] == {"ia3_l": shape}
        assert details.layers[layer]["feedforward"] is feedforward


def test_add_rank_and_alpha_patterns(registry, ad):
    shapes = {k: list(v.shape) for k, v in tensors(ad.patterns).items()}
    # what PEFT built (a check of the fixture, from the safetensors library)
    assert shapes[f"{LLAMA_PREFIX}.0.self_attn.q_proj.lora_A.weight"] == [2, 16]
    assert shapes[f"{LLAMA_PREFIX}.1.self_attn.q_proj.lora_A.weight"] == [4, 16]

    info = registry.add(ad.patterns, "team/patterns")
    assert info.rank == 4 and info.lora_alpha == 8.0 and info.use_rslora is True
    layers = registry.get("team/patterns").layers
    expected = {  # layer -> (rank, alpha); rsLoRA scaling is alpha / sqrt(rank)
        f"{LLAMA_PREFIX}.0.self_attn.q_proj": (2, 8.0),
        f"{LLAMA_PREFIX}.1.self_attn.q_proj": (4, 8.0),
        f"{LLAMA_PREFIX}.0.self_attn.v_proj": (4, 16.0),
        f"{LLAMA_PREFIX}.1.self_attn.v_proj": (4, 16.0),
    }
    assert set(layers) == set(expected)
    for layer, (rank, alpha) in expected.items():
        assert layers[layer]["rank"] == rank, layer
        assert layers[layer]["alpha"] == alpha, layer
        assert layers[layer]["params"] == {"lora_A": [rank, 16], "lora_B": [16, rank]}
        assert layers[layer]["scaling"] == pytest.approx(alpha / math.sqrt(rank))


def test_add_base_model_and_revision_overrides(registry, ad):
    info = registry.add(ad.llama, "team/over", base_model="other-org/llama-x", base_revision="abc123")
    assert info.base_model == "other-org/llama-x"
    assert info.base_revision == "abc123"
    config = registry.get("team/over").config
    assert config["base_model_name_or_path"] == "other-org/llama-x"
    assert config["revision"] == "abc123"
    assert registry.list(base_model="other-org/llama-x")[0].ref == "team/over@1"


def test_add_bfloat16_adapter(registry, ad):
    original = tensors(ad.llama)
    assert {t.dtype for t in tensors(ad.bf16).values()} == {torch.bfloat16}
    info = registry.add(ad.bf16, "team/bf16")
    assert info.dtype == "BF16"
    assert info.num_parameters == sum(t.numel() for t in original.values())
    assert info.size_bytes == blob_path(registry.settings.home, info.digest).stat().st_size
    stored = load_file(str(blob_path(registry.settings.home, info.digest)))
    assert set(stored) == set(original)
    for name, t in stored.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, original[name].to(torch.bfloat16))


def test_size_bytes_is_the_stored_blob_size(registry, ad):
    home = registry.settings.home
    for folder, name in ((ad.llama, "t/a"), (ad.ia3, "t/b"), (ad.bert, "t/c")):
        info = registry.add(folder, name)
        blob = blob_path(home, info.digest)
        assert blob.is_file()
        assert info.size_bytes == blob.stat().st_size
        with safe_open(str(blob), "pt") as f:  # header + packed data, nothing else
            data = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        header_len = struct.unpack("<Q", blob.read_bytes()[:8])[0]
        assert info.size_bytes == 8 + header_len + data


# --- versioning ---------------------------------------------------------------------------------


def test_readding_identical_content_returns_the_same_version(registry, ad):
    first = registry.add(ad.llama, "team/x", task="sentiment")
    before = refs(registry)
    files_before = blob_files(registry.settings.home)
    again = registry.add(ad.llama, "team/x", task="sentiment")
    assert again.created is False
    assert (again.ref, again.digest) == (first.ref, first.digest) == ("team/x@1", first.digest)
    assert refs(registry) == before
    assert blob_files(registry.settings.home) == files_before


def test_different_content_under_the_same_name_is_the_next_version(registry, ad):
    first = registry.add(ad.llama, "team/x")
    second = registry.add(ad.llama2, "team/x")
    assert second.created is True
    assert second.version == 2 and second.ref == "team/x@2"
    assert second.digest != first.digest
    assert [m.ref for m in registry.list()] == ["team/x@1", "team/x@2"]
    assert registry.resolve("team/x").ref == "team/x@2"
    assert len(blob_files(registry.settings.home)) == 2


def test_same_tensors_other_config_is_a_new_version_sharing_the_blob(registry, ad, tmp_path):
    alpha16 = with_config(ad.llama, tmp_path / "alpha16", lora_alpha=16)
    first = registry.add(ad.llama, "team/x")
    second = registry.add(alpha16, "team/x")
    assert second.created is True
    assert second.ref == "team/x@2"
    assert second.digest == first.digest
    assert (first.lora_alpha, second.lora_alpha) == (8.0, 16.0)
    assert registry.get("team/x@2").layers[f"{LLAMA_PREFIX}.0.self_attn.q_proj"]["scaling"] == pytest.approx(16 / 4)
    assert len(blob_files(registry.settings.home)) == 1


# --- deduplication and digests ------------------------------------------------------------------


def test_two_names_with_the_same_tensors_share_one_blob(registry, ad):
    a = registry.add(ad.llama, "team/a")
    b = registry.add(ad.llama, "other/b")
    assert a.created and b.created
    assert a.digest == b.digest
    files = blob_files(registry.settings.home)
    assert files == [blob_path(registry.settings.home, a.digest)]
    assert sorted(m.ref for m in registry.list()) == ["other/b@1", "team/a@1"]


def test_digest_is_the_sha256_of_the_canonical_file(registry, ad):
    for folder, name in ((ad.llama, "t/lora"), (ad.ia3, "t/ia3"), (ad.bf16, "t/bf16")):
        info = registry.add(folder, name)
        expected = hashlib.sha256(canonical_bytes(tensors(folder))).hexdigest()
        assert info.digest == expected
        blob = blob_path(registry.settings.home, info.digest)
        assert sha256_file(blob) == info.digest
        assert blob.read_bytes() == canonical_bytes(tensors(folder))
        with safe_open(str(blob), "pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_digest_does_not_depend_on_serialization(registry, ad, tmp_path):
    original = tensors(ad.llama)
    first = registry.add(ad.llama, "team/x")

    # the same tensors through safetensors.torch.save_file, given in reverse order, other metadata
    resaved = with_weights(ad.llama, tmp_path / "resaved", dict(reversed(list(original.items()))),
                           metadata={"format": "pt", "note": "re-saved"})
    # and hand-written: data laid out in reverse name order, header keys in that order, no metadata
    handmade = tmp_path / "handmade"
    handmade.mkdir()
    shutil.copyfile(ad.llama / CONFIG, handmade / CONFIG)
    write_safetensors(handmade / WEIGHTS, sorted(original.items(), reverse=True))
    assert sha256_file(handmade / WEIGHTS) != sha256_file(ad.llama / WEIGHTS)
    for name, t in load_file(str(handmade / WEIGHTS)).items():
        assert torch.equal(t, original[name])

    for folder in (resaved, handmade):
        again = registry.add(folder, "team/x")
        assert again.digest == first.digest
        assert again.created is False and again.ref == "team/x@1"
    assert len(blob_files(registry.settings.home)) == 1

    # one value changed: another digest
    changed = dict(original)
    key = sorted(changed)[0]
    changed[key] = changed[key].clone()
    changed[key][0, 0] += 1.0
    other = registry.add(with_weights(ad.llama, tmp_path / "changed", changed), "team/x")
    assert other.digest != first.digest
    assert other.ref == "team/x@2"
    assert other.digest == hashlib.sha256(canonical_bytes(changed)).hexdigest()


def test_source_records_the_original_file_sha256(registry, ad):
    registry.add(ad.llama, "team/x")
    source = registry.get("team/x").source
    assert source is not None
    assert source["file_sha256"] == sha256_file(ad.llama / WEIGHTS)
    assert Path(source["path"]) == ad.llama.absolute()


# --- types the registry catalogs but cannot compose ---------------------------------------------


def test_loha_is_catalogued_not_composable(registry, ad):
    info = registry.add(ad.loha, "team/loha")
    assert info.peft_type == "LOHA"
    assert info.composable is False
    assert info.base_model == LLAMA_ID
    assert info.target_modules == ["q_proj", "v_proj"]
    assert info.num_parameters == numel(ad.loha) == 2 * 2 * 4 * (4 * 16)
    assert info.dtype == "F32"
    details = registry.get("team/loha")
    assert any("LOHA" in reason for reason in details.unsupported)
    assert registry.list(peft_type="loha")[0].ref == "team/loha@1"


def test_prefix_tuning_is_catalogued_not_composable(registry, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.save_pretrained(tmp_path / "prefix")
    info = registry.add(tmp_path / "prefix", "team/prefix")
    assert info.peft_type == "PREFIX_TUNING"
    assert info.composable is False
    assert info.task_type == "CAUSAL_LM"
    # 3 virtual tokens x (2 layers x 2 (key, value) x hidden 16)
    assert info.num_parameters == numel(tmp_path / "prefix") == 3 * 2 * 2 * 16
    assert any("PREFIX_TUNING" in reason for reason in registry.get("team/prefix").unsupported)


def test_dora_is_registered_not_composable(registry, ad):
    info = registry.add(ad.dora, "team/dora")
    assert info.peft_type == "LORA"
    assert info.use_dora is True
    assert info.composable is False
    assert any("DoRA" in reason for reason in registry.get("team/dora").unsupported)
    # the magnitude vectors are parameters too
    assert info.num_parameters == numel(ad.dora) == 2 * 2 * (4 * 16 + 16 * 4 + 16)


# --- failures leave nothing behind ----------------------------------------------------------------


def test_a_registration_the_database_refuses_leaves_no_blob(registry, ad):
    """Values longer than their columns (task 128, tag value 512, base model 255 characters):
    either stored whole, or refused with a PemError before anything reaches the store."""
    for field, value in (("task", "t" * 200), ("tags", {"note": "v" * 600}), ("base_model", "org/" + "m" * 300)):
        name = f"team/long-{field}"
        files_before, modules_before = blob_files(registry.settings.home), refs(registry)
        try:
            info = registry.add(ad.llama, name, **{field: value})
        except PemError:
            assert refs(registry) == modules_before, field
            assert blob_files(registry.settings.home) == files_before, field
            assert list((registry.settings.home / "blobs" / "tmp").glob("*")) == [], field
        else:
            assert getattr(registry.get(name), field) == value, field
            assert info.ref == f"{name}@1"
