"""`pem` starts fast: catalog commands never import torch, transformers or peft.

Each command runs in a fresh interpreter with ``-X importtime``, which prints one stderr line
per imported module; none of them may belong to the heavy packages.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from no_torch import HEAVY, imported_modules, run_pem_importtime, write_handmade_lora

SERVER = {"fastapi", "uvicorn", "starlette"}  # only `pem serve` needs the server stack


def run_pem(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return run_pem_importtime(home, *args, timeout=120)


def write_tiny_lora(folder: Path) -> None:
    """A valid LoRA adapter folder written by hand (json + struct): no torch in this test either."""
    write_handmade_lora(folder, "F32", struct.pack("<8f", *range(8)), struct.pack("<8f", *range(8, 16)))


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
