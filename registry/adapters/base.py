"""What every PEFT type provides to the catalog: metadata read from config and header.

Each type lives in its own module beside this one (``lora``, ``ia3``, ``other``): what is
specific to it (how tensors are named, what rank means, which flags exist) is written once,
there. The composition engine asks the same objects for their arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from registry.errors import InvalidAdapterError
from registry.safetensors_io import FLOAT_DTYPES, FLOAT_MAX, SafetensorsHeader

PEFT_PREFIX = "base_model.model."
# A composing process before its first layer (interpreter, torch, the registry), on this
# project's machine: the floor of every estimate `pem check` gives.
START_SECONDS, START_BYTES = 1.5, 250 * 2**20


@dataclass
class AdapterMetadata:
    """What the catalog records about an adapter, read without loading tensor data."""

    peft_type: str
    composable: bool
    base_model: str | None
    base_revision: str | None
    task_type: str | None
    rank: int | None
    lora_alpha: float | None
    use_rslora: bool
    use_dora: bool
    target_modules: list[str]
    # layer name (as in the weights file, without the parameter suffix) -> description:
    # {"params": {param: shape}, ...type-specific keys (rank, alpha, scaling, feedforward)}
    layers: dict[str, dict[str, Any]]
    dtype: str
    num_parameters: int
    # Features whose arithmetic the registry does not define: composition refuses them by name.
    unsupported: list[str] = field(default_factory=list)


@dataclass
class TypePlan:
    """A type's plan for a composition's output, made from metadata alone."""

    layers: list[str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)
    config: dict[str, Any]  # the output's adapter_config.json
    parameters: dict[str, Any]  # the method's parameters, defaults resolved
    notes: list[str]


class AdapterType:
    """Base class of the per-type adapters.

    Subclasses set ``peft_type`` and implement ``describe`` (catalog metadata). Composable
    types also implement ``plan_output`` (metadata only) and name a ``compute_module``, the
    module holding their torch arithmetic, imported only when tensors are about to be read.
    """

    peft_type: str = ""
    composable: bool = False
    compute_module: str = ""
    # Methods computed without torch (registry/compose/arrays.py): method -> its module.
    numpy_compute_modules: dict[str, str] = {}
    # Tensor name ending -> the parameter it holds (".lora_A.weight" -> "lora_A").
    tensor_suffixes: dict[str, str] = {}

    def describe(self, config: dict[str, Any], header: SafetensorsHeader) -> AdapterMetadata:
        raise NotImplementedError

    def extra_violations(self, inputs: list[Any], method: str, union: bool) -> list[str]:
        """Type-specific reasons a composition is refused (beyond the common checks)."""
        return []

    def plan_output(self, inputs: list[Any], method: str, parameters: dict[str, Any], dtype: str) -> TypePlan:
        raise NotImplementedError

    def estimate(self, plan: Any) -> dict[str, float | int]:
        """Time (``estimated_seconds``) and peak memory (``estimated_peak_bytes``) computing
        ``plan`` would take, from metadata. By default: start-up, reading every input once and
        an element-wise pass, holding one layer of each input and of the output."""
        read = sum(
            math.prod(shape) * 4 for i in plan.inputs for layer in i.layers.values() for shape in layer["params"].values()
        )
        largest = max((math.prod(shape) * 4 for _, shape in plan.tensors.values()), default=0)
        return {
            "estimated_seconds": round(START_SECONDS + read / 1e9, 1),
            "estimated_peak_bytes": int(START_BYTES + largest * (len(plan.inputs) + 2)),
        }

    def range_problems(self, inputs: list[Any], method: str, dtype: str) -> tuple[list[str], list[str]]:
        """(violations, notes): whether the output of ``method`` in safetensors ``dtype`` can
        exceed the dtype's range, decided from the coefficients and the inputs' recorded
        magnitudes (:data:`MAX_ABS`) before any tensor is read."""
        return [], []

    def compute(self, method: str | None = None) -> Any:
        """The module with ``compute_layer`` and ``finish`` for ``method``: numpy for the
        methods in ``numpy_compute_modules``, else the torch one (which imports torch)."""
        import importlib

        return importlib.import_module(self.numpy_compute_modules.get(method or "", self.compute_module))


# --- helpers shared by the types --------------------------------------------------------------


def common_dtype(header: SafetensorsHeader) -> str:
    dtypes = sorted({t.dtype for t in header.tensors.values()})
    if not dtypes:
        raise InvalidAdapterError(f"{header.path} holds no tensors")
    return dtypes[0] if len(dtypes) == 1 else "mixed"  # per-tensor dtypes are in the blob's header


def composable_metadata(
    peft_type: str, config: dict[str, Any], header: SafetensorsHeader, *, rank: int | None, lora_alpha: float | None,
    use_rslora: bool, use_dora: bool, layers: dict[str, dict[str, Any]], unsupported: list[str],
) -> AdapterMetadata:
    """The metadata of a composable type: the type's own readings (rank, flags, layers,
    unsupported features) and the fields every type reads alike from config and header."""
    return AdapterMetadata(
        peft_type=peft_type,
        composable=True,
        base_model=config.get("base_model_name_or_path"),
        base_revision=config.get("revision"),
        task_type=config.get("task_type"),
        rank=rank,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        use_dora=use_dora,
        target_modules=target_modules_list(config),
        layers=layers,
        dtype=common_dtype(header),
        num_parameters=sum(t.numel for t in header.tensors.values()),
        unsupported=unsupported,
    )


def require_float(header: SafetensorsHeader) -> None:
    for info in header.tensors.values():
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidAdapterError(
                f"{header.path}: tensor {info.name!r} has dtype {info.dtype}; adapter weights must be floating point"
            )


def target_modules_list(config: dict[str, Any]) -> list[str]:
    value = config.get("target_modules")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    raise InvalidAdapterError(f"adapter_config.json: target_modules must be a string or a list of strings, got {value!r}")


def split_tensor_names(header: SafetensorsHeader, suffixes: dict[str, str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group tensor names into layers. ``suffixes`` maps a name ending (``.lora_A.weight``) to
    the parameter it holds (``lora_A``). Returns ``{layer: {param: tensor name}}`` and the
    names that match no suffix (extras such as modules_to_save weights)."""
    layers: dict[str, dict[str, str]] = {}
    extras: list[str] = []
    for name in sorted(header.tensors):
        for suffix, param in suffixes.items():
            if name.endswith(suffix):
                layers.setdefault(name[: -len(suffix)], {})[param] = name
                break
        else:
            extras.append(name)
    return layers, extras


