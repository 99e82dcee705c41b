"""Compositions against HF PEFT itself: ``add_weighted_adapter`` (``cat`` and ``svd``), and the
outputs of the tiny model with a composed module loaded by ``PeftModel.from_pretrained``.

Expected values come from PEFT, or from SEMANTICS.md's formulas written here in torch from the
input adapters' tensors; the registry's output is read back through ``Registry.export``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from helpers import make_ia3, make_lora, tensors, tiny_llama
from independent import effects, lora_layers, module_of, out, reg  # noqa: F401  (fixtures)

peft = pytest.importorskip("peft")

RTOL, ATOL = 1e-5, 1e-6
SVD_RTOL, SVD_ATOL = 1e-4, 1e-5
WEIGHTS = [0.5, 0.5, -0.3]
EXPRESSION = "0.5*team/a + 0.5*team/b - 0.3*team/c"  # the same weights, in the same order


# --- independent readers (SEMANTICS.md section 1) ------------------------------------------------


def exact_sum(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    per_input = [lora_layers(f) for f in folders]
    return {m: sum(w * l[m][2] * l[m][1] @ l[m][0] for w, l in zip(weights, per_input)) for m in per_input[0]}


def frobenius_ratio(numerator: dict[str, torch.Tensor], denominator: dict[str, torch.Tensor]) -> float:
    """sqrt(sum_layers ||n||_F^2) / sqrt(sum_layers ||d||_F^2): all layers pooled."""
    num = sum(float(torch.linalg.matrix_norm(t)) ** 2 for t in numerator.values())
    den = sum(float(torch.linalg.matrix_norm(t)) ** 2 for t in denominator.values())
    return math.sqrt(num / den)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-peft")
    return {
        # different ranks and different lora_alpha
        "a": make_lora(root / "a", seed=11, r=4, lora_alpha=8),
        "b": make_lora(root / "b", seed=12, r=8, lora_alpha=4),
        "c": make_lora(root / "c", seed=13, r=2, lora_alpha=16),
        "d": make_lora(root / "d", seed=14, r=4, lora_alpha=16),  # the rank of a, for method module
        "p": make_ia3(root / "p", seed=15),
        "q": make_ia3(root / "q", seed=16),
    }


@pytest.fixture(scope="module")
def peft_merged(adapters) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """PEFT's add_weighted_adapter(["a", "b", "c"], WEIGHTS) with cat and svd, per layer:
    {module: {combination: {"delta", "A", "B"}}}."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(tiny_llama(), str(adapters["a"]), adapter_name="a")
    model.load_adapter(str(adapters["b"]), adapter_name="b")
    model.load_adapter(str(adapters["c"]), adapter_name="c")
    model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b", "c"], WEIGHTS, "svd", combination_type="svd")
    merged = {}
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and "cat" in module.lora_A:
                merged[name] = {
                    combination: {
                        "delta": module.get_delta_weight(combination).double(),
                        "A": module.lora_A[combination].weight.double().clone(),
                        "B": module.lora_B[combination].weight.double().clone(),
                        "scaling": module.scaling[combination],
                    }
                    for combination in ("cat", "svd")
                }
    return merged


# --- add_weighted_adapter -----------------------------------------------------------------------


def test_peft_reference_is_the_semantics(adapters, peft_merged):
    """Guard for the tests below: PEFT's cat is the exact weighted sum of effects."""
    expected = exact_sum([adapters[k] for k in "abc"], WEIGHTS)
    for module, merged in peft_merged.items():
        torch.testing.assert_close(merged["cat"]["delta"], expected[module], rtol=RTOL, atol=ATOL)


def test_exact_equals_peft_cat(reg, out, adapters, peft_merged):
    info = reg.compose(EXPRESSION, "team/cat", method="exact")
    folder = out(info.ref)
    ours = lora_layers(folder)
    assert sorted(ours) == sorted(peft_merged)
    ranks = {"a": 4, "b": 8, "c": 2}
    for module, merged in peft_merged.items():
        a, b, s = ours[module]
        torch.testing.assert_close(s * b @ a, merged["cat"]["delta"], rtol=RTOL, atol=ATOL)
        # the factors too: PEFT puts w_i * s_i on the rows of A and concatenates B, scaling 1.
        # Our rank blocks may come in another order than PEFT's [a, b, c]: find it.
        assert s == 1.0 and merged["cat"]["scaling"] == 1.0
        assert a.shape == merged["cat"]["A"].shape == (14, 16) and b.shape == merged["cat"]["B"].shape
        peft_a = torch.split(merged["cat"]["A"], list(ranks.values()), dim=0)
        peft_b = torch.split(merged["cat"]["B"], list(ranks.values()), dim=1)
        matches = []
        for order in itertools.permutations(range(3)):
            sizes = [list(ranks.values())[i] for i in order]
            our_a, our_b = torch.split(a, sizes, dim=0), torch.split(b, sizes, dim=1)
            if all(
                torch.allclose(our_a[j], peft_a[i], rtol=RTOL, atol=ATOL)
                and torch.allclose(our_b[j], peft_b[i], rtol=RTOL, atol=ATOL)
                for j, i in enumerate(order)
            ):
                matches.append(order)
        assert matches, f"{module}: the factors are not PEFT's cat factors in any block order"


