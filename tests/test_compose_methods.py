"""The non-linear merges (issue 15): TIES, DARE, magnitude pruning in full and core space,
``svd`` from the factors, the rank they record (issue 14 item 11), and their checks.

Expected values come from HF PEFT (``add_weighted_adapter`` with the ``*_svd`` combination
types, and ``peft.utils.merge_utils`` on cores this file computes itself) or from SEMANTICS.md's
formulas written here in torch; the registry's output is read back through ``Registry.export``.
DARE is random: PEFT draws its masks from torch's global generator, so the tests hand PEFT
the registry's masks (``dare_mask``, keyed by seed, layer and input position) and compare
everything that follows.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from helpers import make_ia3, make_lora, tiny_llama
from independent import effects, lora_layers, out, reg  # noqa: F401  (fixtures)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RTOL, ATOL = 1e-4, 1e-5  # float32 SVDs on both sides
WEIGHTS = {"a": 0.5, "b": 0.7, "c": -0.3}  # different alphas and ranks, one negative weight
EXPRESSION = "0.5*team/a + 0.7*team/b - 0.3*team/c"
PREFIX = "base_model.model."
DENSITY = 0.5
SEED = 1234


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-methods")
    return {
        "a": make_lora(root / "a", seed=21, r=4, lora_alpha=8),
        "b": make_lora(root / "b", seed=22, r=8, lora_alpha=4),
        "c": make_lora(root / "c", seed=23, r=2, lora_alpha=16),
        "d": make_lora(root / "d", seed=26, r=12, lora_alpha=24),  # with a and b: ranks sum to 24 > 16 features
        "p": make_ia3(root / "p", seed=24),
        "q": make_ia3(root / "q", seed=25),
    }


def canonical_positions(reg) -> dict[str, int]:
    """The registry computes inputs in canonical order, by digest: DARE's masks are keyed by it."""
    keys = sorted("abc", key=lambda k: reg.infos[k].digest)
    return {key: keys.index(key) for key in "abc"}


