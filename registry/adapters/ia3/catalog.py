"""(IA)^3: per adapted layer a vector ``l`` that multiplies activations (or, for
feed-forward modules, inputs). The neutral module is ``l = 1``."""

from __future__ import annotations

import re
from typing import Any

from registry.adapters.base import (
    AdapterMetadata,
    AdapterType,
    TypePlan,
    composable_metadata,
    config_error,
    config_flag,
    config_string_list,
    extras_note,
    module_key,
    require_float,
    split_tensor_names,
)
from registry.adapters.ia3.plan import plan_output, range_problems
from registry.errors import InvalidAdapterError
from registry.safetensors_io import SafetensorsHeader

TENSOR_SUFFIXES = {".ia3_l": "ia3_l"}


def _is_feedforward(config: dict[str, Any], layer: str) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list matches by suffix."""
    patterns = config.get("feedforward_modules")
    if patterns is None:
        patterns = []
    elif not isinstance(patterns, str) and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise config_error("feedforward_modules", "a regex string or a list of strings", patterns)
    key = module_key(layer)
    if isinstance(patterns, str):
        try:
            return re.fullmatch(patterns, key) is not None
        except re.error as exc:
            raise InvalidAdapterError(f"adapter_config.json: feedforward_modules is not a valid regex ({exc})") from None
    return any(key == p or key.endswith("." + p) for p in patterns)


class IA3Type(AdapterType):
    tensor_suffixes = TENSOR_SUFFIXES
    peft_type = "IA3"
    composable = True
    compute_module = "registry.adapters.ia3.compute"

    def plan_output(self, inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
        return plan_output(inputs, method, parameters, dtype)

    def range_problems(self, inputs: list[Any], method: str, dtype: str) -> tuple[list[str], list[str]]:
        return range_problems(inputs, method, dtype)

    def describe(self, config: dict[str, Any], header: SafetensorsHeader) -> AdapterMetadata:
        require_float(header)
        config_flag(config, "fan_in_fan_out")  # read when composing
        grouped, extras = split_tensor_names(header, TENSOR_SUFFIXES)
        if not grouped:
            raise InvalidAdapterError(f"{header.path} holds no (IA)^3 tensors (names ending in .ia3_l)")
        layers = {}
        for layer, params in grouped.items():
            shape = list(header.tensors[params["ia3_l"]].shape)
            if len(shape) != 2 or 1 not in shape:
                raise InvalidAdapterError(f"{header.path}: layer {layer!r} has an (IA)^3 vector of shape {shape}")
            layers[layer] = {"params": {"ia3_l": shape}, "feedforward": _is_feedforward(config, layer)}
        unsupported = ["modules_to_save"] if config_string_list(config, "modules_to_save") else []
        if extras:
            unsupported.append(extras_note(extras))
        return composable_metadata(self.peft_type, config, header, rank=None, lora_alpha=None, use_rslora=False,
                                   use_dora=False, layers=layers, unsupported=unsupported)
