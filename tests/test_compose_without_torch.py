"""A composition with an element-wise method (``module``, ``exact``; (IA)^3) never imports
torch: its import is most of a short ``pem compose`` process (issue 15). ``svd`` still does.
Checked with ``python -X importtime`` on the real command, in its own process."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from no_torch import HEAVY, imported_modules, run_pem_importtime, write_handmade_lora


def pem(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_pem_importtime(home, *args, timeout=300)


def write_lora(folder: Path, seed: int) -> None:
    """A LoRA adapter written by hand (json + struct), bf16 values made from float32 bits."""
    bf16 = [struct.unpack("<I", struct.pack("<f", (i + seed) / 8))[0] >> 16 for i in range(8)]
    data = struct.pack("<8H", *bf16)
    write_handmade_lora(folder, "BF16", data, data)


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
    modules = imported_modules(result.stderr)
    assert "registry.compose.engine" in modules  # it did compute
    assert not HEAVY & {m.split(".")[0] for m in modules}


def test_svd_still_computes_with_torch(home: Path) -> None:
    result = pem(home, "compose", "0.5*team/a - 0.25*team/b", "--name", "team/svd", "--method", "svd")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" in imported_modules(result.stderr)
