"""Base (host) models and structural compatibility, for porting (Sabry & Belz, 2024).

A base model is recorded from its ``config.json``: architecture and dimensions always, and,
when transformers is installed (``pip install 'pem-registry[hosts]'``), the exact name and
weight shape of every adaptable module, obtained by building the model on PyTorch's meta
device (no memory, no weights, no download). A module can be attached to a host when each
layer it adapts exists in the host with the shape the module needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from registry.adapters.base import module_key
from registry.errors import InvalidAdapterError

DIMENSION_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "d_model", "d_ff", "d_kv", "num_layers", "num_heads", "n_embd", "n_layer", "n_head",
)

MAX_DIMENSION = 2**31 - 1  # as for tensors (safetensors_io): no real model has a larger dimension

SAME_BASE, COMPATIBLE, INCOMPATIBLE, UNKNOWN = "same-base", "compatible", "incompatible", "unknown"


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidAdapterError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, RecursionError):
        raise InvalidAdapterError(f"{path} is not valid JSON: pass a model's config.json") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise InvalidAdapterError(f"{path} has no model_type: is it a transformers config.json?")
    return config


def dimensions(config: dict[str, Any]) -> dict[str, Any]:
    return {key: config[key] for key in DIMENSION_KEYS if key in config}


def architecture(config: dict[str, Any]) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def impossible_dimension(config: dict[str, Any]) -> str | None:
    """The first dimension no model can have (``hidden_size -32``, ``2**40``), said in words."""
    for key in DIMENSION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= MAX_DIMENSION:
            return f"{key} is {value}, which no model can have (a dimension is from 1 to {MAX_DIMENSION})"
    return None


def unknown_reason(config: dict[str, Any], build_error: str | None = None) -> str:
    """Why the structure of a host could not be built, and what fixes it. ``build_error``: what
    building the model raised, when that was the reason."""
    if not _transformers_available():
        return "transformers is not installed: pip install 'pem-registry[hosts]' and run `pem base add` again"
    name = architecture(config)
    if name is None:
        return "its config.json names no `architectures` (e.g. [\"LlamaForCausalLM\"]): add it and run `pem base add` again"
    impossible = impossible_dimension(config)
    if impossible:
        return f"its config.json says {impossible}: fix it and run `pem base add` again"
    import transformers

    error = f" ({build_error})" if build_error else ""
    return (
        f"transformers {transformers.__version__} cannot build {name} (model_type {config.get('model_type')!r}){error}: "
        "upgrade transformers, or check the config"
    )


def build_structure(config: dict[str, Any]) -> tuple[dict[str, list[int]] | None, str | None]:
    """Adaptable module name -> weight shape [out, in] (Linear, Conv1D) or [num, dim]
    (Embedding), from the model built on the meta device; or None and the reason (see
    :func:`unknown_reason`) when transformers is not installed, the config has an impossible
    dimension, or names no architecture it can build (a bare backbone would name its modules
    differently from the model the adapters were trained on)."""
    name = architecture(config)
    if name is None or not _transformers_available() or impossible_dimension(config):
        return None, unknown_reason(config)
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    model_class = getattr(transformers, name, None)
    if model_class is None:
        return None, unknown_reason(config, f"it has no class {name}")
    try:
        model_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = model_class(model_config)
    except Exception as exc:  # an architecture this transformers cannot build: structure unknown
        said = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
        return None, unknown_reason(config, f"{exc.__class__.__name__}: {said}")
    structure: dict[str, list[int]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            structure[module_name] = [module.out_features, module.in_features]
        elif isinstance(module, Conv1D):  # stores its weight as (in, out)
            structure[module_name] = [module.weight.shape[1], module.weight.shape[0]]
        elif isinstance(module, torch.nn.Embedding):
            structure[module_name] = [module.num_embeddings, module.embedding_dim]
    return structure, None


def lora_required_shape(params: dict[str, list[int]]) -> list[int] | None:
    """The host weight shape a LoRA layer needs: [out, in] for Linear, [num, dim] for Embedding."""
    if "lora_A" in params and "lora_B" in params:
        return [params["lora_B"][0], params["lora_A"][1]]
    if "lora_embedding_A" in params and "lora_embedding_B" in params:
        return [params["lora_embedding_A"][1], params["lora_embedding_B"][0]]
    return None


def structural_report(layers: dict[str, dict[str, Any]], structure: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(missing layers, mismatched shapes) of a module's layers against a host structure."""
    missing, mismatched = [], []
    for layer, info in sorted(layers.items()):
        key = module_key(layer)
        host = structure.get(key)
        if host is None:
            missing.append(key)
            continue
        params = info["params"]
        if "ia3_l" in params:
            rows, cols = params["ia3_l"]
            # (IA)^3 scales a layer's output ([out, 1]) or, for feed-forward layers, its input ([1, in])
            ok = host[1] == cols if info.get("feedforward") else host[0] == rows
            need = f"{'input' if info.get('feedforward') else 'output'} size {cols if info.get('feedforward') else rows}"
        else:
            need_shape = lora_required_shape(params)
            ok = need_shape == list(host)
            need = f"weight {need_shape}"
        if not ok:
            mismatched.append(f"{key}: module needs {need}, host has {host}")
    return missing, mismatched
