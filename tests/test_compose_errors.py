"""Refused compositions (SEMANTICS.md section 4), expression errors, and ``pem check``.

Every refusal is checked through the API (``compose`` raises, ``check`` reports) and the CLI,
with the message text a user needs, and with nothing written: the catalog's ``list()`` and the
blob store's files are the same before and after. Values of the accepted variants (``union``,
``--deviation``) are computed here from the inputs' own tensors with SEMANTICS.md's formulas.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BERT_ID, LLAMA_ID, make_ia3, make_lora, tensors
from independent import CONFIG, effects, ia3_vectors, lora_layers
from safetensors.torch import save_file

WEIGHTS = "adapter_model.safetensors"
RTOL, ATOL = 1e-5, 1e-6


# --- independent readers (SEMANTICS.md section 1) ------------------------------------------------


def assert_effects(actual, expected, rtol=RTOL, atol=ATOL) -> None:
    assert sorted(actual) == sorted(expected)
    for module in expected:
        torch.testing.assert_close(actual[module], expected[module], rtol=rtol, atol=atol, msg=lambda m: f"{module}: {m}")


def frobenius_ratio(numerator: dict[str, torch.Tensor], denominator: dict[str, torch.Tensor]) -> float:
    num = sum(float(torch.linalg.matrix_norm(t)) ** 2 for t in numerator.values())
    den = sum(float(torch.linalg.matrix_norm(t)) ** 2 for t in denominator.values())
    return math.sqrt(num / den)


# --- fixtures ----------------------------------------------------------------------------------


def copy_with(src: Path, dst: Path, named: dict[str, torch.Tensor] | None = None, **config_changes) -> Path:
    """A copy of the adapter folder ``src``, with other tensors and/or config fields."""
    shutil.copytree(src, dst)
    if named is not None:
        save_file(named, str(dst / WEIGHTS))
    if config_changes:
        config = json.loads((dst / CONFIG).read_text())
        config.update(config_changes)
        (dst / CONFIG).write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-errors")
    x = make_lora(root / "x", seed=21, r=4, lora_alpha=8)
    y = make_lora(root / "y", seed=22, r=4, lora_alpha=16)
    found = {
        "x": x,
        "y": y,
        "big": make_lora(root / "big", seed=23, r=8, lora_alpha=8),
        "qk": make_lora(root / "qk", seed=24, r=4, lora_alpha=8, target_modules=("q_proj", "k_proj")),
        "bert": make_lora(root / "bert", seed=25, model="bert"),
        "dora": make_lora(root / "dora", seed=26, use_dora=True),
        "bias": make_lora(root / "bias", seed=27, lora_bias=True),
        "fifo": copy_with(make_lora(root / "fifo-src", seed=28), root / "fifo", fan_in_fan_out=True),
        "p": make_ia3(root / "p", seed=29),
        "q": make_ia3(root / "q", seed=30),
        "kd": make_ia3(root / "kd", seed=31, target_modules=("k_proj", "down_proj")),
        # only q_proj adapted; seed 10 makes its digest sort before those of "y" and "uneven"
        "qonly": make_lora(root / "qonly", seed=10, target_modules=("q_proj",)),
        # rank 8 at v_proj only
        "uneven": make_lora(root / "uneven", seed=32, r=4, lora_alpha=8, rank_pattern={"v_proj": 8}),
    }
    # an adapter whose tensors fit a model twice as wide (same layer names, other shapes)
    wide = {}
    generator = torch.Generator().manual_seed(33)
    for name, t in tensors(x).items():
        shape = (4, 32) if name.endswith("lora_A.weight") else (32, 4)
        wide[name] = 0.3 * torch.randn(shape, generator=generator)
    found["wide"] = copy_with(x, root / "wide", wide)
    # "y" with the A matrices of "x": as if trained from the same initialisation
    shared = dict(tensors(y))
    for name, t in tensors(x).items():
        if name.endswith("lora_A.weight"):
            shared[name] = t.clone()
    found["shared"] = copy_with(y, root / "shared", shared)
    # "wide" only at v_proj
    half_wide = dict(tensors(y))
    for name in half_wide:
        if ".v_proj." in name:
            half_wide[name] = wide[name].clone()
    found["halfwide"] = copy_with(y, root / "halfwide", half_wide)
    return found


ADD_OPTIONS = {"xmain": ("x", {"base_revision": "main"}), "yv2": ("y", {"base_revision": "v2"})}


@pytest.fixture
def reg(registry, adapters):
    registry.infos = {key: registry.add(path, f"team/{key}") for key, path in adapters.items()}
    for name, (key, options) in ADD_OPTIONS.items():
        registry.infos[name] = registry.add(adapters[key], f"team/{name}", **options)
    return registry


def blob_files(registry) -> list[tuple[str, int]]:
    root = Path(registry.settings.store)
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def snapshot(registry):
    return registry.list(), blob_files(registry)


# --- each incompatibility of SEMANTICS.md section 4 ------------------------------------------------

# id: (expression, method, texts the message must contain, refs it must name)
INCOMPATIBLE = {
    "peft-types": ("team/x + team/p", "module", ["different PEFT types", "LORA", "IA3"], ["team/x@1", "team/p@1"]),
    "base-models": (
        "team/x + team/bert", "module", ["different base models", LLAMA_ID, BERT_ID, "pem port"], ["team/x@1", "team/bert@1"],
    ),
    "base-revisions": ("team/xmain - team/yv2", "exact", ["revision", "main", "v2"], ["team/xmain@1", "team/yv2@1"]),
    "layer-sets": ("team/x + team/qk", "module", ["different layers", "k_proj", "v_proj", "union"], ["team/x@1", "team/qk@1"]),
    "ia3-layer-sets": ("team/p + team/kd", "module", ["different layers", "v_proj", "union"], ["team/p@1", "team/kd@1"]),
    "shapes": ("team/x + team/wide", "exact", ["different shapes", "q_proj", "v_proj", "32"], ["team/x@1", "team/wide@1"]),
    "ranks": ("team/x + team/big", "module", ["different ranks", "exact", "svd"], ["team/x@1", "team/big@1"]),
    "dora": ("team/x + team/dora", "module", ["DoRA", "use_dora"], ["team/dora@1"]),
    "dora-alone": ("team/dora", "exact", ["DoRA", "use_dora"], ["team/dora@1"]),
    "lora-bias": ("0.5*team/x + 0.5*team/bias", "exact", ["lora_bias"], ["team/bias@1"]),
    "fan-in-fan-out": ("team/x + team/fifo", "module", ["fan_in_fan_out", "True", "False"], ["team/x@1", "team/fifo@1"]),
    "exact-on-ia3": ("team/p + team/q", "exact", ["exact", "IA3"], ["team/p@1"]),
    "svd-on-ia3": ("team/p - team/q", "svd", ["svd", "IA3"], ["team/p@1"]),
}


@pytest.mark.parametrize("case", list(INCOMPATIBLE))
def test_incompatible_inputs_are_refused_and_nothing_is_written(reg, case):
    from registry.errors import IncompatibleModulesError

    expression, method, texts, refs = INCOMPATIBLE[case]
    before = snapshot(reg)
    with pytest.raises(IncompatibleModulesError) as raised:
        reg.compose(expression, "team/out", method=method)
    assert raised.value.violations
    message = str(raised.value)
    for text in texts + refs:
        assert text in message, f"{text!r} not in {message!r}"
    report = reg.check(expression, method=method)
    assert report.composable is False and report.output is None
    assert report.violations == raised.value.violations
    assert snapshot(reg) == before
    from registry.errors import UnknownModuleError

    with pytest.raises(UnknownModuleError):
        reg.get("team/out")


@pytest.mark.parametrize("case", ["base-models", "ranks", "dora", "exact-on-ia3"])
def test_incompatible_inputs_through_the_cli(reg, run_pem, case):
    expression, method, texts, refs = INCOMPATIBLE[case]
    before = snapshot(reg)
    result = run_pem("compose", expression, "--name", "team/out", "--method", method)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    for text in texts + refs:
        assert text in result.stderr
    checked = run_pem("check", expression, "--method", method)
    assert checked.exit_code == 1
    assert "not composable" in checked.stdout
    for text in texts + refs:
        assert text in checked.stdout
    assert snapshot(reg) == before


def test_module_method_refuses_different_ranks_but_exact_composes_them(reg, adapters, tmp_path):
    from registry.errors import IncompatibleModulesError

    with pytest.raises(IncompatibleModulesError, match="different ranks.*4 vs 8|different ranks.*8 vs 4"):
        reg.compose("0.5*team/x + 0.5*team/big", "team/out")
    info = reg.compose("0.5*team/x + 0.5*team/big", "team/out", method="exact")
    lx, lb = lora_layers(adapters["x"]), lora_layers(adapters["big"])
    expected = {m: 0.5 * lx[m][2] * lx[m][1] @ lx[m][0] + 0.5 * lb[m][2] * lb[m][1] @ lb[m][0] for m in lx}
    assert_effects(effects(reg.export(info.ref, tmp_path / "out")), expected)


def test_every_violation_is_reported_at_once(reg):
    from registry.errors import IncompatibleModulesError

    expression = "team/x + team/bert + team/dora + team/fifo + team/qk + team/p"
    report = reg.check(expression)
    assert report.composable is False
    joined = "\n".join(report.violations)
    for text in ("DoRA", "different base models", "fan_in_fan_out", "different layers", "different PEFT types"):
        assert text in joined, f"{text!r} missing from the report: {report.violations}"
    assert len(report.violations) >= 5
    before = snapshot(reg)
    with pytest.raises(IncompatibleModulesError) as raised:
        reg.compose(expression, "team/out")
    assert raised.value.violations == report.violations
    assert snapshot(reg) == before


def test_a_rank_violation_is_reported_with_the_other_violations(reg):
    """SEMANTICS.md section 4: one message per violation; equal ranks (rule 4) is one of them."""
    report = reg.check("team/x + team/big + team/fifo")
    joined = "\n".join(report.violations)
    assert "fan_in_fan_out" in joined
    assert "different ranks" in joined, report.violations


def test_different_revisions_are_refused_whichever_input_has_no_revision(registry, adapters):
    """Rule 2 holds for every pair: two inputs with known, different revisions are refused
    even when a third input (of unknown revision) is also composed."""
    from registry.errors import IncompatibleModulesError

    keys = ("x", "y", "big")
    for n in range(3):
        unknown, main, v2 = keys[n], keys[(n + 1) % 3], keys[(n + 2) % 3]
        registry.add(adapters[unknown], f"rev{n}/none")
        registry.add(adapters[main], f"rev{n}/main", base_revision="main")
        registry.add(adapters[v2], f"rev{n}/v2", base_revision="v2")
        expression = f"rev{n}/none + rev{n}/main + rev{n}/v2"
        report = registry.check(expression, method="exact")
        assert not report.composable and any("main" in v and "v2" in v for v in report.violations), (
            f"{unknown} without revision: {report.violations}"
        )
        with pytest.raises(IncompatibleModulesError):
            registry.compose(expression, f"rev{n}/out", method="exact")


def test_violations_between_inputs_other_than_the_first_are_reported(reg):
    """An (IA)^3 input that sorts first must not hide what is wrong between the LoRA inputs:
    x and fifo differ in fan_in_fan_out whatever else is wrong."""
    assert reg.infos["p"].digest < min(reg.infos["x"].digest, reg.infos["fifo"].digest)  # the case's premise
    report = reg.check("team/p + team/x + team/fifo")
    joined = "\n".join(report.violations)
    assert "different PEFT types" in joined
    assert "fan_in_fan_out" in joined, report.violations


@pytest.mark.parametrize(
    "other, method, text",
    [("uneven", "module", "different ranks"), ("halfwide", "exact", "different shapes")],
)
def test_union_checks_layers_between_every_pair_of_inputs(reg, other, method, text):
    """With union, a layer missing from one input is still compared between the others:
    y and the other input disagree at v_proj, which qonly (sorted first) does not adapt."""
    from registry.errors import IncompatibleModulesError

    assert reg.infos["qonly"].digest < min(reg.infos["y"].digest, reg.infos[other].digest)  # the case's premise
    expression = f"team/qonly + team/y + team/{other}"
    report = reg.check(expression, method=method, union=True)
    assert not report.composable and any(text in v and "v_proj" in v for v in report.violations), report.violations
    before = snapshot(reg)
    with pytest.raises(IncompatibleModulesError):
        reg.compose(expression, "team/out", method=method, union=True)
    assert snapshot(reg) == before


# --- union: missing LoRA layer is dW = 0, missing (IA)^3 layer is l = 1 ----------------------------


def test_lora_union_exact(reg, adapters, tmp_path):
    info = reg.compose("0.5*team/x - 0.3*team/qk", "team/union", method="exact", union=True)
    lx, lq = effects(adapters["x"]), effects(adapters["qk"])
    expected = {m: 0.5 * lx.get(m, 0) - 0.3 * lq.get(m, 0) for m in set(lx) | set(lq)}
    assert {m.rsplit(".", 1)[1] for m in expected} == {"q_proj", "k_proj", "v_proj"}
    assert_effects(effects(reg.export(info.ref, tmp_path / "out")), expected)


def test_lora_union_module(reg, adapters, tmp_path):
    """Method module with a missing layer: that input's factors are zero there."""
    info = reg.compose("0.5*team/x - 0.3*team/qk", "team/union", union=True)
    lx, lq = lora_layers(adapters["x"]), lora_layers(adapters["qk"])
    expected = {}
    for m in set(lx) | set(lq):
        a = sum(c * f[m][0] for c, f in ((0.5, lx), (0.3, lq)) if m in f)
        b = sum(c * f[m][2] * f[m][1] for c, f in ((0.5, lx), (-0.3, lq)) if m in f)
        expected[m] = b @ a
    assert_effects(effects(reg.export(info.ref, tmp_path / "out")), expected)


