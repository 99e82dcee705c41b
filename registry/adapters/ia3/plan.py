"""(IA)^3: the output of a composition, planned from metadata (no tensors, no torch)."""

from __future__ import annotations

from typing import Any

from registry.adapters.base import TypePlan, module_key

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