def extras_note(extras: list[str]) -> str:
    """How tensors of no known parameter are named in ``unsupported``."""
    return f"extra tensors ({', '.join(extras[:3])}{', ...' if len(extras) > 3 else ''})"


def module_key(layer: str) -> str:
    """The layer's module name inside the base model, the key PEFT's patterns match against."""
    return layer[len(PEFT_PREFIX):] if layer.startswith(PEFT_PREFIX) else layer


def pattern_value(patterns: dict[str, Any], layer: str, default: Any) -> Any:
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key that matches the end
    of the module name (``(.*\\.)?KEY$``) wins."""
    key = module_key(layer)
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", key)
        except re.error as exc:
            raise InvalidAdapterError(f"adapter_config.json: pattern {pattern!r} is not a valid regex ({exc})") from None
        if matched:
            return value
    return default


MAX_RANK = 1 << 20  # far above any real adapter; a larger one is hostile or broken


def positive_int(config: dict[str, Any], field_name: str, limit: int = MAX_RANK) -> int:
    value = config.get(field_name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise InvalidAdapterError(
            f"adapter_config.json: {field_name} must be an integer from 1 to {limit}, got {value!r}"
        )
    return value


# --- typed reads of adapter_config.json ---------------------------------------------------------
# Every field the registry reads is checked for its type first: a hostile or hand-edited
# config is refused with the field's name, never read wrongly ("false" as true) or crashed on.


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def config_error(field_name: str, expected: str, value: Any) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter_config.json: {field_name} must be {expected}, got {_shown(value)}")


def config_flag(config: dict[str, Any], field_name: str) -> bool:
    """A true/false field; absent or null is false."""
    value = config.get(field_name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise config_error(field_name, "true or false", value)
    return value


def config_string_list(config: dict[str, Any], field_name: str) -> list[str]:
    """A list of strings; absent or null is empty."""
    value = config.get(field_name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise config_error(field_name, "a list of strings", value)
    return value


def config_mapping(config: dict[str, Any], field_name: str, valid: Callable[[Any], bool], each: str) -> dict[str, Any]:
    """An object whose every value passes ``valid`` (``each`` says what a value must be);
    absent or null is empty."""
    value = config.get(field_name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_error(field_name, f"an object mapping module names to values (each {each})", value)
    for key, item in value.items():
        if not valid(item):
            raise InvalidAdapterError(
                f"adapter_config.json: {field_name} gives {_shown(item)} for {_shown(key)}; each value must be {each}"
            )
    return value


def config_present(config: dict[str, Any], field_name: str, kinds: tuple[type, ...], expected: str) -> bool:
    """Whether a field whose content the registry does not read (only that it is set) is set."""
    value = config.get(field_name)
    if value is not None and not isinstance(value, kinds):
        raise config_error(field_name, expected, value)
    return bool(value)


# --- magnitudes: each tensor's largest |value|, recorded per layer when a module is stored ------

# The key in a layer's description: {param: max |value| of its tensor}, None when the tensor
# holds NaN or Inf. Absent for modules registered before pem recorded it.
MAX_ABS = "max_abs"


def record_magnitudes(layers: dict[str, dict[str, Any]], suffixes: dict[str, str], maxima: dict[str, float]) -> bool:
    """Write ``maxima`` (tensor name -> max |value|) into each layer's description; returns
    whether anything changed. ``suffixes`` is the type's ``tensor_suffixes``."""
    suffix_of = {param: suffix for suffix, param in suffixes.items()}
    changed = False
    for layer, info in layers.items():
        names = {param: layer + suffix_of[param] for param in info["params"] if param in suffix_of}
        if not names or not all(name in maxima for name in names.values()):
            continue
        recorded = {param: (maxima[name] if math.isfinite(maxima[name]) else None) for param, name in names.items()}
        if info.get(MAX_ABS) != recorded:
            info[MAX_ABS] = recorded
            changed = True
    return changed