class FixedMasks:
    """Replaces PEFT's random pruning by the registry's masks: each tensor PEFT prunes is
    recognised as one input's effect (or core) at one layer, and gets that input's mask."""

    def __init__(self, candidates: dict[tuple[str, int], torch.Tensor], seed: int):
        self.candidates, self.seed, self.used = candidates, seed, []

    def __call__(self, tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        from registry.adapters.lora.merging import dare_mask

        matches = [key for key, value in self.candidates.items()
                   if value.shape == tensor.shape
                   and torch.allclose(value.to(tensor.dtype), tensor, rtol=1e-5, atol=1e-7)]
        assert len(matches) == 1, f"{len(matches)} inputs match the tensor PEFT prunes"
        layer, position = matches[0]
        self.used.append(matches[0])
        pruned = tensor * dare_mask(self.seed, layer, position, tensor.shape, density, tensor.dtype)
        return pruned / density if rescale else pruned


def peft_merge(
    adapters: dict[str, Path], combination: str, monkeypatch=None, masks=None, **options
) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter over a, b, c with WEIGHTS: module -> delta (float64)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if masks is not None:
        monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", masks)
    model = PeftModel.from_pretrained(tiny_llama(), str(adapters["a"]), adapter_name="a")
    model.load_adapter(str(adapters["b"]), adapter_name="b")
    model.load_adapter(str(adapters["c"]), adapter_name="c")
    model.add_weighted_adapter(list("abc"), [WEIGHTS[k] for k in "abc"], "merged", combination_type=combination,
                               **options)
    with torch.no_grad():
        return {
            name: module.get_delta_weight("merged").double()
            for name, module in model.base_model.model.named_modules()
            if isinstance(module, LoraLayer) and "merged" in module.lora_A
        }


def assert_same_effects(folder: Path, expected: dict[str, torch.Tensor], rtol=RTOL, atol=ATOL) -> None:
    ours = effects(folder)
    assert sorted(ours) == sorted(expected)
    for module, delta in expected.items():
        torch.testing.assert_close(ours[module], delta, rtol=rtol, atol=atol, msg=lambda m: f"{module}: {m}")


# --- full space: PEFT's *_svd combination types ----------------------------------------------------


@pytest.mark.parametrize("method,options,rank", [
    ("ties", {}, None),
    ("ties", {"majority_sign": "frequency"}, 3),
    ("magnitude_prune", {}, None),
    ("magnitude_prune", {}, 5),
])
def test_full_space_equals_peft_svd_types(reg, out, adapters, method, options, rank):
    info = reg.compose(EXPRESSION, f"team/{method}-{rank}", method=method, density=DENSITY, rank=rank, **options)
    peft_options = {"majority_sign_method": options["majority_sign"]} if options else {}
    expected = peft_merge(adapters, f"{method}_svd", density=DENSITY, svd_rank=rank, **peft_options)
    folder = out(info.ref)
    assert_same_effects(folder, expected)
    # PEFT's rank: svd_rank, or the largest input rank (8) without it
    assert all(a.shape[0] == (rank or 8) for a, _, _ in lora_layers(folder).values())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_full_space_dare_equals_peft_given_the_same_masks(reg, out, adapters, monkeypatch, method):
    info = reg.compose(EXPRESSION, f"team/{method}", method=method, density=DENSITY, seed=SEED)
    positions = canonical_positions(reg)
    candidates = {
        (PREFIX + module, positions[key]): delta.float()
        for key in "abc" for module, delta in effects(adapters[key]).items()
    }
    masks = FixedMasks(candidates, SEED)
    expected = peft_merge(adapters, f"{method}_svd", monkeypatch, masks, density=DENSITY)
    assert sorted(masks.used) == sorted(candidates)  # every input at every layer got its mask once
    assert_same_effects(out(info.ref), expected)


def test_dare_is_random_only_through_its_seed(reg, out):
    """Same seed, same digest (computed afresh, not shared); another seed, another digest."""
    first = reg.compose(EXPRESSION, "team/d1", method="dare_ties", density=DENSITY, seed=SEED)
    reg.remove(first.ref)
    again = reg.compose(EXPRESSION, "team/d2", method="dare_ties", density=DENSITY, seed=SEED)
    other = reg.compose(EXPRESSION, "team/d3", method="dare_ties", density=DENSITY, seed=SEED + 1)
    assert again.digest == first.digest
    assert other.digest != first.digest
    assert reg.get(again.ref).provenance.parameters["seed"] == SEED


# --- core space ---------------------------------------------------------------------------------


def test_svd_with_the_sum_of_ranks_equals_exact(reg, out):
    exact = effects(out(reg.compose(EXPRESSION, "team/exact", method="exact").ref))
    svd = reg.compose(EXPRESSION, "team/svd14", method="svd", rank=14)  # 4 + 8 + 2
    assert_same_effects(out(svd.ref), exact)
    for method in ("ties", "magnitude_prune"):  # density 1 prunes nothing: a linear merge in core space
        info = reg.compose(EXPRESSION, f"team/{method}-core", method=method, density=1.0, space="core", rank=14)
        if method == "magnitude_prune":
            assert_same_effects(out(info.ref), exact)
        else:
            assert reg.get(info.ref).provenance.parameters["space"] == "core"


def test_stacked_ranks_beyond_the_layer_size_still_give_exact(reg, out):
    """4 + 8 + 12 = 24 stacked ranks on 16 x 16 layers: the bases have 16 columns, not 24."""
    expression = "0.5*team/a - 0.7*team/b + team/d"
    exact = effects(out(reg.compose(expression, "team/exact24", method="exact").ref))
    for method, options in (("svd", {}), ("magnitude_prune", {"density": 1.0, "space": "core"})):
        info = reg.compose(expression, f"team/{method}24", method=method, rank=24, **options)
        assert reg.get(info.ref).provenance.results["effective_rank"] == 16
        assert_same_effects(out(info.ref), exact)


def independent_cores(folders: list[Path], module: str):
    """(U_B, [M_i], V_A) from SEMANTICS.md section 3, in float64: bases of the stacked factors."""
    layers = [lora_layers(f)[module] for f in folders]
    u_b = torch.linalg.svd(torch.cat([b for _, b, _ in layers], dim=1), full_matrices=False)[0]
    v_a = torch.linalg.svd(torch.cat([a for a, _, _ in layers], dim=0).T, full_matrices=False)[0]
    return u_b, [u_b.T @ (s * b @ a) @ v_a for a, b, s in layers], v_a


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "dare_linear"])
def test_core_space_is_peft_merge_on_the_cores(reg, out, adapters, monkeypatch, method):
    from peft.utils import merge_utils

    options = {"seed": SEED} if method.startswith("dare") else {}
    info = reg.compose(EXPRESSION, f"team/{method}-core", method=method, density=DENSITY, space="core", **options)
    order = sorted("abc", key=lambda k: reg.infos[k].digest)  # the registry stacks inputs in canonical order
    positions = canonical_positions(reg)
    expected = {}
    for module in lora_layers(adapters["a"]):
        u_b, cores, v_a = independent_cores([adapters[k] for k in order], module)
        if method.startswith("dare"):
            monkeypatch.setattr(merge_utils, "random_pruning", FixedMasks(
                {(PREFIX + module, positions[k]): core.float() for k, core in zip(order, cores)}, SEED))
        weights = torch.tensor([WEIGHTS[k] for k in order])
        merged = getattr(merge_utils, method)([c.float() for c in cores], weights, DENSITY).double()
        u, s, vh = torch.linalg.svd(merged)
        expected[module] = u_b @ (u[:, :8] * s[:8]) @ vh[:8] @ v_a.T  # rank 8, the largest input rank
    assert_same_effects(out(info.ref), expected)


