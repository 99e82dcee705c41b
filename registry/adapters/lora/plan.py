"""LoRA: the output of a composition, planned from metadata (no tensors, no torch).

Every output is stored with scaling 1 on every layer (``lora_alpha`` equal to the layer's
rank, rsLoRA off): the input scalings are folded into the factors by the arithmetic. The
config is built field by field, never copied from an input, so flags such as ``use_rslora``
or DoRA cannot leak into a result whose arithmetic did not use them (SEMANTICS.md section 6).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from registry.adapters.base import (
    MAX_ABS,
    START_BYTES,
    START_SECONDS,
    TypePlan,
    beyond,
    layer_magnitudes,
    module_key,
    unknown_magnitudes_note,
    work_dtype_name,
)
from registry.safetensors_io import FLOAT_DTYPES, FLOAT_MAX

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def plan_output(inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
    layers = sorted({layer for i in inputs for layer in i.layers})
    ranks: dict[str, int] = {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    notes: list[str] = []
    resolved = dict(parameters)
    if "rank" in parameters:  # the truncating methods
        largest = max(info["rank"] for i in inputs for info in i.layers.values())
        resolved["rank"] = parameters["rank"] or largest
    capped: dict[str, int] = {}
    for layer in layers:
        present = [i.layers[layer] for i in inputs if layer in i.layers]
        out_features, in_features = present[0]["params"]["lora_B"][0], present[0]["params"]["lora_A"][1]
        if method == "module":
            rank = present[0]["rank"]
        elif method == "exact":
            rank = sum(p["rank"] for p in present)
        else:
            rank = min(resolved["rank"], truncation_cap(method, resolved, present, out_features, in_features))
            if rank < resolved["rank"]:
                capped[layer] = rank
        ranks[layer] = rank
        tensors[layer + A_SUFFIX] = (dtype, (rank, in_features))
        tensors[layer + B_SUFFIX] = (dtype, (out_features, rank))
    if capped:
        notes.append(_capped_note(method, resolved, capped, len(layers)))
    if method == "module":
        for i in inputs:
            effect = i.a * i.b  # the coefficient lands on both A and B
            if effect != i.b and len(inputs) == 1:
                notes.append(
                    f"method 'module' puts the coefficient on both A and B: the effect of {i.ref} is scaled by "
                    f"{_number(effect)}, not {_number(i.b)}; use --method exact for an effect linear in the coefficient"
                )
    config = output_config(inputs, ranks)
    return TypePlan(layers=layers, tensors=tensors, config=config, parameters=resolved, notes=notes)


def truncation_cap(
    method: str, parameters: dict[str, Any], present: list[dict], out_features: int, in_features: int
) -> int:
    """The largest rank a layer's merged effect can have. A linear merge (svd) and any merge
    in core space live in the span of the stacked factors, so at most the sum of the input
    ranks; a non-linear merge of dense effects (full space) can fill the layer's shape."""
    cap = min(out_features, in_features)
    if method == "svd" or parameters.get("space") == "core":
        cap = min(cap, sum(p["rank"] for p in present))
    return cap


def _capped_note(method: str, parameters: dict[str, Any], capped: dict[str, int], total: int) -> str:
    """Issue 14 item 11: a rank above what a layer can hold is said, not silently recorded."""
    spanned = method == "svd" or parameters.get("space") == "core"
    low, high = min(capped.values()), max(capped.values())
    return (
        f"--rank {parameters['rank']} is more than {len(capped)} of {total} layers can hold "
        f"(e.g. {module_key(next(iter(capped)))}): they get rank {low if low == high else f'{low} to {high}'}, "
        + ("the sum of the input ranks or the layer's shape, and are exact" if spanned else "the layer's shape")
    )


def _number(value: Any) -> str:
    """A coefficient for a message; exact fractions can exceed the float range."""
    try:
        return f"{float(value):g}"
    except OverflowError:
        return "a number beyond the float range"


