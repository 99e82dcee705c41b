"""Every read of a blob is checked against its digest (issue 14, item 2).

A stored blob is damaged behind the registry's back (one byte flipped, or its end cut off).
Then export, compose (every method, and a composition that would reuse an earlier output),
port and push each fail with one line naming the module, the digest expected and the cause,
and leave nothing behind: no exported folder, no module, no blob, no temporary file, no
repository on the Hub. The digests the tests expect are computed here with hashlib.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from helpers import make_lora
from test_port_modules import X_ID, Y_ID, add_hosts, make_lora_on

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DAMAGES = ["flip", "truncate"]


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def damage(path: Path, how: str) -> None:
    """Blobs are read-only (0444): make it writable, then flip a byte of the last tensor's
    data, or cut off the last 64 bytes."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) - 3] ^= 0xFF
    else:
        del data[-64:]
    path.write_bytes(bytes(data))


def store_files(home: Path) -> list[str]:
    """Every file under the blob store, temporary files included."""
    root = home / "blobs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def module_count(registry) -> int:
    from registry.db.models import Module

    with Session(registry.engine) as session:
        return session.scalar(select(func.count()).select_from(Module))


def corrupt_message(ref: str, digest: str) -> str:
    """The one line every refused read gives (the cause varies: mismatch or truncation)."""
    return rf"^blob of {re.escape(ref)} \(sha256:{digest}\) is corrupt: .+; run `pem verify`$"


@pytest.fixture
def inputs(registry, tmp_path: Path) -> dict[str, str]:
    """team/a and team/b registered; ref -> digest (checked here with hashlib)."""
    digests = {}
    for name, seed in (("a", 1), ("b", 2)):
        folder = make_lora(tmp_path / "adapters" / name, seed=seed)
        info = registry.add(folder, f"team/{name}")
        digests[info.ref] = info.digest
    return digests