def test_ia3_union(reg, adapters, tmp_path):
    info = reg.compose("0.5*team/p - 0.5*team/kd", "team/union", union=True)
    lp, lk = ia3_vectors(adapters["p"]), ia3_vectors(adapters["kd"])
    one = {m: torch.ones_like(v) for m, v in lp.items()}
    expected = {m: 1 + 0.5 * (lp[m] - 1) - 0.5 * (lk.get(m, one[m]) - 1) for m in lp}
    assert any(m.endswith("v_proj") for m in expected) and not any(m.endswith("v_proj") for m in lk)
    result = ia3_vectors(reg.export(info.ref, tmp_path / "out"))
    assert_effects(result, expected)
    # v_proj, adapted by p alone: 1 + 0.5 (l_p - 1)
    for m in expected:
        if m.endswith("v_proj"):
            torch.testing.assert_close(result[m], 1 + 0.5 * (lp[m] - 1), rtol=RTOL, atol=ATOL)
    # the feed-forward flag survives the union
    config = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert [m.rsplit(".", 1)[1] for m in config["feedforward_modules"]] in (["down_proj"], ["down_proj", "down_proj"])


# --- the language, through the CLI ----------------------------------------------------------------


def test_syntax_error_shows_the_expression_and_a_caret(reg, run_pem):
    expression = "0.5*team/x + * team/y"
    before = snapshot(reg)
    for command in (["compose", expression, "--name", "team/out"], ["check", expression]):
        result = run_pem(*command)
        assert result.exit_code != 0
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
        lines = result.stderr.rstrip("\n").splitlines()
        assert lines[0].startswith("error: ")
        assert lines[-2] == "  " + expression
        caret = lines[-1]
        assert set(caret.strip()) == {"^"}
        assert caret.index("^") - 2 == expression.index("* team/y")
    assert snapshot(reg) == before