def test_svd_equals_peft_svd(reg, out, adapters, peft_merged):
    info = reg.compose(EXPRESSION, "team/svd", method="svd")
    folder = out(info.ref)
    ours = lora_layers(folder)
    assert sorted(ours) == sorted(peft_merged)
    for module, merged in peft_merged.items():
        a, b, s = ours[module]
        assert a.shape == merged["svd"]["A"].shape == (8, 16)  # the largest input rank, as svd_rank=None
        assert merged["svd"]["scaling"] == 1.0
        torch.testing.assert_close(s * b @ a, merged["svd"]["delta"], rtol=SVD_RTOL, atol=SVD_ATOL)
    # the relative truncation error, by hand, all layers pooled
    exact = exact_sum([adapters[k] for k in "abc"], WEIGHTS)
    ours_effects = effects(folder)
    by_hand = frobenius_ratio({m: exact[m] - ours_effects[m] for m in exact}, exact)
    assert by_hand > 1e-3  # rank 14 truncated to 8: a real truncation
    recorded = reg.get(info.ref).provenance.results["relative_truncation_error"]
    assert recorded == pytest.approx(by_hand, rel=1e-4)
    # and PEFT's truncation is as far from the exact sum
    peft_effects = {m: merged["svd"]["delta"] for m, merged in peft_merged.items()}
    assert frobenius_ratio({m: exact[m] - peft_effects[m] for m in exact}, exact) == pytest.approx(by_hand, rel=1e-3)


# --- composed modules loaded by PEFT change the model's outputs as predicted ---------------------


def model_logits(model) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def with_updates(updates: dict[str, torch.Tensor]):
    """A copy of the tiny base model whose weights are replaced: module -> new W."""
    model = tiny_llama()
    with torch.no_grad():
        for module, weight in updates.items():
            target = model.get_submodule(module).weight
            assert target.shape == weight.shape
            target.copy_(weight.to(target.dtype))
    return model


def base_weight(module: str) -> torch.Tensor:
    return tiny_llama().get_submodule(module).weight.detach().double()


def assert_logits(peft_folder: Path, expected_model) -> None:
    from peft import PeftModel

    got = model_logits(PeftModel.from_pretrained(tiny_llama(), str(peft_folder)))
    want = model_logits(expected_model)
    base = model_logits(tiny_llama())
    assert (want - base).abs().max() > 1e-2  # the composition moves the logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


LOGIT_CASES = {
    "module": "0.7*team/a - 0.4*team/d",
    "exact": EXPRESSION,
    "svd": EXPRESSION,
}


@pytest.mark.parametrize("method", list(LOGIT_CASES))
def test_loaded_lora_composition_changes_logits_as_predicted(reg, out, adapters, method):
    info = reg.compose(LOGIT_CASES[method], f"team/{method}", method=method)
    folder = out(info.ref)
    if method == "module":
        # dW = (0.7 s_a B_a - 0.4 s_d B_d) @ (0.7 A_a + 0.4 A_d)
        la, ld = lora_layers(adapters["a"]), lora_layers(adapters["d"])
        delta = {
            m: (0.7 * la[m][2] * la[m][1] - 0.4 * ld[m][2] * ld[m][1]) @ (0.7 * la[m][0] + 0.4 * ld[m][0]) for m in la
        }
    elif method == "exact":
        delta = exact_sum([adapters[k] for k in "abc"], WEIGHTS)
    else:  # svd: the model must move by the output's own B@A
        delta = {m: s * b @ a for m, (a, b, s) in lora_layers(folder).items()}
    assert_logits(folder, with_updates({m: base_weight(m) + d for m, d in delta.items()}))


def test_loaded_ia3_composition_changes_logits_as_predicted(reg, out, adapters):
    info = reg.compose("0.6*team/p - 0.3*team/q", "team/ia3")
    folder = out(info.ref)
    lp = {module_of(n): t.double() for n, t in tensors(adapters["p"]).items()}
    lq = {module_of(n): t.double() for n, t in tensors(adapters["q"]).items()}
    updates = {}
    for module in lp:
        vector = (1 + 0.6 * (lp[module] - 1) - 0.3 * (lq[module] - 1)).flatten()
        weight = base_weight(module)
        if module.endswith("down_proj"):  # feed-forward: scales the layer's input
            updates[module] = weight @ torch.diag(vector)
        else:  # scales the layer's output
            updates[module] = torch.diag(vector) @ weight
    assert {m.rsplit(".", 1)[1] for m in updates} == {"k_proj", "v_proj", "down_proj"}
    assert_logits(folder, with_updates(updates))