@pytest.fixture
def damaged(request, registry, home: Path, inputs: dict[str, str]) -> tuple[str, str]:
    """team/b's blob damaged; (ref, digest). Parametrised by the damage."""
    how = getattr(request, "param", "flip")
    ref = "team/b@1"
    path = blob_path(home, inputs[ref])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == inputs[ref]  # intact before
    damage(path, how)
    assert hashlib.sha256(path.read_bytes()).hexdigest() != inputs[ref]
    return ref, inputs[ref]


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", DAMAGES, indirect=True)
def test_export_of_a_corrupt_blob_writes_nothing(registry, tmp_path: Path, damaged) -> None:
    from registry.errors import CorruptBlobError

    ref, digest = damaged
    with pytest.raises(CorruptBlobError, match=corrupt_message(ref, digest)):
        registry.export("team/b", tmp_path / "out" / "b")
    assert not (tmp_path / "out" / "b").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no staging folder left behind
    registry.export("team/a", tmp_path / "out" / "a")  # an intact blob still exports
    assert (tmp_path / "out" / "a" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("damaged", DAMAGES, indirect=True)
def test_cli_export_of_a_corrupt_blob_is_one_line_and_fails(run_pem, tmp_path: Path, damaged) -> None:
    ref, digest = damaged
    result = run_pem("export", "team/b", tmp_path / "out")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert re.match(rf"^error: blob of {re.escape(ref)} \(sha256:{digest}\) is corrupt: .+; run `pem verify`$", lines[0])
    assert not (tmp_path / "out").exists()


# --- compose -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["module", "exact", "svd"])
@pytest.mark.parametrize("damaged", DAMAGES, indirect=True)
def test_compose_from_a_corrupt_input_registers_nothing(registry, home: Path, damaged, method: str) -> None:
    from registry.errors import CorruptBlobError

    ref, digest = damaged
    before_files, before_modules = store_files(home), module_count(registry)
    with pytest.raises(CorruptBlobError, match=corrupt_message(ref, digest)):
        registry.compose("0.5*team/a + 0.5*team/b", "team/c", method=method)
    assert module_count(registry) == before_modules
    assert store_files(home) == before_files  # no output blob, no temporary file


def test_compose_reusing_a_corrupt_earlier_output_registers_nothing(registry, home: Path, inputs) -> None:
    """The same derivation under another name shares the earlier output's blob, without
    computing: that blob is checked too."""
    from registry.errors import CorruptBlobError

    c = registry.compose("0.5*team/a + 0.5*team/b", "team/c", method="exact")
    damage(blob_path(home, c.digest), "flip")
    before = module_count(registry)
    with pytest.raises(CorruptBlobError, match=corrupt_message("team/c@1", c.digest)):
        registry.compose("0.5*team/a + 0.5*team/b", "team/d", method="exact")
    assert module_count(registry) == before


def test_cli_compose_from_a_corrupt_input_fails_with_one_line(run_pem, damaged) -> None:
    ref, digest = damaged
    result = run_pem("compose", "0.5*team/a + 0.5*team/b", "--name", "team/c", "--method", "exact")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert f"blob of {ref} (sha256:{digest}) is corrupt" in lines[0]
    assert run_pem("show", "team/c").exit_code != 0


def test_a_missing_input_blob_is_named_and_verify_finds_it(registry, home: Path, inputs) -> None:
    from registry.errors import BlobStoreError

    blob_path(home, inputs["team/b@1"]).unlink()
    with pytest.raises(BlobStoreError, match=rf"^blob of team/b@1 \(sha256:{inputs['team/b@1']}\) is missing .*pem verify --all"):
        registry.compose("team/a + team/b", "team/c")
    failures = {f.ref: f.problem for f in registry.verify().failures}
    assert "missing" in failures["team/b@1"]


def test_an_input_removed_after_planning_is_named_as_removed(registry, home: Path, inputs, monkeypatch) -> None:
    """`pem rm` between planning and reading deletes the input's row and its blob: the
    compose says the input was removed (verify has nothing to find), and registers nothing."""
    from registry.errors import NotFoundError

    plan = type(registry)._plan

    def plan_then_remove(self, *args, **kwargs):
        result = plan(self, *args, **kwargs)
        self.remove("team/b@1")
        return result

    monkeypatch.setattr(type(registry), "_plan", plan_then_remove)
    before = module_count(registry)
    with pytest.raises(NotFoundError, match=r"^input team/b@1 was removed while composing; nothing was registered$"):
        registry.compose("team/a + team/b", "team/c")
    assert module_count(registry) == before - 1  # team/b went, nothing came
    assert registry.verify().ok


# --- port --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", DAMAGES)
def test_port_of_a_corrupt_blob_registers_nothing(registry, home: Path, tmp_path: Path, how: str) -> None:
    from registry.errors import CorruptBlobError

    add_hosts(registry, tmp_path, X_ID, Y_ID)
    info = registry.add(make_lora_on(X_ID, tmp_path / "x", seed=3, r=4, lora_alpha=8), "team/x")
    damage(blob_path(home, info.digest), how)
    before = module_count(registry)
    with pytest.raises(CorruptBlobError, match=corrupt_message("team/x@1", info.digest)):
        registry.port("team/x", Y_ID, "team/x-v2")
    assert module_count(registry) == before


# --- push --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", DAMAGES, indirect=True)
def test_push_of_a_corrupt_blob_uploads_nothing(hub, registry, damaged) -> None:
    from registry.db.models import HubLink
    from registry.errors import CorruptBlobError

    ref, digest = damaged
    repo = f"pub-{uuid.uuid4().hex[:8]}/corrupt-{uuid.uuid4().hex[:8]}"
    with pytest.raises(CorruptBlobError, match=corrupt_message(ref, digest)):
        registry.push("team/b", repo)
    assert not hub.repo_exists(repo)
    with Session(registry.engine) as session:
        assert session.scalar(select(func.count()).select_from(HubLink)) == 0


# --- a result that overflows only when stored ------------------------------------------------------


def test_a_value_that_overflows_only_in_the_output_dtype_is_refused(registry, home: Path, tmp_path: Path) -> None:
    """3.4e38 is a finite float32 but beyond bfloat16's largest value (3.3895e38): composing it
    into a bfloat16 output gives Inf, which is refused (by the range check on metadata, and
    else by the engine on the stored bits), with nothing written."""
    from safetensors.torch import load_file, save_file

    from registry.errors import IncompatibleModulesError

    folder = make_lora(tmp_path / "big", seed=4)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(n for n in tensors if n.endswith("lora_A.weight"))[0]
    tensors[name][0, 0] = 3.4e38
    save_file(tensors, str(weights))
    registry.add(folder, "team/big")
    before = store_files(home)
    with pytest.raises(IncompatibleModulesError, match=r"not be finite in bfloat16|not finite \(NaN or Inf\)"):
        registry.compose("team/big", "team/big-bf16", dtype="bfloat16")
    assert store_files(home) == before