# --- ranks: requested and effective (issue 14 item 11) ---------------------------------------------


def test_a_rank_above_the_sum_of_ranks_is_capped_and_both_are_recorded(reg, out, run_pem):
    report = reg.check("team/a + team/b", method="svd", rank=100000)
    assert report.output.rank == 12  # 4 + 8: the exact rank
    assert any("--rank 100000" in note and "rank 12" in note for note in report.notes)
    info = reg.compose("team/a + team/b", "team/big-rank", method="svd", rank=100000)
    provenance = reg.get(info.ref).provenance
    assert provenance.parameters["rank"] == 100000
    assert provenance.results["effective_rank"] == 12
    assert all(a.shape[0] == 12 for a, _, _ in lora_layers(out(info.ref)).values())
    assert provenance.results["relative_truncation_error"] < 1e-5
    shown = run_pem("show", info.ref)
    assert "effective_rank=12" in shown.stdout and "rank=100000" in shown.stdout


def test_full_space_rank_is_capped_by_the_layer_shape_only(reg):
    # a non-linear merge of dense effects has full rank: 16 is the tiny layers' size
    report = reg.check("team/a + team/b", method="ties", density=0.5, rank=100)
    assert report.output.rank == 16
    core = reg.check("team/a + team/b", method="ties", density=0.5, rank=100, space="core")
    assert core.output.rank == 12


# --- checked before any tensor is read --------------------------------------------------------------


