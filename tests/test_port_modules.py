"""Porting modules between hosts (SEMANTICS.md section 5) and what follows from it: shared
blobs, recorded provenance, PEFT loading on the new host, composition across hosts, lineage,
contents, verify, rm, and the `pem port` command.

Hosts X = tiny-org/tiny-llama (the helpers' model, vocab 64) and Y = tiny-org/tiny-llama-v2
(vocab 80, same attention and MLP shapes) are compatible; Z (hidden 32) and W (one layer) are
not. Expected tensors and outputs are computed here from the input adapters' files with
SEMANTICS.md's formulas and a plain (non-PEFT) forward pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from helpers import HOSTS, W_ID, X_DIMS, X_ID, Y_ID, Z_ID, make_ia3, make_lora, tensors

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# --- independent helpers ----------------------------------------------------------------------


def llama_config(host: str):
    from transformers import LlamaConfig

    config = LlamaConfig(**HOSTS[host])
    config.architectures = ["LlamaForCausalLM"]
    return config


def host_model(host: str, seed: int = 0):
    """A real (random) model of a host, named as the host."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(host))
    model.name_or_path = model.config._name_or_path = host
    return model.eval()


def add_hosts(registry, tmp_path: Path, *hosts: str) -> None:
    for host in hosts:
        folder = tmp_path / "hosts" / host.split("/")[1]
        llama_config(host).save_pretrained(folder)
        registry.add_base(host, config_path=folder / "config.json")


def make_lora_on(host: str, directory: Path, *, seed: int, r: int, lora_alpha: float) -> Path:
    """A LoRA saved from a model of ``host`` (so natively trained there), A and B random."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(host_model(host), LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(directory)
    return directory


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_files(home: Path) -> list[Path]:
    root = home / "blobs" / "sha256"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def loaded_adapter_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors PEFT holds after loading, named as in the saved file."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def lora_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, s) in float64, s = lora_alpha / r from the folder's own config."""
    config = json.loads((folder / CONFIG).read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("use_rslora")
    named = tensors(folder)
    out = {}
    for key in named:
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            a = named[key].double()
            b = named[f"{PREFIX}{module}.lora_B.weight"].double()
            out[module] = (a, b, config["lora_alpha"] / config["r"])
    return out


# --- porting ----------------------------------------------------------------------------------


def test_port_makes_a_ported_module_sharing_the_blob(registry, home, tmp_path):
    add_hosts(registry, tmp_path, X_ID, Y_ID)
    folder = make_lora(tmp_path / "a", seed=1)
    original = registry.add(folder, "team/a", task="sentiment")
    files_before = store_files(home)
    assert len(files_before) == 1

    ported = registry.port("team/a", Y_ID, "team/a-v2")
    assert ported.created
    assert ported.ref == "team/a-v2@1"
    assert ported.kind == "ported"
    assert ported.base_model == Y_ID
    assert ported.digest == original.digest
    assert store_files(home) == files_before  # one file in the store for both
    assert sha256_file(files_before[0]) == original.digest
    assert (ported.peft_type, ported.rank, ported.lora_alpha) == ("LORA", 4, 8)
    assert sorted(ported.target_modules) == ["q_proj", "v_proj"]

    details = registry.get("team/a-v2")
    assert details.config["base_model_name_or_path"] == Y_ID
    assert details.layers.keys() == registry.get("team/a").layers.keys()
    prov = details.provenance
    assert prov is not None and prov.method == "port"
    assert prov.parameters["from"] == X_ID
    assert prov.parameters["to"] == Y_ID
    assert prov.parameters["level"] == "compatible"
    assert isinstance(prov.parameters["evidence"], list) and prov.parameters["evidence"]
    assert [(i.ref, i.digest, i.a, i.b) for i in prov.inputs] == [("team/a@1", original.digest, 1.0, 1.0)]

    # the original is untouched and both are listed by their own bases
    assert registry.get("team/a").base_model == X_ID
    assert [m.ref for m in registry.list(base_model=Y_ID)] == ["team/a-v2@1"]
    assert [m.ref for m in registry.list(kind="ported")] == ["team/a-v2@1"]
    assert registry.get_base(Y_ID).adapters == 1
    assert registry.get_base(X_ID).adapters == 1

    exported = registry.export("team/a-v2", tmp_path / "out")
    assert json.loads((exported / CONFIG).read_text())["base_model_name_or_path"] == Y_ID
    assert (exported / WEIGHTS).read_bytes() == files_before[0].read_bytes()


def test_porting_again_returns_the_same_module(registry, tmp_path):
    add_hosts(registry, tmp_path, Y_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    first = registry.port("team/a", Y_ID, "team/a-v2")
    again = registry.port("team/a", Y_ID, "team/a-v2")
    assert again.ref == first.ref and again.created is False
    assert len(registry.list()) == 2


@pytest.mark.parametrize("host", [Z_ID, W_ID])
def test_port_to_an_incompatible_host_is_refused_and_writes_nothing(registry, home, tmp_path, host):
    from registry.errors import IncompatibleModulesError, UnknownModuleError

    add_hosts(registry, tmp_path, host)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    files_before = store_files(home)
    with pytest.raises(IncompatibleModulesError) as caught:
        registry.port("team/a", host, "team/a-moved")
    message = str(caught.value)
    assert host in message and "incompatible" in message
    assert "model.layers.1.self_attn.q_proj" in message
    assert [m.ref for m in registry.list()] == ["team/a@1"]
    assert store_files(home) == files_before
    with pytest.raises(UnknownModuleError):
        registry.resolve("team/a-moved")
    assert registry.get_base(host).adapters == 0


def test_port_to_a_host_of_unknown_structure_is_refused(registry, tmp_path):
    from registry.errors import IncompatibleModulesError

    config = tmp_path / "u" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"model_type": "pem-test-mystery", "architectures": ["PemTestMysteryForCausalLM"]}))
    registry.add_base("tiny-org/mystery", config_path=config)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    with pytest.raises(IncompatibleModulesError, match="unknown"):
        registry.port("team/a", "tiny-org/mystery", "team/a-mystery")
    assert [m.ref for m in registry.list()] == ["team/a@1"]


