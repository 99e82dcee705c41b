"""`pem` starts fast: catalog commands never import torch, transformers or peft.

Each command runs in a fresh interpreter with ``-X importtime``, which prints one stderr line
per imported module; none of them may belong to the heavy packages.
"""

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
SERVER = {"fastapi", "uvicorn", "starlette"}  # only `pem serve` needs the server stack


def imported_modules(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    # "import time: self [us] | cumulative | imported package", then one line per module
    return [line.rsplit("|", 1)[1].strip() for line in lines[1:]]


def run_pem(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEM_")}
    env["PEM_HOME"] = str(home)
    env["PEM_USER"] = "tester"
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cli.main", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def write_tiny_lora(folder: Path) -> None:
    """A valid LoRA adapter folder written by hand (json + struct): no torch in this test either."""
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a = struct.pack("<8f", *range(8))  # lora_A 2 x 4
    b = struct.pack("<8f", *range(8, 16))  # lora_B 4 x 2
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
    }
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a + b)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from registry import Registry

    root = tmp_path_factory.mktemp("startup")
    write_tiny_lora(root / "adapter")
    with Registry.init(root / "home", user="tester") as registry:
        registry.add(root / "adapter", "team/tiny")
    return root / "home"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], "Usage:"),
        (["list"], "team/tiny@1"),
        (["list", "--json"], '"team/tiny"'),
        (["show", "team/tiny"], "team/tiny@1"),
    ],
)
def test_command_does_not_import_heavy_packages(home, args, expected):
    result = run_pem(*args, home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    modules = imported_modules(result.stderr)
    assert "cli.main" in modules or "cli" in modules  # importtime did report the imports
    assert "click" in modules
    heavy = sorted({m for m in modules if m.split(".")[0] in HEAVY | SERVER})
    assert heavy == []
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            assert not any(name in line for name in HEAVY), line


# What `pem list` and `pem show` never need: the expression language (and lark), the planner
# and the per-type adapters, the Hub and hosts code, migrations, numpy. They were imported by
# every command until issue 14; each costs start-up time (bench/startup.py).
NOT_FOR_READING = {"lark", "alembic", "huggingface_hub", "numpy", "registry.language", "registry.compose",
                   "registry.adapters", "registry.hub", "registry.hosts", "registry.db.migrate", "registry.verify",
                   "registry.lineage"}


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["show", "team/tiny"], ["show", "team/tiny", "--json"]])
def test_reading_commands_import_only_what_they_need(home, args):
    result = run_pem(*args, home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = imported_modules(result.stderr)
    unneeded = sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_FOR_READING))
    assert unneeded == []
