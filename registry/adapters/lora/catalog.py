"""LoRA: per adapted layer, ``A`` (r x in) and ``B`` (out x r); ``dW = s * B @ A``.

The scaling is ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), per layer when
``rank_pattern`` / ``alpha_pattern`` override r and alpha.
"""

from __future__ import annotations

import math
from typing import Any

from registry.adapters.base import (
    MAX_RANK,
    AdapterMetadata,
    AdapterType,
    TypePlan,
    composable_metadata,
    config_error,
    config_flag,
    config_mapping,
    config_present,
    config_string_list,
    extras_note,
    pattern_value,
    positive_int,
    require_float,
    split_tensor_names,
)
from registry.adapters.lora.plan import estimate, plan_output, range_problems
from registry.errors import InvalidAdapterError
from registry.safetensors_io import SafetensorsHeader

TENSOR_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    ".lora_B.bias": "lora_B_bias",
}

def _unsupported_features(config: dict[str, Any]) -> list[str]:
    """Config features whose arithmetic SEMANTICS.md does not define: composition refuses them."""
    present = {
        "DoRA (use_dora)": config_flag(config, "use_dora"),
        "LoRA bias (lora_bias)": config_flag(config, "lora_bias"),
        "modules_to_save": bool(config_string_list(config, "modules_to_save")),
        "trainable tokens (trainable_token_indices)":
            config_present(config, "trainable_token_indices", (list, dict), "a list or an object"),
        "layer_replication": config_present(config, "layer_replication", (list,), "a list"),
    }
    return [label for label, on in present.items() if on]


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraType(AdapterType):
    tensor_suffixes = TENSOR_SUFFIXES
    peft_type = "LORA"
    composable = True
    compute_module = "registry.adapters.lora.compute"
    numpy_compute_modules = {"module": "registry.adapters.lora.linear", "exact": "registry.adapters.lora.linear"}

    def extra_violations(self, inputs: list[Any], method: str, union: bool) -> list[str]:
        if method != "module":
            return []
        from registry.compose.plan import layer_violations

        return layer_violations(inputs, True, _rank_problem)

    def plan_output(self, inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
        return plan_output(inputs, method, parameters, dtype)

    def estimate(self, plan: Any) -> dict[str, float | int]:
        return estimate(plan)

    def range_problems(self, inputs: list[Any], method: str, dtype: str) -> tuple[list[str], list[str]]:
        return range_problems(inputs, method, dtype)

    def describe(self, config: dict[str, Any], header: SafetensorsHeader) -> AdapterMetadata:
        require_float(header)
        r = positive_int(config, "r")
        alpha = config.get("lora_alpha", 8)
        if not _finite_number(alpha):
            raise config_error("lora_alpha", "a finite number", alpha)
        use_rslora = config_flag(config, "use_rslora")
        config_flag(config, "fan_in_fan_out")  # read when composing
        rank_pattern = config_mapping(config, "rank_pattern", _valid_rank, f"an integer from 1 to {MAX_RANK}")
        alpha_pattern = config_mapping(config, "alpha_pattern", _finite_number, "a finite number")

        grouped, extras = split_tensor_names(header, TENSOR_SUFFIXES)
        if not grouped:
            raise InvalidAdapterError(f"{header.path} holds no LoRA tensors (names ending in .lora_A.weight)")
        layers = {}
        unsupported = _unsupported_features(config)
        for layer, params in grouped.items():
            layers[layer] = self._describe_layer(header, layer, params, r, alpha, use_rslora, rank_pattern, alpha_pattern)
            if "lora_embedding_A" in params:
                unsupported.append("embedding LoRA layers")
        if extras:
            unsupported.append(extras_note(extras))
        return composable_metadata(self.peft_type, config, header, rank=r, lora_alpha=float(alpha),
                                   use_rslora=use_rslora, use_dora=config_flag(config, "use_dora"), layers=layers,
                                   unsupported=sorted(set(unsupported)))

    @staticmethod
    def _describe_layer(
        header: SafetensorsHeader,
        layer: str,
        params: dict[str, str],
        r: int,
        alpha: float,
        use_rslora: bool,
        rank_pattern: dict[str, int],
        alpha_pattern: dict[str, float],
    ) -> dict[str, Any]:
        a_name = params.get("lora_A") or params.get("lora_embedding_A")
        b_name = params.get("lora_B") or params.get("lora_embedding_B")
        if a_name is None or b_name is None:
            missing = "lora_A" if a_name is None else "lora_B"
            raise InvalidAdapterError(f"{header.path}: layer {layer!r} has no {missing} tensor")
        a_shape, b_shape = header.tensors[a_name].shape, header.tensors[b_name].shape
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise InvalidAdapterError(
                f"{header.path}: layer {layer!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
                "which do not multiply (expected r x in and out x r)"
            )
        expected_rank = pattern_value(rank_pattern, layer, r)  # values checked in describe
        if a_shape[0] != expected_rank:
            raise InvalidAdapterError(
                f"config and tensors disagree: adapter_config.json says rank {expected_rank} for layer {layer!r} "
                f"but its tensors have rank {a_shape[0]}"
            )
        layer_alpha = float(pattern_value(alpha_pattern, layer, alpha))
        return {
            "params": {p: list(header.tensors[n].shape) for p, n in sorted(params.items())},
            "rank": expected_rank,
            "alpha": layer_alpha,
            "scaling": scaling(layer_alpha, expected_rank, use_rslora),
        }


def _rank_problem(left: dict[str, Any], right: dict[str, Any]) -> tuple[str, str] | None:
    """The ``module`` method adds factors element-wise: ranks must match layer by layer."""
    if left["rank"] != right["rank"]:
        return "have different ranks", (
            f"{left['rank']} vs {right['rank']} (method 'module' needs equal ranks; use --method exact or svd)"
        )
    return None