BAD = {
    "density-zero": (["--method", "ties", "--density", "0"], "must lie in (0, 1]"),
    "density-above-one": (["--method", "ties", "--density", "1.5"], "must lie in (0, 1]"),
    "density-nan": (["--method", "magnitude_prune", "--density", "nan"], "must lie in (0, 1]"),
    "density-with-exact": (["--method", "exact", "--density", "0.5"], "takes no parameter density"),
    "seed-with-ties": (["--method", "ties", "--density", "0.5", "--seed", "1"], "takes no parameter seed"),
    "space-with-svd": (["--method", "svd", "--space", "core"], "takes no parameter space"),
    "no-density": (["--method", "ties"], "needs --density"),
    "dare-without-seed": (["--method", "dare_ties", "--density", "0.5"], "needs --seed"),
    "negative-seed": (["--method", "dare_linear", "--density", "0.5", "--seed", "-1"], "--seed must be from 0"),
    "rank-zero": (["--method", "ties", "--density", "0.5", "--rank", "0"], "--rank must be from 1"),
    "unknown-space": (["--method", "ties", "--density", "0.5", "--space", "diagonal"], "diagonal"),
    "unknown-sign": (["--method", "ties", "--density", "0.5", "--majority-sign", "mean"], "mean"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_parameters_are_refused_with_nothing_written(reg, run_pem, home, case):
    options, message = BAD[case]
    before = sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file())
    result = run_pem("compose", "team/a + team/b", "--name", "team/bad", *options)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file()) == before
    assert [m.ref for m in reg.list() if m.ref.startswith("team/bad")] == []


NOT_FINITE_MERGES = {
    # DARE divides the masked entries by the density, which is 0 in float32 at 1e-300: 0/0.
    "density-zero-in-float32": ("team/a + team/b", ["--method", "dare_linear", "--density", "1e-300", "--seed", "1"]),
    # A weight within float32 that the rescaling by 1/density (and the values) take beyond it:
    # the merges' weights alone are checked before reading, so this is found on the values.
    "weight-times-values": ("3e38*team/a + team/b", ["--method", "dare_ties", "--density", "0.5", "--seed", "1"]),
}


@pytest.mark.parametrize("case", sorted(NOT_FINITE_MERGES))
def test_a_merge_that_is_not_finite_is_one_line_with_nothing_written(reg, run_pem, home, case):
    expression, options = NOT_FINITE_MERGES[case]
    before = sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file())
    result = run_pem("compose", expression, "--name", "team/bad", *options)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "LinAlgError" not in result.output, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "not finite" in result.output and "--density" in result.output, result.output
    assert sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file()) == before
    assert [m.ref for m in reg.list() if m.ref.startswith("team/bad")] == []


def test_parameters_are_checked_before_the_catalog_or_tensors(reg, monkeypatch):
    from registry.compose import engine
    from registry.errors import UnsupportedMethodError

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(engine.InputBlob, "read_layer", no_reading)
    with pytest.raises(UnsupportedMethodError, match="must lie in"):
        reg.compose("team/a + team/nonexistent", "team/bad", method="ties", density=0.0)


def test_ia3_is_refused_by_the_merges_with_a_message(reg):
    report = reg.check("team/p + team/q", method="ties", density=0.5)
    assert not report.composable
    assert any("'ties' does not apply to IA3" in v and "LORA" in v for v in report.violations)


# --- check: estimate and deviation -----------------------------------------------------------------


def test_check_estimates_and_measures_deviation_from_the_weighted_sum(reg, out, adapters, run_pem):
    report = reg.check(EXPRESSION, method="ties", density=DENSITY, deviation=True)
    assert report.output.estimated_seconds > 0 and report.output.estimated_peak_bytes > 0
    core = reg.check(EXPRESSION, method="ties", density=DENSITY, space="core")
    assert core.output.estimated_seconds <= report.output.estimated_seconds
    # expected: the composed output's B@A against the plain weighted sum, per layer and pooled
    merged = effects(out(reg.compose(EXPRESSION, "team/t", method="ties", density=DENSITY).ref))
    plain = {m: sum(WEIGHTS[k] * effects(adapters[k])[m] for k in "abc") for m in merged}
    for module in merged:
        difference = torch.linalg.matrix_norm(merged[module] - plain[module])
        expected = float(difference / torch.linalg.matrix_norm(plain[module]))
        assert report.deviation.per_layer[PREFIX + module] == pytest.approx(expected, rel=1e-3)
    error = sum(float(torch.linalg.matrix_norm(merged[m] - plain[m])) ** 2 for m in merged)
    norm = sum(float(torch.linalg.matrix_norm(plain[m])) ** 2 for m in merged)
    assert report.deviation.overall == pytest.approx((error / norm) ** 0.5, rel=1e-3)
    shown = run_pem("check", EXPRESSION, "--method", "ties", "--density", "0.5")
    assert shown.exit_code == 0 and "estimate    about" in shown.stdout