TYPE_ERRORS = [
    ("team/x * team/y", "multiply two modules"),
    ("team/x + 2", "add a number to a module"),
    ("2 / team/x", "divide by a module"),
    ("team/x / 0", "division by zero"),
]


@pytest.mark.parametrize("expression, text", TYPE_ERRORS, ids=[e for e, _ in TYPE_ERRORS])
def test_type_errors_through_the_cli(reg, run_pem, expression, text):
    before = snapshot(reg)
    result = run_pem("compose", expression, "--name", "team/out")
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and text in result.stderr
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[-2] == "  " + expression and set(lines[-1].strip()) == {"^"}
    assert snapshot(reg) == before


def test_unknown_reference_suggests_the_closest_name(reg, run_pem):
    before = snapshot(reg)
    result = run_pem("compose", "0.5*team/x + 0.5*team/bigg", "--name", "team/out")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "team/bigg" in result.stderr and "did you mean team/big" in result.stderr
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines[-1].index("^") - 2 == "0.5*team/x + 0.5*team/bigg".index("team/bigg")
    assert snapshot(reg) == before


# --- pem check -------------------------------------------------------------------------------------


def test_check_exit_codes(reg, run_pem):
    ok = run_pem("check", "0.5*team/x + 0.5*team/y")
    assert ok.exit_code == 0, ok.output
    assert "composable" in ok.stdout and "not composable" not in ok.stdout
    bad = run_pem("check", "0.5*team/x + 0.5*team/big")
    assert bad.exit_code == 1
    assert "not composable" in bad.stdout and "different ranks" in bad.stdout
    bad_json = run_pem("check", "0.5*team/x + 0.5*team/big", "--json")
    assert bad_json.exit_code == 1
    data = json.loads(bad_json.stdout)
    assert data["composable"] is False and any("different ranks" in v for v in data["violations"])


