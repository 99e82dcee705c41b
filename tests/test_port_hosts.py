"""Base (host) models and structural compatibility for porting (SEMANTICS.md section 5).

Hosts are tiny Llama configs written with transformers' own LlamaConfig:
X = tiny-org/tiny-llama (the helpers' model), Y = tiny-org/tiny-llama-v2 (another vocabulary:
embedding shapes differ, attention projections do not), Z = another hidden size (and fewer
key/value heads), W = one layer instead of two, and a config whose architecture transformers
does not know. Expected names and shapes are written from the configs' arithmetic
(q_proj weight [num_heads * head_dim, hidden], v_proj [num_kv_heads * head_dim, hidden]) and
module counts come from building the model on the meta device here, never from the registry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import HOSTS, W_ID, X_DIMS, X_ID, Y_ID, Z_ID, make_ia3, make_lora

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

U_ID = "tiny-org/mystery-model"
LORA_LAYERS = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


# --- independent helpers ----------------------------------------------------------------------


def write_host_config(folder: Path, dims: dict, architecture: str = "LlamaForCausalLM") -> Path:
    """config.json of a Llama host, written by transformers; returns its path."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**dims)
    config.architectures = [architecture]
    config.save_pretrained(folder)
    return folder / "config.json"


def unknown_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps({
        "model_type": "pem-test-mystery", "architectures": ["PemTestMysteryForCausalLM"],
        "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 64,
    }))
    return path


