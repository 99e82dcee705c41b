"""A composition with an element-wise method (``module``, ``exact``; (IA)^3) never imports
torch: its import is most of a short ``pem compose`` process (issue 15). ``svd`` still does.
Checked with ``python -X importtime`` on the real command, in its own process."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "peft"}


def pem(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEM_")}
    env.update(PEM_HOME=str(home), PEM_USER="tester")
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "cli.main", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def imported(stderr: str) -> set[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")][1:]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


def write_lora(folder: Path, seed: int) -> None:
    """A LoRA adapter written by hand (json + struct), bf16 values made from float32 bits."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    bf16 = [struct.unpack("<I", struct.pack("<f", (i + seed) / 8))[0] >> 16 for i in range(8)]
    data = struct.pack("<8H", *bf16)
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
        f"{prefix}.lora_B.weight": {"dtype": "BF16", "shape": [4, 2], "data_offsets": [16, 32]},
    }
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data + data)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from registry import Registry

    root = tmp_path_factory.mktemp("no-torch")
    with Registry.init(root / "home", user="tester") as registry:
        for name, seed in (("a", 1), ("b", 2)):
            write_lora(root / name, seed)
            registry.add(root / name, f"team/{name}")
    return root / "home"


@pytest.mark.parametrize("method", ["module", "exact"])
def test_an_element_wise_composition_never_imports_torch(home: Path, method: str) -> None:
    result = pem(home, "compose", "0.5*team/a - 0.25*team/b", "--name", f"team/{method}", "--method", method)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = imported(result.stderr)
    assert "registry.compose.engine" in modules  # it did compute
    assert not HEAVY & {m.split(".")[0] for m in modules}


def test_svd_still_computes_with_torch(home: Path) -> None:
    result = pem(home, "compose", "0.5*team/a - 0.25*team/b", "--name", "team/svd", "--method", "svd")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" in imported(result.stderr)