def module_deviation(folders: dict[str, Path], coefficients: dict[str, tuple[float, float]]):
    """(per-layer ||B_out@A_out - dW_exact||_F / ||dW_exact||_F, overall pooled)."""
    layers = {k: lora_layers(f) for k, f in folders.items()}
    modules = next(iter(layers.values()))
    errors, exact = {}, {}
    for m in modules:
        a_out = sum(coefficients[k][0] * layers[k][m][0] for k in layers)
        b_out = sum(coefficients[k][1] * layers[k][m][2] * layers[k][m][1] for k in layers)
        exact[m] = sum(coefficients[k][1] * layers[k][m][2] * layers[k][m][1] @ layers[k][m][0] for k in layers)
        errors[m] = b_out @ a_out - exact[m]
    per_layer = {m: float(torch.linalg.matrix_norm(errors[m]) / torch.linalg.matrix_norm(exact[m])) for m in modules}
    return per_layer, frobenius_ratio(errors, exact)


@pytest.mark.parametrize("expression, coefficients", [
    ("0.5*team/x + 0.5*team/y", {"x": (0.5, 0.5), "y": (0.5, 0.5)}),
    ("team/x - 0.3*team/y", {"x": (1.0, 1.0), "y": (0.3, -0.3)}),
])
def test_check_deviation_of_independently_trained_inputs(reg, run_pem, adapters, expression, coefficients):
    per_layer, overall = module_deviation({k: adapters[k] for k in coefficients}, coefficients)
    assert overall > 0.1  # cross terms B_x @ A_y: far from the exact sum
    report = reg.check(expression, deviation=True)
    assert report.composable and report.deviation is not None
    assert report.deviation.overall == pytest.approx(overall, rel=1e-4)
    assert len(report.deviation.per_layer) == len(per_layer)
    for layer, value in report.deviation.per_layer.items():
        module = next(m for m in per_layer if layer.endswith(m))
        assert value == pytest.approx(per_layer[module], rel=1e-4)
    result = run_pem("check", expression, "--deviation", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["deviation"]["overall"] == pytest.approx(overall, rel=1e-4)


def test_check_deviation_is_zero_when_the_inputs_share_their_a(reg, run_pem, adapters):
    per_layer, overall = module_deviation({"x": adapters["x"], "shared": adapters["shared"]}, {"x": (0.5, 0.5), "shared": (0.5, 0.5)})
    assert overall < 1e-12
    report = reg.check("0.5*team/x + 0.5*team/shared", deviation=True)
    assert report.deviation.overall < 1e-6
    assert all(v < 1e-6 for v in report.deviation.per_layer.values())
    result = run_pem("check", "0.5*team/x + 0.5*team/shared", "--deviation")
    assert result.exit_code == 0 and "deviation" in result.stdout