def copy_magnitudes(source: dict[str, dict[str, Any]], target: dict[str, dict[str, Any]]) -> None:
    """Magnitudes of a module sharing the same tensors (a port, a reused derivation)."""
    for layer, info in target.items():
        if MAX_ABS in source.get(layer, {}):
            info[MAX_ABS] = dict(source[layer][MAX_ABS])


def has_magnitudes(layers: dict[str, dict[str, Any]]) -> bool:
    return all(MAX_ABS in info for info in layers.values())


def layer_magnitudes(inputs: list[Any], layer: str) -> tuple[list[tuple[Any, dict[str, Any]]], list[Any], list[Any]]:
    """For the inputs that adapt ``layer``: (input, layer description) pairs, the inputs whose
    magnitudes are not recorded, and those whose tensors hold NaN or Inf there."""
    present = [(i, i.layers[layer]) for i in inputs if layer in i.layers]
    unknown = [i for i, info in present if MAX_ABS not in info]
    nonfinite = [i for i, info in present if MAX_ABS in info and None in info[MAX_ABS].values()]
    return present, unknown, nonfinite


def beyond(value: Any, dtype: str) -> bool:
    """Whether ``value`` (a float, or an exact Fraction) exceeds the largest finite value of
    safetensors ``dtype``; compared exactly, so no product overflows on the way."""
    from fractions import Fraction

    if isinstance(value, float) and not math.isfinite(value):
        return True
    return abs(Fraction(value)) > Fraction(FLOAT_MAX[dtype])


def work_dtype_name(inputs: list[Any], dtype: str) -> str:
    """The dtype the engine computes in (registry.compose.engine.work_dtype), without torch."""
    return "F64" if dtype == "F64" or any(i.dtype == "F64" for i in inputs) else "F32"


def unknown_magnitudes_note(refs: set[str]) -> str:
    return (
        f"the largest values of {', '.join(sorted(refs))} are not recorded (registered before pem recorded them), "
        "so whether the result stays within its dtype's range is unknown until it is computed; `pem verify REF` records them"
    )
