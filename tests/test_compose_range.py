"""A composition whose values can exceed the output dtype is refused before any tensor is read.

What the coefficients alone decide (a coefficient beyond the range of the dtype the
arithmetic runs in) is refused by `check` and `compose` alike. For the rest, `add` records
each tensor's largest magnitude, and each layer's B@A is bounded by r * max|B| * max|A| *
|coefficients| (SEMANTICS.md section 3 for where each method puts the coefficients). Every
expected bound below is worked out by hand from the tensors written here.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from registry.errors import IncompatibleModulesError

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"
KEY = "model.layers.0.self_attn.q_proj"

# r = 2, in = 3, out = 2; max|A| = 4, max|B| = 3; lora_alpha 4, so the scaling s = 4 / 2 = 2.
X_A = [[1.0, -4.0, 0.5], [2.0, 0.0, 1.0]]
X_B = [[3.0, -1.0], [0.5, 2.0]]
# r = 1; max|A| = 0.5, max|B| = 10; lora_alpha 1, s = 1.
Y_A = [[0.5, -0.25, 0.0]]
Y_B = [[-10.0], [1.0]]


def write_lora(folder: Path, a: list, b: list, alpha: float, dtype=np.float32) -> Path:
    folder.mkdir(parents=True)
    save_file({f"{LAYER}.lora_A.weight": np.array(a, dtype=dtype), f"{LAYER}.lora_B.weight": np.array(b, dtype=dtype)},
              str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": len(a), "lora_alpha": alpha, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_ia3(folder: Path, values: list, dtype=np.float16) -> Path:
    folder.mkdir(parents=True)
    name = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    save_file({name: np.array([values], dtype=dtype).T.copy()}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": [],
              "base_model_name_or_path": "tiny-org/tiny-llama"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_bf16_lora(folder: Path) -> Path:
    """bfloat16 tensors written bit by bit (numpy has no bfloat16): A holds -6.5, B 0.375."""
    folder.mkdir(parents=True)

    def bf16(values: list[float]) -> bytes:
        return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)

    a, b = bf16([1.0, -6.5, 0.25, 2.0]), bf16([0.375, -0.125])
    header = {f"{LAYER}.lora_A.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
              f"{LAYER}.lora_B.weight": {"dtype": "BF16", "shape": [1, 2], "data_offsets": [8, 12]}}
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a + b)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def x(registry, tmp_path: Path) -> str:
    return registry.add(write_lora(tmp_path / "x", X_A, X_B, alpha=4), "team/x").ref


@pytest.fixture
def y(registry, tmp_path: Path) -> str:
    return registry.add(write_lora(tmp_path / "y", Y_A, Y_B, alpha=1), "team/y").ref


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch):
    """Fails the test if the engine is asked to compute anything."""
    from registry.compose import engine

    def refuse(*args, **kwargs):
        raise AssertionError("the engine ran: the composition should have been refused before reading tensors")

    monkeypatch.setattr(engine, "evaluate", refuse)


def forget_magnitudes(registry, ref: str) -> None:
    """Make a module look as if it was registered before magnitudes were recorded."""
    from registry.db.models import Module

    target = registry.resolve(ref)
    with registry._write_session() as session:
        module = session.get(Module, next(m for m in session.query(Module) if m.ref == target.ref).id)
        module.layers = {name: {k: v for k, v in info.items() if k != "max_abs"}
                         for name, info in module.layers.items()}
    assert "max_abs" not in registry.get(ref).layers[LAYER]


# --- recorded when added ----------------------------------------------------------------------


def test_add_records_each_tensors_largest_magnitude(registry, tmp_path: Path, x) -> None:
    assert registry.get(x).layers[LAYER]["max_abs"] == {"lora_A": 4.0, "lora_B": 3.0}
    f16 = registry.add(write_lora(tmp_path / "h", [[0.5, -1000.0]], [[7.0], [-0.25]], 1, np.float16), "team/h")
    assert registry.get(f16.ref).layers[LAYER]["max_abs"] == {"lora_A": 1000.0, "lora_B": 7.0}
    bf16 = registry.add(write_bf16_lora(tmp_path / "b"), "team/b")
    assert registry.get(bf16.ref).layers[LAYER]["max_abs"] == {"lora_A": 6.5, "lora_B": 0.375}


def test_a_tensor_holding_nan_makes_every_composition_of_it_refused(registry, tmp_path: Path, no_evaluation) -> None:
    folder = write_lora(tmp_path / "n", [[1.0, float("nan")]], [[1.0], [2.0]], 1)
    info = registry.add(folder, "team/n", allow_nonfinite=True)
    assert registry.get(info.ref).layers[LAYER]["max_abs"] == {"lora_A": None, "lora_B": 2.0}
    report = registry.check("0.5*team/n", method="exact")
    assert not report.composable
    assert report.violations == [f"team/n@1 holds NaN or Inf values at {KEY}: the result would not be finite"]


# --- what the coefficients alone decide -------------------------------------------------------


def test_a_coefficient_beyond_float32_is_refused_by_check_and_compose(registry, x, no_evaluation, run_pem) -> None:
    forget_magnitudes(registry, x)  # decided without any magnitude
    report = registry.check("1e39*team/x", method="exact")
    assert not report.composable
    assert report.violations == [
        "the coefficient 1e+39 of team/x@1 times its scaling 2 is beyond the float32 range (3.403e+38): "
        "the result would not be finite"
    ]
    # 2e38 alone fits in float32, times the scaling 2 it does not.
    assert not registry.check("2e38*team/x", method="exact").composable
    with pytest.raises(IncompatibleModulesError, match="beyond the float32 range"):
        registry.compose("1e39*team/x", "team/big", method="exact")
    assert [m.ref for m in registry.list()] == ["team/x@1"]
    result = run_pem("check", "1e39*team/x", "--method", "exact")
    assert result.exit_code == 1 and "not composable" in result.output and "beyond the float32 range" in result.output


# --- bounds from the recorded magnitudes ------------------------------------------------------


def test_exact_bound_is_the_sum_over_inputs(registry, x, y, no_evaluation) -> None:
    # x: r 2 * |b| 1e37 * s 2 * max|B| 3 * max|A| 4 = 4.8e38 > 3.403e38 (float32), whereas the
    # coefficient times the scaling, 2e37, fits.
    report = registry.check("1e37*team/x", method="exact")
    assert report.violations == [
        f"the result would not be finite in float32: B@A at {KEY} may reach 4.8e+38 "
        "(rank x max|B| x max|A| x coefficients), beyond its largest value 3.403e+38: lower the coefficients"
    ]
    # 1e36: 4.8e37 for x; + y: r 1 * 3e37 * s 1 * 10 * 0.5 = 1.5e38; the sum 1.98e38 fits ...
    assert registry.check("1e36*team/x + 3e37*team/y", method="exact").composable
    # ... and 1e36 * x + 6e37 * y: 4.8e37 + 3e38 = 3.48e38 does not.
    report = registry.check("1e36*team/x - 6e37*team/y", method="exact")
    assert not report.composable and "may reach 3.48e+38" in report.violations[0]


def test_module_bound_puts_the_coefficient_on_both_factors(registry, x, no_evaluation) -> None:
    # a = b = 1e30: max|A_out| = 1e30 * 4, max|B_out| = 1e30 * s 2 * 3; B@A <= r 2 * 6e30 * 4e30 = 4.8e61.
    report = registry.check("1e30*team/x")
    assert not report.composable
    assert f"B@A at {KEY} may reach 4.8e+61" in report.violations[0]
    # a = b = 1e18: 2 * 6e18 * 4e18 = 4.8e37 fits.
    assert registry.check("1e18*team/x").composable
    with pytest.raises(IncompatibleModulesError, match="may reach 4.8e\\+61"):
        registry.compose("1e30*team/x", "team/big")


def test_float16_output_is_bounded_by_its_own_range(registry, x) -> None:
    # exact, 1000 * x in float16: 2 * 1000 * 2 * 3 * 4 = 48000 <= 65504; 2000 gives 96000.
    assert registry.check("1000*team/x", method="exact", dtype="float16").composable
    report = registry.check("2000*team/x", method="exact", dtype="float16")
    assert "the result would not be finite in float16" in report.violations[0]
    assert "may reach 9.6e+04" in report.violations[0]


def test_under_the_bound_the_composition_and_its_effect_are_finite(registry, x, home: Path) -> None:
    import torch

    info = registry.compose("1e18*team/x", "team/ok")
    tensors = load_file(str(registry.store.local_path(info.digest)))
    a, b = (torch.from_numpy(tensors[f"{LAYER}.lora_{p}.weight"]) for p in "AB")
    assert torch.isfinite(b @ a).all()  # what PEFT computes when it applies the module
    # The composed module's own magnitudes are recorded: the output's largest values.
    recorded = registry.get(info.ref).layers[LAYER]["max_abs"]
    assert recorded == {"lora_A": float(a.abs().max()), "lora_B": float(b.abs().max())}
    assert recorded["lora_A"] == pytest.approx(4e18) and recorded["lora_B"] == pytest.approx(6e18)


def test_ia3_bound(registry, tmp_path: Path, no_evaluation) -> None:
    # l = 1 + b (l_1 - 1), |l| <= 1 + |b| (max|l_1| + 1) = 1 + 20000 * 2.5 = 50001 <= 65504 (float16)
    registry.add(write_ia3(tmp_path / "v", [1.5, 0.5]), "team/v")
    assert registry.check("20000*team/v").composable
    report = registry.check("30000*team/v")  # 1 + 30000 * 2.5 = 75001
    assert "ia3_l at model.layers.0.self_attn.k_proj may reach 7.5e+04" in report.violations[0]


# --- modules registered before magnitudes were recorded ---------------------------------------


def test_without_magnitudes_check_says_the_bound_is_unknown(registry, x, no_evaluation) -> None:
    forget_magnitudes(registry, x)
    report = registry.check("1e30*team/x")
    assert report.composable
    assert any("largest values of team/x@1 are not recorded" in note for note in report.notes)


def test_compose_records_magnitudes_on_first_use_and_refuses_before_computing(registry, x, no_evaluation) -> None:
    forget_magnitudes(registry, x)
    with pytest.raises(IncompatibleModulesError, match="may reach 4.8e\\+61"):
        registry.compose("1e30*team/x", "team/big")
    assert registry.get(x).layers[LAYER]["max_abs"] == {"lora_A": 4.0, "lora_B": 3.0}
    assert not registry.check("1e30*team/x").composable


def test_verify_records_missing_magnitudes(registry, x, y) -> None:
    forget_magnitudes(registry, x)
    forget_magnitudes(registry, y)
    report = registry.verify(x)
    assert report.ok
    assert any("recorded the largest tensor values of 1 blob" in note for note in report.notes)
    assert registry.get(x).layers[LAYER]["max_abs"] == {"lora_A": 4.0, "lora_B": 3.0}
    assert "max_abs" not in registry.get(y).layers[LAYER]
    registry.verify()
    assert registry.get(y).layers[LAYER]["max_abs"] == {"lora_A": 0.5, "lora_B": 10.0}
    assert not any("recorded" in note for note in registry.verify().notes)  # nothing left to record


def test_a_corrupt_blob_is_not_measured(registry, x, no_evaluation) -> None:
    forget_magnitudes(registry, x)
    blob = registry.store.local_path(registry.resolve(x).digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x40
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    from registry.errors import BlobStoreError

    with pytest.raises(BlobStoreError, match="corrupt"):
        registry.compose("1e30*team/x", "team/big")
    assert "max_abs" not in registry.get(x).layers[LAYER]
    assert not registry.verify(x).ok
    assert "max_abs" not in registry.get(x).layers[LAYER]


def test_merge_methods_refuse_a_weight_beyond_float32(registry, x, no_evaluation) -> None:
    # TIES and DARE weight s_i B_i A_i by b_i: b_i itself must be a float32 (their pruning and
    # rescaling are not bounded here).
    report = registry.check("1e39*team/x", method="ties", density=0.5)
    assert report.violations == [
        "the coefficient 1e+39 of team/x@1 is beyond the float32 range (3.403e+38): the result would not be finite"
    ]
    assert registry.check("2e38*team/x", method="ties", density=0.5).composable  # s is not applied to b