def test_deviation_of_large_effects_is_measured_not_nan(reg):
    # TIES is homogeneous (trim by magnitude, sign election, disjoint mean, SVD all scale with
    # the weights), so its relative deviation at weights 1e30 is the one at weights 1, which
    # the test above checks against an independent computation. Squares of 1e30 overflow float32.
    small = reg.check("team/a + team/b", method="ties", density=DENSITY, deviation=True).deviation
    large = reg.check("1e30*team/a + 1e30*team/b", method="ties", density=DENSITY, deviation=True).deviation
    assert large.overall == pytest.approx(small.overall, rel=1e-3)
    assert large.per_layer == pytest.approx(small.per_layer, rel=1e-3)


# --- provenance, contents, verify, export ----------------------------------------------------------


ALL = {
    "svd": {},
    "ties": {"density": DENSITY},
    "dare_linear": {"density": DENSITY, "seed": SEED},
    "dare_ties": {"density": DENSITY, "seed": SEED, "majority_sign": "frequency"},
    "magnitude_prune": {"density": DENSITY},
    "ties-core": {"density": DENSITY, "space": "core"},
    "dare_ties-core": {"density": DENSITY, "seed": SEED, "space": "core"},
}


def test_every_method_records_its_parameters_verifies_and_loads_in_peft(reg, out):
    from peft import PeftModel

    for key, options in ALL.items():
        method = key.removesuffix("-core")
        info = reg.compose(EXPRESSION, f"team/{key}", method=method, **options)
        provenance = reg.get(info.ref).provenance
        assert provenance.method == method
        assert {k: provenance.parameters[k] for k in options} == options
        assert provenance.parameters["rank"] == 8 and provenance.results["effective_rank"] == 8
        assert 0 <= provenance.results["relative_truncation_error"] < 1
        contents = reg.contents(info.ref)
        assert contents.root_linear is False
        assert sorted(t.ref for t in contents.terms) == ["team/a@1", "team/b@1", "team/c@1"]
        folder = out(info.ref)
        model = PeftModel.from_pretrained(tiny_llama(), str(folder))
        expected = effects(folder)
        for name, module in model.base_model.model.named_modules():
            if name in expected:
                torch.testing.assert_close(module.get_delta_weight("default").double(), expected[name],
                                           rtol=1e-5, atol=1e-6)
    report = reg.verify()
    assert report.ok, report.failures
    assert report.rederived == len(ALL)
    assert not any("compared by effect" in note for note in report.notes)  # same stack: same digests


def _set_method_version(reg, ref: str, version: int) -> None:
    """Change the method version a derivation records, behind the registry's back."""
    from sqlalchemy import select, update
    from sqlalchemy.orm import Session

    from registry.db.models import Derivation, Module

    namespace, rest = ref.split("/")
    name, number = rest.split("@")
    with Session(reg.engine) as session, session.begin():
        module_id = session.scalar(select(Module.id).where(
            Module.namespace == namespace, Module.name == name, Module.version == int(number)))
        changed = session.execute(
            update(Derivation).where(Derivation.module_id == module_id).values(method_version=version)).rowcount
        assert changed == 1


def _nudge_first_coefficient(reg, ref: str) -> None:
    from sqlalchemy import select, update
    from sqlalchemy.orm import Session

    from registry.db.models import DerivationInput, Module

    namespace, rest = ref.split("/")
    name, number = rest.split("@")
    with Session(reg.engine) as session, session.begin():
        module_id = session.scalar(select(Module.id).where(
            Module.namespace == namespace, Module.name == name, Module.version == int(number)))
        first = session.scalars(select(DerivationInput).where(DerivationInput.module_id == module_id)
                                .order_by(DerivationInput.position)).first()
        session.execute(update(DerivationInput).where(DerivationInput.module_id == module_id,
                                                      DerivationInput.position == first.position)
                        .values(b=first.b * (1 + 1e-6)))


