"""Helpers for the tests that check which modules a `pem` process imports.

They import no torch themselves (tests/helpers.py does): the adapters they need are written
by hand with json and struct, and the command runs in its own interpreter under
``python -X importtime``, which prints one stderr line per module it imports.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "peft"}


def run_pem_importtime(home: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`pem *args` on the registry at ``home``, in a fresh interpreter with -X importtime."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEM_")}  # only this test's registry
    env.update(PEM_HOME=str(home), PEM_USER="tester")
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "cli.main", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def imported_modules(stderr: str) -> list[str]:
    """The modules an -X importtime run imported, in order, from its stderr."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    # "import time: self [us] | cumulative | imported package", then one line per module
    return [line.rsplit("|", 1)[1].strip() for line in lines[1:]]


def write_handmade_lora(folder: Path, dtype: str, lora_a: bytes, lora_b: bytes) -> None:
    """A valid rank-2 LoRA folder on one q_proj (A 2 x 4, B 4 x 2), the raw tensor bytes in ``dtype``."""
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    end_a = len(lora_a)
    header = {
        f"{prefix}.lora_A.weight": {"dtype": dtype, "shape": [2, 4], "data_offsets": [0, end_a]},
        f"{prefix}.lora_B.weight": {"dtype": dtype, "shape": [4, 2], "data_offsets": [end_a, end_a + len(lora_b)]},
    }
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + lora_a + lora_b)
