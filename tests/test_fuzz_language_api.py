"""Fuzzing the composition language through the API (issue 8): ``Registry.check`` of any
expression, with any method, rank, dtype and union flag, on a registry holding two modules,
raises nothing but :class:`PemError` (the parser-level properties are in test_language.py).
And the plan it reports is stable: checking the canonical form gives the same canonical form
and the same terms.
"""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from registry.errors import PemError
from registry.language import BinOp, Neg, Number, Ref, canonical

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
LAYERS = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj")


def make_adapter(folder: Path, seed: int, r: int, peft_type: str = "LORA") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in LAYERS:
        tensors[f"{layer}.lora_A.weight"] = (rng.standard_normal((r, 16)) * 0.3).astype(np.float32)
        tensors[f"{layer}.lora_B.weight"] = (rng.standard_normal((16, r)) * 0.3).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": peft_type, "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def two_modules(registry, tmp_path: Path):
    """team/a (rank 4) and team/b (rank 8): composable with 'exact' and 'svd', not 'module'."""
    a = registry.add(make_adapter(tmp_path / "a", seed=1, r=4), "team/a")
    b = registry.add(make_adapter(tmp_path / "b", seed=2, r=8), "team/b")
    return registry, a, b


REFS = ["team/a", "team/b", "team/a@1", "team/b@1", "team/a@2", "team/a@0", "team/a@prod", "team/c", "team/a-b",
        "team/b.v2", "sha256:00000000", "sha256:0123456789abcdef", "x/y", "1/3", "team/a@99999999999999999999"]


def numbers():
    return st.one_of(
        st.integers(0, 10**6).map(Fraction),
        st.builds(lambda n, k: Fraction(n, 10**k), st.integers(0, 10**9), st.integers(0, 30)),
        st.sampled_from([Fraction(0), Fraction(1, 3), Fraction(10**300), Fraction(1, 10**300)]),
    )


def trees(refs):
    leaves = st.one_of(st.sampled_from(refs).map(Ref), numbers().map(Number))
    return st.recursive(
        leaves, lambda c: st.one_of(c.map(Neg), st.builds(BinOp, st.sampled_from("+-*/"), c, c)), max_leaves=10,
    )


options = st.fixed_dictionaries({
    "method": st.sampled_from(["module", "exact", "svd", "ties", "dare_ties", "linear", "", "MODULE", "bogus"]),
    "rank": st.one_of(st.none(), st.integers(-2, 16), st.sampled_from([2**31, 10**12, 2**63])),
    "density": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1])),
    "seed": st.one_of(st.none(), st.integers(-2, 3), st.sampled_from([2**63, 2**64])),
    "space": st.one_of(st.none(), st.sampled_from(["full", "core", "", "bogus"])),
    "dtype": st.one_of(st.none(), st.sampled_from(["F16", "F32", "BF16", "F64", "I8", "f32", "", "bogus"])),
    "union": st.booleans(),
})


DEFAULTS = {"rank": None, "dtype": None, "union": False, "density": None, "seed": None, "space": None}


def check(registry, expression: str, opts: dict):
    started = time.monotonic()
    try:
        report = registry.check(expression, **opts)
    except PemError as exc:
        assert str(exc).strip(), "an error without a message"
        return None
    finally:
        assert time.monotonic() - started < 5
    return report


def _assert_report(registry, report, opts: dict) -> None:
    assert report.composable == (report.output is not None)
    assert report.composable or report.violations
    for term in report.terms:
        assert term.ref.split("@")[0] in ("team/a", "team/b")
    if report.composable:
        # the canonical text names the same modules with the same coefficients
        again = registry.check(report.canonical, **opts)
        assert again.canonical == report.canonical
        assert [(t.digest, t.a, t.b) for t in again.terms] == [(t.digest, t.a, t.b) for t in report.terms]


SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
@FUZZ
@given(tree=trees(REFS), opts=options)
def test_check_of_any_well_formed_expression_raises_only_pem_errors(two_modules, tree, opts) -> None:
    registry = two_modules[0]
    report = check(registry, canonical(tree), opts)
    if report is not None:
        _assert_report(registry, report, opts)


@SQLITE_ONLY
@FUZZ
@given(text=st.text(alphabet="team/ab@12sha256:0 .-+*/()eE5\t\n", max_size=40), opts=options)
@example(text="team/a + team/b", opts={**DEFAULTS, "method": "exact"})
@example(text="team/a@99999999999999999999", opts={**DEFAULTS, "method": "module"})
@example(text="1e1000*team/a", opts={**DEFAULTS, "method": "module", "dtype": "F16"})
@example(text="team/a", opts={**DEFAULTS, "method": "svd", "rank": 2**63})
@example(text="team/a - team/b", opts={**DEFAULTS, "method": "ties", "density": float("nan")})
def test_check_of_random_text_raises_only_pem_errors(two_modules, text, opts) -> None:
    registry = two_modules[0]
    report = check(registry, text, opts)
    if report is not None:
        _assert_report(registry, report, opts)


@SQLITE_ONLY
@FUZZ
@given(text=st.text(max_size=30), opts=options)
def test_check_of_random_unicode_raises_only_pem_errors(two_modules, text, opts) -> None:
    check(two_modules[0], text, opts)
