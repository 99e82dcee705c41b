"""Composition arithmetic (SEMANTICS.md sections 2, 3 and 6), tensor by tensor.

Every expected value is computed here from the input adapters' own files (``tensors`` and
``adapter_config.json``) with the formulas of SEMANTICS.md written out in torch, in float64;
the registry's output is read back through ``Registry.export`` and turned into per-layer
effects ``dW = scaling * B @ A`` with the scaling its exported config declares (PEFT's rule
for ``rank_pattern`` / ``alpha_pattern``). No registry code computes an expectation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_ia3, make_lora, tiny_llama
from independent import CONFIG, effects, ia3_vectors, lora_layers, out, reg  # noqa: F401  (fixtures)
from safetensors import safe_open

WEIGHTS = "adapter_model.safetensors"
RTOL, ATOL = 1e-5, 1e-6  # float32 outputs against float64 expectations
SVD_RTOL, SVD_ATOL = 1e-4, 1e-5


# --- independent readers (SEMANTICS.md section 1) ------------------------------------------------


def assert_effects(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol=RTOL, atol=ATOL) -> None:
    assert sorted(actual) == sorted(expected)
    for module in expected:
        torch.testing.assert_close(actual[module], expected[module], rtol=rtol, atol=atol, msg=lambda m: f"{module}: {m}")


def weights_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


# --- fixtures ----------------------------------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj"
PATTERNS = dict(rank_pattern={Q0: 2}, alpha_pattern={"v_proj": 12})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-math")
    return {
        "x": make_lora(root / "x", seed=1, r=4, lora_alpha=8),
        "y": make_lora(root / "y", seed=2, r=4, lora_alpha=16),
        "rs": make_lora(root / "rs", seed=3, r=4, lora_alpha=8, use_rslora=True),
        "pat": make_lora(root / "pat", seed=4, r=4, lora_alpha=8, **PATTERNS),
        "pat2": make_lora(root / "pat2", seed=5, r=4, lora_alpha=4, **PATTERNS),
        "big": make_lora(root / "big", seed=6, r=8, lora_alpha=8),
        "cls": make_ia3(root / "cls", seed=7),
        "tgt": make_ia3(root / "tgt", seed=8),
        "src": make_ia3(root / "src", seed=9),
    }


def blob_files(registry) -> list[tuple[str, int]]:
    root = Path(registry.settings.store)
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


# --- LoRA, method module ---------------------------------------------------------------------------

MODULE_CASES = [
    # expression, {input: (a, b)} written by hand (SEMANTICS.md section 2)
    ("0.5*team/x + 0.3*team/y - 0.2*team/rs", {"x": (0.5, 0.5), "y": (0.3, 0.3), "rs": (0.2, -0.2)}),
    ("team/x + 0.5*(team/y - team/x)", {"x": (1.5, 0.5), "y": (0.5, 0.5)}),
    ("-0.6*team/rs", {"rs": (0.6, -0.6)}),
    ("-team/x", {"x": (1.0, -1.0)}),
    ("team/x - team/y", {"x": (1.0, 1.0), "y": (1.0, -1.0)}),
    ("0.25*team/pat - 0.75*team/pat2", {"pat": (0.25, 0.25), "pat2": (0.75, -0.75)}),
]


def expected_module(adapters, coefficients) -> dict[str, torch.Tensor]:
    """dW = (sum b_i s_i B_i) @ (sum a_i A_i), per layer."""
    per_input = {k: lora_layers(adapters[k]) for k in coefficients}
    modules = next(iter(per_input.values())).keys()
    result = {}
    for module in modules:
        a_sum = sum(coefficients[k][0] * per_input[k][module][0] for k in coefficients)
        b_sum = sum(coefficients[k][1] * per_input[k][module][2] * per_input[k][module][1] for k in coefficients)
        result[module] = b_sum @ a_sum
    return result


@pytest.mark.parametrize("expression, coefficients", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_lora_module_method_effect(reg, out, adapters, expression, coefficients):
    info = reg.compose(expression, "team/out", method="module")
    folder = out(info.ref)
    assert_effects(effects(folder), expected_module(adapters, coefficients))
    # the rank is kept, layer by layer
    first = lora_layers(adapters[next(iter(coefficients))])
    for module, (a, b, _) in lora_layers(folder).items():
        assert a.shape == first[module][0].shape and b.shape == first[module][1].shape


def test_lora_module_negation_flips_the_effect(reg, out, adapters):
    """neg(A, B) = (A, -B): -x has exactly the opposite effect of x."""
    neg = effects(out(reg.compose("-team/x", "team/neg").ref))
    pos = effects(adapters["x"])
    assert_effects(neg, {m: -d for m, d in pos.items()})


# --- LoRA, method exact (rank grows) ---------------------------------------------------------------


def test_lora_exact_effect_with_rslora_and_patterns(reg, out, adapters):
    coefficients = {"x": 0.5, "pat": 0.5, "rs": -0.3}
    info = reg.compose("0.5*team/x + 0.5*team/pat - 0.3*team/rs", "team/exact", method="exact")
    folder = out(info.ref)
    inputs = {k: lora_layers(adapters[k]) for k in coefficients}
    expected = {
        m: sum(coefficients[k] * inputs[k][m][2] * inputs[k][m][1] @ inputs[k][m][0] for k in coefficients)
        for m in inputs["x"]
    }
    assert_effects(effects(folder), expected)
    for module, (a, b, _) in lora_layers(folder).items():
        assert a.shape[0] == sum(inputs[k][module][0].shape[0] for k in coefficients)  # 10 at Q0, 12 elsewhere


# --- (IA)^3, method module: the paper's formulas ----------------------------------------------------

C0, C1 = 0.7, 0.4
IA3_CASES = [
    ("0.5*team/cls + 0.5*team/tgt", lambda l: 0.5 * l["cls"] + 0.5 * l["tgt"]),  # weighted merge
    ("-team/cls", lambda l: 2 - l["cls"]),  # negation
    ("-0.6*team/cls", lambda l: 1 - 0.6 * (l["cls"] - 1)),  # scaled negation
    (  # domain-transfer analogy
        f"{C0}*team/cls + {C1}*team/tgt - {C1}*team/src",
        lambda l: (1 - C0) + C0 * l["cls"] + C1 * l["tgt"] - C1 * l["src"],
    ),
]


@pytest.mark.parametrize("expression, formula", IA3_CASES, ids=["merge", "negation", "scaled-negation", "analogy"])
def test_ia3_module_reproduces_the_paper(reg, out, adapters, expression, formula):
    info = reg.compose(expression, "team/ia3out")
    assert info.peft_type == "IA3"
    result = ia3_vectors(out(info.ref))
    inputs = {k: ia3_vectors(adapters[k]) for k in ("cls", "tgt", "src")}
    expected = {m: formula({k: inputs[k][m] for k in inputs}) for m in inputs["cls"]}
    assert_effects(result, expected)


def test_ia3_negation_is_an_involution(reg, out, adapters):
    """--x is x: 2 - (2 - l) = l (PEFT's sum of weights would give l as well, but -x alone gives -l)."""
    neg = ia3_vectors(out(reg.compose("-team/cls", "team/neg").ref))
    assert all(torch.all(v > 0.3) for v in neg.values())  # never the sign flip -l of a plain weighted sum
    back = ia3_vectors(out(reg.compose("-(-team/cls)", "team/back").ref))
    assert_effects(back, ia3_vectors(adapters["cls"]))


# --- a single module with coefficient 1 gives itself back -------------------------------------------


@pytest.mark.parametrize("key", ["x", "rs", "pat"])
def test_single_lora_with_coefficient_one_keeps_its_effect(reg, out, adapters, key):
    """`team/x` and `1.0*team/x` under every method: the input's own dW (catches scaling bugs)."""
    for method in ("module", "exact", "svd"):
        for n, form in enumerate(("team/{}", "1.0*team/{}")):
            info = reg.compose(form.format(key), f"team/same-{key}-{method}-{n}", method=method)
            tol = dict(rtol=SVD_RTOL, atol=SVD_ATOL) if method == "svd" else {}
            try:
                assert_effects(effects(out(info.ref)), effects(adapters[key]), **tol)
            except AssertionError as exc:
                raise AssertionError(f"{form.format(key)} with method {method}: {exc}") from None


@pytest.mark.parametrize("form", ["team/cls", "1.0*team/cls"])
def test_single_ia3_with_coefficient_one_keeps_its_vectors(reg, out, adapters, form):
    info = reg.compose(form, "team/same-cls")
    assert_effects(ia3_vectors(out(info.ref)), ia3_vectors(adapters["cls"]), rtol=0, atol=0)


# --- traps of SEMANTICS.md section 6 ----------------------------------------------------------------


def peft_lora_layers(folder: Path) -> dict[str, object]:
    """The LoRA layers of the folder loaded by PEFT on the tiny model, by module name."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    return {
        name: module for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


@pytest.mark.parametrize(
    "expression, method",
    [("team/rs", "module"), ("team/rs", "exact"), ("0.5*team/x + 0.5*team/rs", "module"), ("team/rs - team/x", "svd")],
)
def test_rslora_flag_does_not_leak_into_the_output(reg, out, adapters, expression, method):
    info = reg.compose(expression, "team/rsout", method=method)
    folder = out(info.ref)
    config = json.loads((folder / CONFIG).read_text())
    assert config["use_rslora"] is False
    assert reg.get(info.ref).use_rslora is False
    # PEFT, loading the exported folder, applies the effect the formula predicts
    x, rs = lora_layers(adapters["x"]), lora_layers(adapters["rs"])
    if expression == "0.5*team/x + 0.5*team/rs":
        expected = {m: (0.5 * x[m][2] * x[m][1] + 0.5 * rs[m][2] * rs[m][1]) @ (0.5 * x[m][0] + 0.5 * rs[m][0]) for m in x}
    elif expression == "team/rs - team/x":
        # rank 8 truncated to the largest input rank, 4: the best rank-4 approximation
        expected = {m: best_rank_k(rs[m][2] * rs[m][1] @ rs[m][0] - x[m][2] * x[m][1] @ x[m][0], 4) for m in x}
    else:
        expected = effects(adapters["rs"])
    loaded = peft_lora_layers(folder)
    assert sorted(loaded) == sorted(expected)
    tol = dict(rtol=SVD_RTOL, atol=SVD_ATOL) if method == "svd" else dict(rtol=RTOL, atol=ATOL)
    for module, layer in loaded.items():
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected[module], **tol)


@pytest.mark.parametrize(
    "expression, method, inputs",
    [
        ("team/x + team/pat", "exact", ["x", "pat"]),
        ("0.5*team/pat - 0.5*team/pat2", "exact", ["pat", "pat2"]),
        ("0.5*team/pat - 0.5*team/pat2", "module", ["pat", "pat2"]),
        ("team/pat", "module", ["pat"]),
    ],
)
def test_per_layer_ranks_reload_in_peft(reg, out, adapters, expression, method, inputs):
    """Outputs with per-layer ranks carry the patterns they need: PEFT reloads them with the
    right rank and scaling on every layer, and the loaded effect is the composition's."""
    info = reg.compose(expression, "team/patout", method=method)
    folder = out(info.ref)
    layers = {k: lora_layers(adapters[k]) for k in inputs}
    first = layers[inputs[0]]
    if method == "exact":
        want_rank = {m: sum(layers[k][m][0].shape[0] for k in inputs) for m in first}
    else:
        want_rank = {m: first[m][0].shape[0] for m in first}
    assert len(set(want_rank.values())) > 1  # the case needs per-layer ranks
    stored = lora_layers(folder)  # also asserts that the config's patterns agree with the tensors
    loaded = peft_lora_layers(folder)
    assert sorted(loaded) == sorted(first)
    for module, layer in loaded.items():
        assert layer.r["default"] == want_rank[module]
        assert layer.lora_A["default"].weight.shape[0] == want_rank[module]
        assert layer.scaling["default"] == pytest.approx(stored[module][2])
        a, b, s = stored[module]
        torch.testing.assert_close(layer.get_delta_weight("default").double(), s * b @ a, rtol=RTOL, atol=ATOL)
    # and that effect is the right one
    coefficients = {"team/x + team/pat": {"x": 1.0, "pat": 1.0}}.get(expression, {"pat": 0.5, "pat2": -0.5})
    if expression == "team/pat":
        expected = effects(adapters["pat"])
    elif method == "exact":
        expected = {m: sum(c * layers[k][m][2] * layers[k][m][1] @ layers[k][m][0] for k, c in coefficients.items()) for m in first}
    else:
        expected = expected_module(adapters, {k: (abs(c), c) for k, c in coefficients.items()})
    loaded_effects = {m: layer.get_delta_weight("default").double() for m, layer in loaded.items()}
    assert_effects(loaded_effects, expected)


# --- svd: rank and dtype ------------------------------------------------------------------------------


def exact_sum(adapters, coefficients) -> dict[str, torch.Tensor]:
    layers = {k: lora_layers(adapters[k]) for k in coefficients}
    modules = next(iter(layers.values()))
    return {m: sum(c * layers[k][m][2] * layers[k][m][1] @ layers[k][m][0] for k, c in coefficients.items()) for m in modules}


def test_svd_default_rank_is_the_largest_input_rank_and_float32(reg, out, adapters):
    info = reg.compose("0.5*team/x + 0.5*team/big", "team/svd", method="svd")
    folder = out(info.ref)
    config = json.loads((folder / CONFIG).read_text())
    assert config["r"] == 8 and not config.get("rank_pattern")
    for module, (a, b, s) in lora_layers(folder).items():
        assert a.shape == (8, 16) and b.shape == (16, 8) and s == 1.0
    assert weights_dtypes(folder) == {"F32"}
    assert reg.get(info.ref).dtype == "F32"


def best_rank_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def test_svd_rank_option_is_respected_api(reg, out, adapters):
    info = reg.compose("0.5*team/x + 0.5*team/big", "team/svd3", method="svd", rank=3)
    folder = out(info.ref)
    stored = lora_layers(folder)
    for module, (a, b, s) in stored.items():
        assert a.shape == (3, 16) and b.shape == (16, 3)
    expected = {m: best_rank_k(d, 3) for m, d in exact_sum(adapters, {"x": 0.5, "big": 0.5}).items()}
    assert_effects(effects(folder), expected, rtol=SVD_RTOL, atol=SVD_ATOL)
    assert reg.get(info.ref).provenance.parameters["rank"] == 3


def test_svd_rank_option_is_respected_cli(reg, run_pem, out, adapters):
    result = run_pem("compose", "team/x - team/y", "--name", "team/svd2", "--method", "svd", "--rank", "2")
    assert result.exit_code == 0, result.output
    folder = out("team/svd2")
    for module, (a, b, s) in lora_layers(folder).items():
        assert a.shape == (2, 16) and b.shape == (16, 2)
    expected = {m: best_rank_k(d, 2) for m, d in exact_sum(adapters, {"x": 1.0, "y": -1.0}).items()}
    assert_effects(effects(folder), expected, rtol=SVD_RTOL, atol=SVD_ATOL)


@pytest.mark.parametrize("method", ["svd", "exact", "module"])
def test_dtype_override_bfloat16(reg, run_pem, out, adapters, method):
    result = run_pem("compose", "0.5*team/x + 0.5*team/y", "--name", "team/bf", "--method", method, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    folder = out("team/bf")
    assert weights_dtypes(folder) == {"BF16"}
    assert reg.get("team/bf").dtype == "BF16"
    if method == "module":
        expected = expected_module(adapters, {"x": (0.5, 0.5), "y": (0.5, 0.5)})
    else:
        expected = exact_sum(adapters, {"x": 0.5, "y": 0.5})
        if method == "svd":  # rank 8 truncated to the largest input rank, 4
            expected = {m: best_rank_k(d, 4) for m, d in expected.items()}
    assert_effects(effects(folder), expected, rtol=0.05, atol=0.02)  # bfloat16 has 8 bits of mantissa


# --- determinism and output names -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["module", "exact", "svd"])
def test_same_expression_twice_gives_the_same_digest(reg, method):
    first = reg.compose("0.5*team/x + 0.5*team/y", "team/one", method=method)
    second = reg.compose("0.5*team/x + 0.5*team/y", "team/two", method=method)
    assert first.created and second.created
    assert first.ref == "team/one@1" and second.ref == "team/two@1"
    assert first.digest == second.digest


def test_term_order_does_not_change_the_digest(reg):
    first = reg.compose("0.5*team/x + 0.5*team/y", "team/xy")
    second = reg.compose("0.5*team/y + 0.5*team/x", "team/yx")
    assert first.digest == second.digest


def test_term_order_does_not_change_the_digest_when_computed_afresh(registry, adapters, tmp_path):
    """Two catalogs, no blob to share: the bytes themselves are the same."""
    from registry import Registry

    other = Registry.init(tmp_path / "other-home", database_url=f"sqlite:///{tmp_path / 'other.db'}", user="t")
    try:
        for reg_ in (registry, other):
            reg_.add(adapters["x"], "team/x")
            reg_.add(adapters["y"], "team/y")
        first = registry.compose("0.5*team/x - 0.25*team/y", "team/xy", method="exact")
        second = other.compose("-0.25*team/y + 0.5*team/x", "team/yx", method="exact")
    finally:
        other.close()
    assert first.digest == second.digest


def test_same_expression_into_the_same_name_returns_the_existing_module(reg):
    first = reg.compose("0.5*team/x + 0.5*team/y", "team/merged")
    before, blobs = reg.list(), blob_files(reg)
    again = reg.compose("0.5*team/x + 0.5*team/y", "team/merged")
    assert again.created is False
    assert again.ref == first.ref == "team/merged@1" and again.digest == first.digest
    assert reg.list() == before and blob_files(reg) == blobs
    # written differently, the same derivation is still the same module
    same = reg.compose("0.5*(team/y + team/x)", "team/merged")
    assert same.created is False and same.ref == "team/merged@1"
    assert reg.list() == before


def test_different_expression_into_an_existing_name(reg):
    from registry.errors import NameConflictError

    first = reg.compose("0.5*team/x + 0.5*team/y", "team/merged")
    before, blobs = reg.list(), blob_files(reg)
    with pytest.raises(NameConflictError, match="team/merged"):
        reg.compose("0.5*team/x - 0.5*team/y", "team/merged")
    assert reg.list() == before and blob_files(reg) == blobs
    second = reg.compose("0.5*team/x - 0.5*team/y", "team/merged", new_version=True)
    assert second.created and second.ref == "team/merged@2" and second.digest != first.digest
    assert [m.ref for m in reg.list() if m.name == "team/merged"] == ["team/merged@1", "team/merged@2"]


def test_name_of_a_trained_module_is_not_silently_reused(reg):
    from registry.errors import NameConflictError

    before = reg.list()
    with pytest.raises(NameConflictError):
        reg.compose("0.5*team/x + 0.5*team/y", "team/x")
    assert reg.list() == before


# --- provenance -------------------------------------------------------------------------------------


def test_provenance_of_a_module_composition(reg, adapters):
    import numpy

    expression = "0.5 * team/x - 0.3*( team/y + 2*team/x )"
    info = reg.compose(expression, "team/prov")
    details = reg.get(info.ref)
    assert details.kind == "derived" and info.kind == "derived"
    p = details.provenance
    assert p is not None
    assert p.expression == expression
    assert p.canonical == "0.5*team/x@1 - 0.3*(team/y@1 + 2*team/x@1)"
    assert p.method == "module"
    by_ref = {i.ref: i for i in p.inputs}
    assert sorted(by_ref) == ["team/x@1", "team/y@1"]
    # x: a = 0.5 + 0.3*2 = 1.1, b = 0.5 - 0.3*2 = -0.1 ; y: a = 0.3, b = -0.3
    assert by_ref["team/x@1"].a == pytest.approx(1.1) and by_ref["team/x@1"].b == pytest.approx(-0.1)
    assert by_ref["team/y@1"].a == pytest.approx(0.3) and by_ref["team/y@1"].b == pytest.approx(-0.3)
    assert by_ref["team/x@1"].digest == reg.infos["x"].digest
    assert by_ref["team/y@1"].digest == reg.infos["y"].digest
    # module is element-wise: computed with numpy, which is what the provenance names
    assert p.environment["arrays"] == "numpy" and p.environment["numpy"] == numpy.__version__
    assert "torch" not in p.environment
    # and the stored tensors are that derivation
    folder = reg.export(info.ref, Path(reg.settings.home) / "prov-out")
    assert_effects(effects(folder), expected_module(adapters, {"x": (1.1, -0.1), "y": (0.3, -0.3)}))


def test_provenance_of_an_svd_composition(reg):
    info = reg.compose("team/x - 0.5*team/big", "team/svdprov", method="svd")
    p = reg.get(info.ref).provenance
    assert p.method == "svd"
    assert p.canonical == "team/x@1 - 0.5*team/big@1"
    assert p.parameters["rank"] == 8
    assert 0 < p.results["relative_truncation_error"] < 1
    assert {i.ref: (i.a, i.b) for i in p.inputs} == {"team/x@1": (1.0, 1.0), "team/big@1": (0.5, -0.5)}


def test_provenance_with_explicit_versions(reg, adapters):
    second = reg.add(adapters["y"], "team/x")  # other content under the same name: team/x@2
    assert second.ref == "team/x@2"
    info = reg.compose("team/x@1 + team/x", "team/versions")
    p = reg.get(info.ref).provenance
    assert p.canonical == "team/x@1 + team/x@2"
    assert {i.ref: (i.a, i.b) for i in p.inputs} == {"team/x@1": (1.0, 1.0), "team/x@2": (1.0, 1.0)}