def meta_counts(dims: dict) -> dict[str, list[int]]:
    """Linear and Embedding modules of LlamaForCausalLM built on the meta device: name -> weight shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dims))
    return {
        name: list(module.weight.shape) for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
    }


def add_hosts(registry, tmp_path: Path, *ids: str) -> None:
    for host in ids:
        if host == U_ID:
            registry.add_base(host, config_path=unknown_config(tmp_path / "hosts" / "u"))
        else:
            registry.add_base(host, config_path=write_host_config(tmp_path / "hosts" / host.split("/")[1], HOSTS[host]))


def shapes_in(text: str) -> list[list[int]]:
    """Every [a, b] / (a, b) pair of integers in a message, in order."""
    return [[int(a), int(b)] for a, b in re.findall(r"[\[(]\s*(\d+)\s*,\s*(\d+)\s*[\])]", text)]


def layer_of(entry: str) -> str:
    return entry.split(":", 1)[0].strip()


# --- recording base models --------------------------------------------------------------------


def test_add_base_records_dimensions_architecture_and_structure(registry, tmp_path):
    config_path = write_host_config(tmp_path / "x", X_DIMS)
    info = registry.add_base(X_ID, config_path=config_path)
    assert info.model_id == X_ID
    assert info.revision is None
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads"):
        assert info.dimensions[key] == X_DIMS[key], key
    assert info.structure_known is True
    expected = meta_counts(X_DIMS)
    # 7 projections per layer, embed_tokens and lm_head
    assert len(expected) == 7 * X_DIMS["num_hidden_layers"] + 2
    assert info.adaptable_modules == len(expected)
    assert info.adapters == 0
    assert registry.get_base(X_ID).model_dump() == info.model_dump()


def test_adaptable_module_count_follows_the_config(registry, tmp_path):
    add_hosts(registry, tmp_path, W_ID, Z_ID)
    assert registry.get_base(W_ID).adaptable_modules == len(meta_counts(HOSTS[W_ID])) == 7 + 2
    assert registry.get_base(Z_ID).adaptable_modules == len(meta_counts(HOSTS[Z_ID])) == 7 * 2 + 2
    assert registry.get_base(Z_ID).dimensions["hidden_size"] == 32


def test_list_bases_counts_adapters_per_base(registry, tmp_path):
    add_hosts(registry, tmp_path, Y_ID, X_ID)
    make_lora(tmp_path / "a", seed=1)
    make_lora(tmp_path / "b", seed=2)
    registry.add(tmp_path / "a", "team/a")
    registry.add(tmp_path / "b", "team/b")
    registry.add(tmp_path / "b", "team/b-on-y", base_model=Y_ID)
    bases = registry.list_bases()
    assert [b.model_id for b in bases] == sorted([X_ID, Y_ID])
    counts = {b.model_id: b.adapters for b in bases}
    assert counts == {X_ID: 2, Y_ID: 1}
    assert registry.get_base(X_ID).adapters == 2


def test_add_base_again_refreshes_the_record(registry, tmp_path):
    registry.add_base(X_ID, config_path=write_host_config(tmp_path / "x1", X_DIMS))
    again = registry.add_base(X_ID, config_path=write_host_config(tmp_path / "x2", HOSTS[W_ID]))
    assert again.dimensions["num_hidden_layers"] == 1
    assert again.adaptable_modules == 9
    assert len(registry.list_bases()) == 1


def test_add_base_downloads_config_json_alone_from_the_hub(registry, hub, tmp_path):
    config_path = write_host_config(tmp_path / "hubhost", HOSTS[Y_ID])
    hub.create_repo("port-org/hub-host")
    hub.add_commit("port-org/hub-host", {"config.json": config_path.read_bytes()})
    before = len(hub.requests)
    info = registry.add_base("port-org/hub-host")  # HF_ENDPOINT is the test Hub
    assert info.model_id == "port-org/hub-host"
    assert info.architecture == "LlamaForCausalLM"
    assert info.dimensions["vocab_size"] == 80
    assert info.structure_known and info.adaptable_modules == len(meta_counts(HOSTS[Y_ID]))
    fetched = [path for _, path in hub.requests[before:]]
    assert any("config.json" in p for p in fetched), fetched
    assert not any(p.endswith((".safetensors", ".bin")) for p in fetched), fetched


def test_unknown_architecture_is_recorded_with_structure_unknown(registry, tmp_path):
    info = registry.add_base(U_ID, config_path=unknown_config(tmp_path / "u"))
    assert info.model_type == "pem-test-mystery"
    assert info.architecture == "PemTestMysteryForCausalLM"
    assert info.structure_known is False
    assert info.dimensions["hidden_size"] == 16


def test_get_base_of_an_unrecorded_base_suggests_pem_base_add(registry):
    from registry.errors import UnknownBaseModelError

    with pytest.raises(UnknownBaseModelError, match="pem base add"):
        registry.get_base("nobody/none")


# --- compatibility levels ---------------------------------------------------------------------


def test_port_levels_for_lora(registry, tmp_path):
    add_hosts(registry, tmp_path, X_ID, Y_ID, Z_ID, W_ID, U_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")

    same = registry.check_port("team/a", X_ID)
    assert same.level == "same-base"
    assert (same.module, same.from_base, same.to_base) == ("team/a@1", X_ID, X_ID)

    ok = registry.check_port("team/a", Y_ID)
    assert ok.level == "compatible", ok
    assert ok.missing == [] and ok.mismatched == []
    assert ok.evidence

    # Z: hidden 32, 2 heads -> head_dim 16; q_proj [2*16, 32], v_proj [1*16, 32]; the module needs [16, 16]
    wide = registry.check_port("team/a", Z_ID)
    assert wide.level == "incompatible"
    assert wide.missing == []
    assert sorted(layer_of(m) for m in wide.mismatched) == sorted(LORA_LAYERS)
    host_shapes = {"q_proj": [32, 32], "v_proj": [16, 32]}
    structure_z = meta_counts(HOSTS[Z_ID])
    for entry in wide.mismatched:
        layer = layer_of(entry)
        expected_host = host_shapes[layer.rsplit(".", 1)[1]]
        assert structure_z[layer] == expected_host  # the arithmetic agrees with transformers
        assert shapes_in(entry) == [[16, 16], expected_host], entry

    shallow = registry.check_port("team/a", W_ID)
    assert shallow.level == "incompatible"
    assert shallow.missing == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert shallow.mismatched == []

    unknown = registry.check_port("team/a", U_ID)
    assert unknown.level == "unknown"
    assert any("unknown" in line for line in unknown.evidence), unknown.evidence
    assert unknown.missing == [] and unknown.mismatched == []


def test_port_levels_for_ia3(registry, tmp_path):
    """(IA)^3 vectors: [out, 1] for k/v (output scaling), [1, in] for the feed-forward down_proj."""
    add_hosts(registry, tmp_path, Y_ID, W_ID)
    registry.add(make_ia3(tmp_path / "i", seed=3), "team/i")
    assert registry.check_port("team/i", Y_ID).level == "compatible"
    shallow = registry.check_port("team/i", W_ID)
    assert shallow.level == "incompatible"
    assert shallow.missing == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_ia3_feedforward_layer_checks_the_input_size(registry, tmp_path):
    """A host with another intermediate size: down_proj's input differs ([1, 32] vs in=48)."""
    registry.add_base("tiny-org/tiny-llama-ffn", config_path=write_host_config(
        tmp_path / "ffn", {**X_DIMS, "intermediate_size": 48}))
    registry.add(make_ia3(tmp_path / "i", seed=3), "team/i")
    report = registry.check_port("team/i", "tiny-org/tiny-llama-ffn")
    assert report.level == "incompatible"
    assert report.missing == []
    assert sorted(layer_of(m) for m in report.mismatched) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_lora_on_embeddings_sees_the_vocabulary_change(registry, tmp_path):
    """Y differs from X only in vocab_size: a LoRA on embed_tokens needs [64, 16], Y has [80, 16]."""
    add_hosts(registry, tmp_path, Y_ID)
    registry.add(make_lora(tmp_path / "e", seed=4, target_modules=("embed_tokens", "q_proj")), "team/e")
    report = registry.check_port("team/e", Y_ID)
    assert report.level == "incompatible"
    assert report.missing == []
    assert [layer_of(m) for m in report.mismatched] == ["model.embed_tokens"]
    assert shapes_in(report.mismatched[0]) == [[64, 16], [80, 16]]