def output_config(inputs: list[Any], ranks: dict[str, int]) -> dict[str, Any]:
    """A PEFT LoraConfig for layers of the given ranks, each with scaling 1."""
    first = inputs[0]
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    # Patterns are regexes matched against the end of the module name: escape the dots.
    pattern = {re.escape(module_key(layer)): rank for layer, rank in sorted(ranks.items()) if rank != default_rank}
    task_types = {i.config.get("task_type") for i in inputs}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": first.base_model,
        "revision": first.base_revision,
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "target_modules": sorted(module_key(layer) for layer in ranks),
        "r": default_rank,
        "lora_alpha": default_rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = rank on every layer: scaling 1
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "fan_in_fan_out": bool(first.config.get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


# --- cost estimate for `pem check` (metadata only) ----------------------------------------------
# Rates of one core of this project's machine (2 cores, torch 2.13 CPU, idle), rounded: they
# make an estimate to decide whether to start a long merge, not a promise.
READ_RATE = 1.5e9  # bytes per second from the page cache, hashed
MATMUL_RATE = 3e10  # float32 multiply-adds x 2 per second
ELEMENT_SECONDS = 1e-9  # one pass of an element-wise operation, per element
KTH_SECONDS = 5e-8  # kthvalue (magnitude pruning), per element
DENSE_SVD_SECONDS = 3e-10  # per m * n * min(m, n): a dense SVD of a full-rank delta
THIN_QR_SECONDS = 2e-10  # per m * R^2: the thin QR (and small SVDs) of a stack of factors
PRUNING = {"ties", "magnitude_prune"}
ELECTING = {"ties", "dare_ties"}


def estimate(plan: Any) -> dict[str, float | int]:
    """Time and peak memory computing ``plan`` takes, from its shapes: the per-layer work of
    its method and space (SEMANTICS.md section 3), layer after layer, and the largest layer's
    working set on top of the process's own footprint."""
    method, space = plan.method.name, plan.parameters.get("space")
    work = 8 if plan.dtype == "F64" else 4
    seconds, peak = START_SECONDS, 0.0
    for layer in plan.layers:
        present = [i.layers[layer] for i in plan.inputs if layer in i.layers]
        m, n = present[0]["params"]["lora_B"][0], present[0]["params"]["lora_A"][1]
        ranks = [p["rank"] for p in present]
        total = sum(ranks)
        factors = (m + n) * total * work
        seconds += factors / work * 2 / READ_RATE
        if method in ("module", "exact"):
            seconds += 4 * factors / work * ELEMENT_SECONDS
            layer_bytes = 3 * factors
        elif method == "svd" or space == "core":
            seconds += (m + n) * total**2 * THIN_QR_SECONDS + 4 * (m + n) * total**2 / MATMUL_RATE
            layer_bytes = 6 * factors
        else:
            count = len(present)
            seconds += sum(2 * m * n * r for r in ranks) / MATMUL_RATE
            seconds += (12 if method in ELECTING else 4) * count * m * n * ELEMENT_SECONDS
            seconds += (count * m * n * KTH_SECONDS) if method in PRUNING else 0.0
            seconds += m * n * min(m, n) * DENSE_SVD_SECONDS
            # the effects, their signs (1 byte), TIES's buffers, and the SVD's copy and factors
            layer_bytes = m * n * (count * (work + 1) + 4 * work)
        peak = max(peak, layer_bytes)
    return {"estimated_seconds": round(seconds, 1), "estimated_peak_bytes": int(START_BYTES + peak)}


# --- range: can the output exceed its dtype? (before any tensor is read) ----------------------


def range_problems(inputs: list[Any], method: str, dtype: str) -> tuple[list[str], list[str]]:
    """Refuse what the coefficients alone make non-finite (a scalar the arithmetic applies
    that the working dtype cannot hold), then bound each layer's B@A with the recorded
    magnitudes: |(B@A)_ij| <= r * max|B| * max|A|, with the coefficients folded into max|A|
    and max|B| as the method applies them."""
    violations = _coefficient_problems(inputs, method, work_dtype_name(inputs, dtype))
    if violations:
        return violations, []
    unknown: set[str] = set()  # refs
    nonfinite: dict[str, str] = {}  # ref -> first layer
    exceeded: list[tuple[float, str, str]] = []  # (bound, what, layer)
    for layer in sorted({layer for i in inputs for layer in i.layers}):
        present, missing, broken = layer_magnitudes(inputs, layer)
        unknown.update(i.ref for i in missing)
        for module in broken:
            nonfinite.setdefault(module.ref, layer)
        if missing or broken:
            continue
        exceeded.extend(
            (bound, what, layer) for what, bound in layer_bounds(present, method).items() if beyond(bound, dtype)
        )
    for ref, layer in nonfinite.items():
        violations.append(f"{ref} holds NaN or Inf values at {module_key(layer)}: the result would not be finite")
    if exceeded:
        bound, what, layer = max(exceeded, key=lambda item: item[0])
        others = len({layer for _, _, layer in exceeded}) - 1
        violations.append(
            f"the result would not be finite in {FLOAT_DTYPES[dtype]}: {what} at {module_key(layer)} may reach "
            f"{_magnitude(bound)} (rank x max|B| x max|A| x coefficients), beyond its largest value "
            f"{FLOAT_MAX[dtype]:.4g}" + (f"; so may {others} other layers" if others else "")
            + ": lower the coefficients"
        )
    notes = [unknown_magnitudes_note(unknown)] if unknown and not violations else []
    return violations, notes


def layer_bounds(present: list[tuple[Any, dict[str, Any]]], method: str) -> dict[str, float]:
    """Upper bounds of |value| in one output layer, from each input's (module, layer
    description with recorded magnitudes): the factors the method writes and their product."""
    def terms():  # (r_i, a_i, |b_i| s_i, max|A_i|, max|B_i|)
        for module, info in present:
            yield (info["rank"], float(module.a), abs(float(module.b)) * info["scaling"],
                   info[MAX_ABS]["lora_A"], info[MAX_ABS]["lora_B"])

    if method == "module":  # A = sum a_i A_i, B = sum b_i s_i B_i, all of rank r
        rank = present[0][1]["rank"]
        a_bound = sum(a * max_a for _, a, _, max_a, _ in terms())
        b_bound = sum(bs * max_b for _, _, bs, _, max_b in terms())
        return {"lora_A": a_bound, "lora_B": b_bound, "B@A": rank * b_bound * a_bound}
    effect = sum(r * bs * max_a * max_b for r, _, bs, max_a, max_b in terms())  # sum b_i s_i B_i A_i
    if method == "exact":  # A = concat(b_i s_i A_i), B = concat(B_i)
        return {
            "lora_A": max(bs * max_a for _, _, bs, max_a, _ in terms()),
            "lora_B": max(max_b for *_, max_b in terms()),
            "B@A": effect,
        }
    if method == "svd":  # truncates the exact effect
        return {"B@A": effect}
    return {}  # the non-linear merges prune and rescale the effects: no bound here


def _coefficient_problems(inputs: list[Any], method: str, work: str) -> list[str]:
    problems = []
    for module in inputs:
        scaling = max(info["scaling"] for info in module.layers.values())
        if method == "module" and beyond(module.a, work):
            problems.append(
                f"the coefficient {_number(module.a)} (unsigned, on A) of {module.ref} is beyond the "
                f"{FLOAT_DTYPES[work]} range ({FLOAT_MAX[work]:.4g}): the result would not be finite"
            )
        # module, exact and svd multiply a factor by b_i s_i; the merges multiply s_i B_i A_i by b_i.
        on_factor = method in ("module", "exact", "svd")
        if beyond(Fraction(module.b) * Fraction(scaling) if on_factor else module.b, work):
            times = f" times its scaling {scaling:g}" if on_factor else ""
            problems.append(
                f"the coefficient {_number(module.b)} of {module.ref}{times} is beyond the "
                f"{FLOAT_DTYPES[work]} range ({FLOAT_MAX[work]:.4g}): the result would not be finite"
            )
    return problems


def _magnitude(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "more than 1.8e+308"