def test_ported_lora_loads_in_peft_on_the_new_host(registry, tmp_path):
    from peft import PeftModel

    add_hosts(registry, tmp_path, Y_ID)
    folder = make_lora(tmp_path / "a", seed=5, r=2, lora_alpha=6)
    registry.add(folder, "team/a")
    registry.port("team/a", Y_ID, "team/a-v2")
    exported = registry.export("team/a-v2", tmp_path / "out")
    model = PeftModel.from_pretrained(host_model(Y_ID), exported)
    loaded = loaded_adapter_tensors(model)
    original = tensors(folder)
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    assert model.get_base_model().get_input_embeddings().num_embeddings == 80  # really Y's model


def test_ported_ia3_loads_in_peft_on_the_new_host(registry, tmp_path):
    from peft import PeftModel

    add_hosts(registry, tmp_path, Y_ID)
    folder = make_ia3(tmp_path / "i", seed=6)
    registry.add(folder, "team/i")
    ported = registry.port("team/i", Y_ID, "team/i-v2")
    assert ported.kind == "ported" and ported.peft_type == "IA3" and ported.base_model == Y_ID
    exported = registry.export("team/i-v2", tmp_path / "out")
    model = PeftModel.from_pretrained(host_model(Y_ID), exported)
    loaded = loaded_adapter_tensors(model)
    original = tensors(folder)
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key


def test_removing_the_ported_module_keeps_the_shared_blob(registry, home, tmp_path):
    add_hosts(registry, tmp_path, Y_ID)
    folder = make_lora(tmp_path / "a", seed=1)
    original = registry.add(folder, "team/a")
    registry.port("team/a", Y_ID, "team/a-v2")
    registry.remove("team/a-v2@1")
    assert [p.name for p in store_files(home)] == [original.digest[2:]]
    assert registry.verify().ok
    exported = registry.export("team/a", tmp_path / "out")
    assert sha256_file(exported / WEIGHTS) == original.digest


# --- composition across hosts -----------------------------------------------------------------


