"""LoRA: the output of a composition, planned from metadata (no tensors, no torch).

Every output is stored with scaling 1 on every layer (``lora_alpha`` equal to the layer's
rank, rsLoRA off): the input scalings are folded into the factors by the arithmetic. The
config is built field by field, never copied from an input, so flags such as ``use_rslora``
or DoRA cannot leak into a result whose arithmetic did not use them (SEMANTICS.md section 6).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from registry.adapters.base import TypePlan, module_key

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def plan_output(inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
    layers = sorted({layer for i in inputs for layer in i.layers})
    ranks: dict[str, int] = {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    notes: list[str] = []
    resolved = dict(parameters)
    if method == "svd":
        requested = parameters.get("rank")
        largest = max(info["rank"] for i in inputs for info in i.layers.values())
        if requested is not None and requested < 1:
            from registry.errors import UnsupportedMethodError

            raise UnsupportedMethodError(f"--rank must be at least 1, got {requested}")
        resolved["rank"] = requested or largest
    for layer in layers:
        present = [i.layers[layer] for i in inputs if layer in i.layers]
        out_features, in_features = present[0]["params"]["lora_B"][0], present[0]["params"]["lora_A"][1]
        if method == "module":
            rank = present[0]["rank"]
        elif method == "exact":
            rank = sum(p["rank"] for p in present)
        else:  # svd
            rank = min(resolved["rank"], out_features, in_features)
            if rank < resolved["rank"]:
                notes.append(f"{module_key(layer)}: rank {resolved['rank']} capped at {rank} by its shape")
        ranks[layer] = rank
        tensors[layer + A_SUFFIX] = (dtype, (rank, in_features))
        tensors[layer + B_SUFFIX] = (dtype, (out_features, rank))
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
