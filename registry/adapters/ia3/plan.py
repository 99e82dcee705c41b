"""(IA)^3: the output of a composition, planned from metadata (no tensors, no torch)."""

from __future__ import annotations

from typing import Any

from registry.adapters.base import (
    MAX_ABS,
    TypePlan,
    beyond,
    layer_magnitudes,
    module_key,
    unknown_magnitudes_note,
    work_dtype_name,
)
from registry.safetensors_io import FLOAT_DTYPES, FLOAT_MAX

L_SUFFIX = ".ia3_l"


def plan_output(inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
    layers = sorted({layer for i in inputs for layer in i.layers})
    tensors = {}
    feedforward = []
    for layer in layers:
        info = next(i.layers[layer] for i in inputs if layer in i.layers)
        tensors[layer + L_SUFFIX] = (dtype, tuple(info["params"]["ia3_l"]))
        if info.get("feedforward"):
            feedforward.append(module_key(layer))
    task_types = {i.config.get("task_type") for i in inputs}
    first = inputs[0]
    config = {
        "peft_type": "IA3",
        "base_model_name_or_path": first.base_model,
        "revision": first.base_revision,
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "target_modules": sorted(module_key(layer) for layer in layers),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": bool(first.config.get("fan_in_fan_out", False)),
        "modules_to_save": None,
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    return TypePlan(layers=layers, tensors=tensors, config=config, parameters=dict(parameters), notes=[])


def range_problems(inputs: list[Any], method: str, dtype: str) -> tuple[list[str], list[str]]:
    """l = 1 + sum_i b_i (l_i - 1), so |l| <= 1 + sum_i |b_i| (max|l_i| + 1): refused when a
    coefficient is beyond the working dtype, or that bound beyond the output dtype."""
    work = work_dtype_name(inputs, dtype)
    violations = [
        f"the coefficient {float(module.b):g} of {module.ref} is beyond the {FLOAT_DTYPES[work]} range "
        f"({FLOAT_MAX[work]:.4g}): the result would not be finite"
        for module in inputs if beyond(module.b, work)
    ]
    if violations:
        return violations, []
    unknown: set[str] = set()
    worst: tuple[float, str] | None = None
    for layer in sorted({layer for i in inputs for layer in i.layers}):
        present, missing, broken = layer_magnitudes(inputs, layer)
        unknown.update(i.ref for i in missing)
        violations += [f"{m.ref} holds NaN or Inf values at {module_key(layer)}: the result would not be finite"
                       for m in broken]
        if missing or broken:
            continue
        bound = 1.0 + sum(abs(float(m.b)) * (info[MAX_ABS]["ia3_l"] + 1.0) for m, info in present)
        if beyond(bound, dtype) and (worst is None or bound > worst[0]):
            worst = (bound, layer)
    if worst is not None:
        violations.append(
            f"the result would not be finite in {FLOAT_DTYPES[dtype]}: ia3_l at {module_key(worst[1])} may reach "
            f"{worst[0]:.4g}, beyond its largest value {FLOAT_MAX[dtype]:.4g}: lower the coefficients"
        )
    return violations, [unknown_magnitudes_note(unknown)] if unknown and not violations else []