def test_composition_across_bases_fails_until_one_input_is_ported(registry, tmp_path):
    from registry.errors import IncompatibleModulesError

    add_hosts(registry, tmp_path, Y_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")  # on X
    registry.add(make_lora_on(Y_ID, tmp_path / "b", seed=2, r=4, lora_alpha=8), "team/b")  # native to Y
    assert registry.get("team/b").base_model == Y_ID

    report = registry.check("team/a + team/b")
    assert not report.composable
    with pytest.raises(IncompatibleModulesError) as caught:
        registry.compose("team/a + team/b", "team/ab")
    message = str(caught.value)
    assert X_ID in message and Y_ID in message and "pem port" in message
    assert [m.ref for m in registry.list()] == ["team/a@1", "team/b@1"]

    registry.port("team/a", Y_ID, "team/a-v2")
    composed = registry.compose("team/a-v2 + team/b", "team/ab")
    assert composed.kind == "derived" and composed.base_model == Y_ID


def test_end_to_end_port_compose_export_and_run_on_the_new_host(registry, tmp_path):
    """X -> Y port, exact composition with a module native to Y, PEFT outputs on Y's model
    against W + dW computed by hand, then lineage, contents, verify and rm."""
    from peft import PeftModel

    from registry.errors import ModuleInUseError

    add_hosts(registry, tmp_path, X_ID, Y_ID)
    a_folder = make_lora(tmp_path / "a", seed=11, r=4, lora_alpha=8)  # on X, s = 2
    b_folder = make_lora_on(Y_ID, tmp_path / "b", seed=12, r=2, lora_alpha=6)  # on Y, s = 3
    a = registry.add(a_folder, "team/a")
    b = registry.add(b_folder, "team/b")
    ported = registry.port("team/a", Y_ID, "port/a")
    composed = registry.compose("0.5*port/a - 0.7*team/b", "team/mix", method="exact")
    assert composed.base_model == Y_ID and composed.rank == 6

    # outputs of Y's model with the composed module, against a plain model with W + dW
    exported = registry.export("team/mix", tmp_path / "mix")
    ids = torch.tensor([[1, 5, 9, 63, 2, 40, 7]])
    peft_model = PeftModel.from_pretrained(host_model(Y_ID, seed=3), exported).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits

    fa, fb = lora_factors(a_folder), lora_factors(b_folder)
    assert fa.keys() == fb.keys()
    plain = host_model(Y_ID, seed=3).double()
    with torch.no_grad():
        for module, (a_a, b_a, s_a) in fa.items():
            a_b, b_b, s_b = fb[module]
            dw = 0.5 * s_a * (b_a @ a_a) - 0.7 * s_b * (b_b @ a_b)
            plain.get_submodule(module).weight += dw
        want = plain(input_ids=ids).logits
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the adapter changes the outputs at all
        assert not torch.allclose(host_model(Y_ID, seed=3)(input_ids=ids).logits, got, atol=1e-4)

    # lineage: the composition and the port edge
    lineage = registry.lineage("team/mix")
    assert lineage.root == "team/mix@1"
    nodes = {n.ref: n for n in lineage.nodes}
    assert set(nodes) == {"team/mix@1", "port/a@1", "team/a@1", "team/b@1"}
    assert nodes["port/a@1"].kind == "ported" and nodes["port/a@1"].method == "port"
    assert nodes["port/a@1"].digest == a.digest
    assert nodes["team/mix@1"].method == "exact"
    edges = {(e.output, e.input): (e.method, e.a, e.b) for e in lineage.edges}
    assert edges == {
        ("team/mix@1", "port/a@1"): ("exact", 0.5, 0.5),
        ("team/mix@1", "team/b@1"): ("exact", pytest.approx(0.7), pytest.approx(-0.7)),
        ("port/a@1", "team/a@1"): ("port", 1.0, 1.0),
    }

    # contents: the port is a linear step with coefficient 1
    contents = registry.contents("team/mix")
    assert contents.root_linear
    terms = {t.ref: (t.kind, t.a, t.b, t.opaque) for t in contents.terms}
    assert terms == {
        "team/a@1": ("trained", pytest.approx(0.5), pytest.approx(0.5), False),
        "team/b@1": ("trained", pytest.approx(0.7), pytest.approx(-0.7), False),
    }
    port_terms = registry.contents("port/a").terms
    assert [(t.ref, t.a, t.b) for t in port_terms] == [("team/a@1", 1.0, 1.0)]
    descendants = {d.ref: d.depth for d in registry.descendants("team/a")}
    assert descendants == {"port/a@1": 1, "team/mix@1": 2}

    # verify passes; rm of the original is refused while the port exists
    report = registry.verify()
    assert report.ok, report.failures
    assert report.checked == 4
    with pytest.raises(ModuleInUseError, match="port/a@1"):
        registry.remove("team/a@1")
    assert registry.resolve("team/a").digest == a.digest
    assert registry.resolve("port/a").digest == ported.digest == a.digest
    assert b.base_model == Y_ID


# --- the command line -------------------------------------------------------------------------


def test_cli_port_dry_run(registry, run_pem, tmp_path):
    add_hosts(registry, tmp_path, Y_ID, Z_ID, W_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")

    ok = run_pem("port", "team/a", "--to", Y_ID, "--dry-run")
    assert ok.exit_code == 0, ok.output
    assert "compatible" in ok.stdout and "incompatible" not in ok.stdout

    wide = run_pem("port", "team/a", "--to", Z_ID, "--dry-run")
    assert wide.exit_code == 1, wide.output
    assert "incompatible" in wide.stdout
    assert "model.layers.0.self_attn.q_proj" in wide.stdout

    shallow = run_pem("port", "team/a", "--to", W_ID, "--dry-run", "--json")
    assert shallow.exit_code == 1, shallow.output
    data = json.loads(shallow.stdout)
    assert data["level"] == "incompatible"
    assert data["missing"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    assert [m.ref for m in registry.list()] == ["team/a@1"]  # a dry run writes nothing


def test_cli_port_json(registry, run_pem, home, tmp_path):
    add_hosts(registry, tmp_path, Y_ID)
    original = registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    result = run_pem("port", "team/a", "--to", Y_ID, "--name", "ported/a", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ref"] == "ported/a@1"
    assert data["kind"] == "ported"
    assert data["base_model"] == Y_ID
    assert data["digest"] == original.digest
    assert len(store_files(home)) == 1
    assert registry.get("ported/a").provenance.method == "port"


def test_cli_port_refused_is_one_line_error(registry, run_pem, tmp_path):
    add_hosts(registry, tmp_path, Z_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    result = run_pem("port", "team/a", "--to", Z_ID, "--name", "ported/a")
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert Z_ID in lines[0]
    assert [m.ref for m in registry.list()] == ["team/a@1"]


# --- more provenance --------------------------------------------------------------------------


def test_port_of_a_composed_module_is_a_linear_step(registry, tmp_path):
    add_hosts(registry, tmp_path, Y_ID)
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a")
    registry.add(make_lora(tmp_path / "c", seed=2), "team/c")
    registry.compose("0.25*team/a + 0.75*team/c", "team/ac", method="exact")
    ported = registry.port("team/ac", Y_ID, "port/ac")
    assert ported.rank == 8 and ported.base_model == Y_ID
    terms = {t.ref: (t.a, t.b) for t in registry.contents("port/ac").terms}
    assert terms == {"team/a@1": (0.25, 0.25), "team/c@1": (0.75, 0.75)}
    report = registry.verify()
    assert report.ok and report.checked == 4 and report.rederived == 1


def test_port_takes_the_host_revision_not_the_source_revision(registry, tmp_path):
    folder = tmp_path / "hosts" / "y"
    llama_config(Y_ID).save_pretrained(folder)
    registry.add_base(f"{Y_ID}@abc", config_path=folder / "config.json")
    registry.add(make_lora(tmp_path / "a", seed=1), "team/a", base_revision="r1")
    ported = registry.port("team/a", f"{Y_ID}@abc", "port/a")
    assert (ported.base_model, ported.base_revision) == (Y_ID, "abc")
    config = registry.get("port/a").config
    assert (config["base_model_name_or_path"], config["revision"]) == (Y_ID, "abc")
    assert registry.get("port/a").provenance.parameters["from"] == f"{X_ID}@r1"
    assert registry.get_base(f"{Y_ID}@abc").adapters == 1


def test_a_pulled_ported_module_is_not_derived_from_itself(registry, hub, tmp_path):
    """Push a ported module, pull it into a registry that lacks the original: the port's input
    has the module's own digest, and must stay an external node (not a self-loop)."""
    from registry import Registry

    add_hosts(registry, tmp_path, Y_ID)
    registry.add(make_lora(tmp_path / "a", seed=21), "team/a")
    registry.port("team/a", Y_ID, "port/a")
    repo = f"port-org/ported-{tmp_path.name}"[:90]
    registry.push("port/a", repo)

    with Registry.init(tmp_path / "elsewhere", user="other") as other:
        pulled = other.pull(repo, name="them/a")
        lineage = other.lineage("them/a")
        assert all(edge.input != edge.output for edge in lineage.edges), lineage.edges
        assert [e.method for e in lineage.edges] == ["port"]
        assert "team/a@1" in lineage.edges[0].input
        assert other.descendants("them/a") == []
        other.remove("them/a@1")  # nothing was derived from it
        assert other.list() == []
        assert pulled.kind == "pulled"
