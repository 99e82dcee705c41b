"""Independent readers and writers of adapter files, shared by the tests.

Expectations in tests never come from the code under test: these read PEFT adapter folders
with safetensors and the SEMANTICS.md formulas written out plainly, and write small valid
adapters with numpy (no PEFT or transformers needed). The compose tests also share their
``reg`` and ``out`` fixtures from here (import them by name; each file supplies ``adapters``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tensors
from safetensors.numpy import save_file

CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".ia3_l")
TINY_LAYERS = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj")


def make_numpy_lora(folder: Path, seed: int, r: int = 4, hidden: int = 16) -> Path:
    """A small valid PEFT LoRA folder (config + safetensors) with tensors from ``seed``. Built
    with numpy: content is all many tests need, and it keeps PEFT and transformers out."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in TINY_LAYERS:
        arrays[f"{layer}.lora_A.weight"] = (rng.standard_normal((r, hidden)) * 0.3).astype(np.float32)
        arrays[f"{layer}.lora_B.weight"] = (rng.standard_normal((hidden, r)) * 0.3).astype(np.float32)
    save_file(arrays, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def module_of(tensor_name: str) -> str:
    name = tensor_name[len(PREFIX):] if tensor_name.startswith(PREFIX) else tensor_name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise AssertionError(f"unexpected tensor {tensor_name}")


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rule: the first key whose regex matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_layers(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (A, B, scaling), factors in float64, scaling from the folder's config."""
    config = json.loads((folder / CONFIG).read_text())
    named = tensors(folder)
    layers = {}
    for module in sorted({module_of(n) for n in named}):
        a = named[f"{PREFIX}{module}.lora_A.weight"].double()
        b = named[f"{PREFIX}{module}.lora_B.weight"].double()
        r = pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        assert a.shape[0] == r == b.shape[1], (module, a.shape, r)
        layers[module] = (a, b, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    return layers


def effects(folder: Path) -> dict[str, torch.Tensor]:
    """dW = s * B @ A per module."""
    return {m: s * (b @ a) for m, (a, b, s) in lora_layers(folder).items()}


def ia3_vectors(folder: Path) -> dict[str, torch.Tensor]:
    return {module_of(n): t.double() for n, t in tensors(folder).items()}


# --- fixtures of the compose tests (each test file defines its own ``adapters``) -------------------


@pytest.fixture
def reg(registry, adapters):
    """The test's registry with every fixture adapter registered as team/<key>."""
    registry.infos = {key: registry.add(path, f"team/{key}") for key, path in adapters.items()}
    return registry


@pytest.fixture
def out(reg, tmp_path):
    """out(ref) exports a module to a new folder and returns it."""
    counter = iter(range(1000))

    def export(ref: str) -> Path:
        return reg.export(ref, tmp_path / f"out{next(counter)}")

    return export