def test_verify_checks_an_old_svd_by_effect_and_fails_what_it_cannot_rederive(reg, run_pem):
    svd = reg.compose(EXPRESSION, "team/old-svd", method="svd")
    exact = reg.compose(EXPRESSION, "team/old-exact", method="exact")
    _set_method_version(reg, svd.ref, 1)  # made by the dense SVD of version 1
    # Version 1's bits differ from version 2's: stand for that by moving one recorded
    # coefficient by 1e-6 (B@A moves by about 1e-6 relative, far below the 1e-4 tolerance).
    _nudge_first_coefficient(reg, svd.ref)
    report = reg.verify(svd.ref)
    assert report.ok, report.failures
    assert len(report.notes) == 1 and "svd version 1 re-derived with version 2 within its recorded tolerance" in (
        report.notes[0])
    _set_method_version(reg, exact.ref, 7)  # a version this pem does not compute
    report = reg.verify()
    assert not report.ok
    assert [(f.ref, "exact version 7" in f.problem and "cannot re-derive" in f.problem) for f in report.failures] == [
        (exact.ref, True)
    ]
    result = run_pem("verify", "--all")
    assert result.exit_code == 1 and f"FAILED {exact.ref}: cannot re-derive" in result.stdout


def test_svd_version_one_is_checked_against_the_dense_svd(reg, out, adapters):
    """Version 2 (from the factors) gives what version 1 (a dense SVD of each delta) gave."""
    info = reg.compose(EXPRESSION, "team/svd-v2", method="svd", rank=5)
    expected = {}
    for module in lora_layers(adapters["a"]):
        delta = sum(WEIGHTS[k] * effects(adapters[k])[module] for k in "abc").float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        expected[module] = (u[:, :5] * s[:5] @ vh[:5]).double()
    assert_same_effects(out(info.ref), expected)


def test_config_of_a_merge_has_scaling_one(reg, out):
    folder = out(reg.compose(EXPRESSION, "team/cfg", method="ties", density=DENSITY, rank=3).ref)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["use_rslora"] is False


# --- the merge functions against PEFT's merge_utils, on random tensors --------------------------------


@pytest.mark.parametrize("method,majority_sign", [
    ("ties", "total"), ("ties", "frequency"), ("dare_ties", "total"), ("dare_ties", "frequency"),
    ("magnitude_prune", "total"), ("dare_linear", "total"),
])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.93, 1.0])
def test_merge_functions_equal_peft_merge_utils(monkeypatch, method, majority_sign, density):
    """The registry's merges hold one tensor at a time and threshold instead of topk; on tensors
    without ties in magnitude they equal PEFT's stacked definitions."""
    from peft.utils import merge_utils

    from registry.adapters.lora.merging import MERGES, MergeInput, dare_mask

    generator = torch.Generator().manual_seed(zlib.crc32(f"{method}:{majority_sign}:{density}".encode()))
    tensors = [torch.randn((7, 9), generator=generator, dtype=torch.float64) * scale for scale in (1.0, 0.3, 2.0)]
    weights = [0.5, -1.25, 0.75]
    masks = iter([dare_mask(SEED, "layer", n, (7, 9), density, torch.float64) for n in range(3)])
    monkeypatch.setattr(merge_utils, "random_pruning",
                        lambda t, d, rescale: t * next(masks) / (d if rescale else 1.0))
    options = {"majority_sign_method": majority_sign} if method in ("ties", "dare_ties") else {}
    expected = getattr(merge_utils, method)([t.clone() for t in tensors], torch.tensor(weights, dtype=torch.float64),
                                            density, **options)
    merged = MERGES[method](MergeInput(
        tensors=[t.clone() for t in tensors], weights=weights, positions=[0, 1, 2], layer="layer",
        parameters={"density": density, "seed": SEED, "majority_sign": majority_sign}))
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