def test_check_port_to_an_unrecorded_base_suggests_pem_base_add(registry, tmp_path):
    from registry.errors import UnknownBaseModelError

    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    with pytest.raises(UnknownBaseModelError, match="pem base add"):
        registry.check_port("team/a", "nobody/none")


# --- the command line -------------------------------------------------------------------------


def test_cli_base_add_list_show(run_pem, tmp_path):
    config_path = write_host_config(tmp_path / "y", HOSTS[Y_ID])
    added = run_pem("base", "add", Y_ID, "--config", config_path)
    assert added.exit_code == 0, added.output
    assert Y_ID in added.stdout and "LlamaForCausalLM" in added.stdout
    assert str(len(meta_counts(HOSTS[Y_ID]))) in added.stdout

    listed = run_pem("base", "list", "--json")
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.stdout)
    assert entry["model_id"] == Y_ID and entry["adapters"] == 0

    shown = run_pem("base", "show", Y_ID, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["architecture"] == "LlamaForCausalLM"
    assert data["structure_known"] is True
    assert data["adaptable_modules"] == len(meta_counts(HOSTS[Y_ID]))
    assert data["dimensions"]["vocab_size"] == 80 and data["dimensions"]["hidden_size"] == 16

    text = run_pem("base", "show", Y_ID)
    assert text.exit_code == 0, text.output
    assert "LlamaForCausalLM" in text.stdout and "hidden_size" in text.stdout


def test_cli_base_add_from_the_hub(run_pem, hub, tmp_path):
    config_path = write_host_config(tmp_path / "hubhost", X_DIMS)
    hub.add_commit("port-org/cli-host", {"config.json": config_path.read_bytes()})
    result = run_pem("base", "add", "port-org/cli-host", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_id"] == "port-org/cli-host"
    assert data["adaptable_modules"] == len(meta_counts(X_DIMS))


def test_cli_base_show_unknown_is_one_line_error(run_pem):
    result = run_pem("base", "show", "nobody/none")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "nobody/none" in lines[0] and "pem base add" in lines[0]


# --- edge cases of the report -----------------------------------------------------------------


def test_same_base_when_the_host_revision_is_not_known(registry, tmp_path):
    """SEMANTICS 4.2: one base model is the same id and, where both are known, the same
    revision. A module pinned to X@r1 is on X when X is recorded without a revision."""
    add_hosts(registry, tmp_path, X_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a", base_revision="r1")
    assert registry.check_port("team/a", X_ID).level == "same-base"


def test_same_base_and_other_revision_of_one_host(registry, tmp_path):
    registry.add_base(f"{X_ID}@r2", config_path=write_host_config(tmp_path / "x2", X_DIMS))
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a", base_revision="r2")
    registry.add(make_lora(tmp_path / "b", seed=2), "team/b", base_revision="r1")
    assert registry.check_port("team/a", f"{X_ID}@r2").level == "same-base"
    other = registry.check_port("team/b", f"{X_ID}@r2")
    assert other.level == "compatible"
    assert (other.from_base, other.to_base) == (f"{X_ID}@r1", f"{X_ID}@r2")
    assert registry.get_base(f"{X_ID}@r2").adapters == 1


def test_unknown_structure_evidence_names_what_transformers_cannot_build(registry, tmp_path):
    """transformers is installed here: the evidence must not send the user to install it, and
    should name the architecture that could not be built (README: "the report says how to fix
    that")."""
    import transformers  # noqa: F401  (installed)

    add_hosts(registry, tmp_path, U_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    report = registry.check_port("team/a", U_ID)
    assert report.level == "unknown"
    text = " ".join(report.evidence)
    assert "install transformers" not in text, text
    assert "PemTestMysteryForCausalLM" in text or "pem-test-mystery" in text, text


def test_config_without_architectures_is_not_reported_incompatible(registry, tmp_path):
    """X's own config without `architectures`: the registry cannot build the exact module
    names (README: the config must name its architectures), so it must not claim that X's
    layers are missing from a copy of X; `unknown` (or `compatible`) is right."""
    config_path = write_host_config(tmp_path / "noarch", HOSTS[Y_ID])
    config = json.loads(config_path.read_text())
    del config["architectures"]
    config_path.write_text(json.dumps(config))
    registry.add_base("tiny-org/no-architectures", config_path=config_path)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    report = registry.check_port("team/a", "tiny-org/no-architectures")
    assert report.level in ("unknown", "compatible"), report
