"""``pem verify`` over multi-level derivations: an intact registry passes with every derived
module re-derived; a flipped byte, a missing blob and a derivation whose recorded
coefficients no longer produce the stored tensors are each caught and named; ``svd`` results
are compared by effect (with a note) only when their digests differ; and verify writes
nothing, whatever it finds.

The catalog is the one of ``test_provenance_queries`` (see its docstring): lab/a, lab/b
trained; lab/c, lab/d, lab/e (exact), lab/m (module), lab/s (svd), lab/f (exact).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from test_provenance_queries import A, B, C, D, DERIVED, E, F, M, S, build_catalog, folders  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def catalog(registry, folders):  # noqa: F811
    build_catalog(registry, folders)
    return registry


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where tempfile puts verify's scratch stores during the test (to see them cleaned up)."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


# --- helpers -------------------------------------------------------------------------------------


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def store_snapshot(home: Path) -> dict[str, tuple[str, int]]:
    """Every file under home/blobs (tmp included): sha256 and mode."""
    root = home / "blobs"
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def catalog_rows(registry) -> dict[str, list[str]]:
    from registry.db.models import Base

    with Session(registry.engine) as session:
        return {
            table.name: sorted(repr(tuple(row)) for row in session.execute(select(table)))
            for table in Base.metadata.sorted_tables
        }


def leftover_tmp(home: Path) -> list[Path]:
    tmp = home / "blobs" / "tmp"
    return sorted(tmp.rglob("*")) if tmp.exists() else []


def flip_byte_near_the_end(path: Path) -> None:
    """Blobs are read-only (0444): make it writable, flip one byte of tensor data."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0xFF  # the last tensor's data, after the header
    path.write_bytes(bytes(data))


def module_id(session: Session, ref: str) -> int:
    from registry.db.models import Module

    namespace, rest = ref.split("/")
    name, version = rest.split("@")
    return session.scalar(select(Module.id).where(
        Module.namespace == namespace, Module.name == name, Module.version == int(version)
    ))


def set_recorded_b(registry, output: str, input_: str, b: float) -> None:
    """Change the signed coefficient recorded for one edge, behind the registry's back."""
    from registry.db.models import DerivationInput

    with Session(registry.engine) as session, session.begin():
        changed = session.execute(
            update(DerivationInput)
            .where(DerivationInput.module_id == module_id(session, output),
                   DerivationInput.input_id == module_id(session, input_))
            .values(b=b)
        ).rowcount
        assert changed == 1


def failures(report) -> dict[str, str]:
    return {f.ref: f.problem for f in report.failures}


class ReadOnly:
    """Asserts that the store files, the catalog rows and tmp folders are unchanged."""

    def __init__(self, registry, home: Path, scratch: Path):
        self.registry, self.home, self.scratch = registry, home, scratch
        self.files = store_snapshot(home)
        self.rows = catalog_rows(registry)

    def check(self) -> None:
        assert store_snapshot(self.home) == self.files
        assert catalog_rows(self.registry) == self.rows
        assert leftover_tmp(self.home) == []
        assert list(self.scratch.iterdir()) == []


# --- an intact registry ----------------------------------------------------------------------------


def test_verify_all_passes_and_rederives_every_derived_module(catalog, home, scratch):
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    assert report.ok is True
    assert report.failures == []
    assert report.checked == 8  # 2 trained + 6 derived
    assert report.rederived == len(DERIVED) == 6
    # svd re-derived on the same stack and thread count: identical digest, so no
    # comparison by effect and no note.
    assert report.notes == []
    guard.check()


def test_verify_one_module(catalog, home, scratch):
    guard = ReadOnly(catalog, home, scratch)
    for ref, rederived in ((E, 1), (S, 1), (A, 0)):
        report = catalog.verify(ref.removesuffix("@1"))
        assert (report.ok, report.checked, report.rederived, report.failures) == (True, 1, rederived, [])
    guard.check()


def test_verify_cli_on_an_intact_registry(catalog, run_pem):
    result = run_pem("verify", "--all")
    assert result.exit_code == 0, result.output
    assert "FAILED" not in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "8 checked, 6 re-derived, 0 failed"
    as_json = run_pem("verify", "--all", "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert (data["ok"], data["checked"], data["rederived"], data["failures"]) == (True, 8, 6, [])
    single = run_pem("verify", "lab/f")
    assert single.exit_code == 0, single.output
    assert single.stdout.strip().splitlines()[-1] == "1 checked, 1 re-derived, 0 failed"
    usage = run_pem("verify")
    assert usage.exit_code == 2


# --- a flipped byte, a missing blob -----------------------------------------------------------------


def test_verify_catches_a_flipped_byte_in_a_trained_blob(catalog, home, scratch, run_pem):
    path = blob_path(home, catalog.resolve("lab/a").digest)
    flip_byte_near_the_end(path)
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    guard.check()
    assert report.ok is False
    found = failures(report)
    # lab/a itself, and every module made directly from it (c, d, m) cannot be re-derived;
    # e, s and f were made from intact blobs and still re-derive.
    assert set(found) == {A, C, D, M}
    assert "corrupt" in found[A]
    for ref in (C, D, M):
        assert "lab/a@1" in found[ref] and "re-derive" in found[ref]
    assert report.rederived == 3  # e, s, f
    result = run_pem("verify", "--all")
    assert result.exit_code == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    assert sorted(re.match(r"FAILED (\S+):", line)[1] for line in failed) == sorted([A, C, D, M])
    assert result.stdout.strip().splitlines()[-1] == "8 checked, 3 re-derived, 4 failed"
    one = run_pem("verify", "lab/a")
    assert one.exit_code == 1 and f"FAILED {A}: " in one.stdout


def test_verify_catches_a_flipped_byte_in_a_derived_blob(catalog, home, scratch, run_pem):
    flip_byte_near_the_end(blob_path(home, catalog.resolve("lab/e").digest))
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    guard.check()
    assert report.ok is False
    assert set(failures(report)) == {E}
    assert "corrupt" in failures(report)[E]
    assert report.rederived == 5  # every derived module but e, whose blob is already bad
    result = run_pem("verify", "lab/e")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith(f"FAILED {E}: ")


@pytest.mark.parametrize("missing, made_from_it, rederived", [
    (B, {C, M}, 4),     # b's direct descendants c and m cannot be re-derived; d, e, s, f can
    (C, {D, E, S}, 2),  # c itself is not re-derived; d, e and s (made from c) cannot be; m, f can
])
def test_verify_catches_a_missing_blob(catalog, home, scratch, run_pem, missing, made_from_it, rederived):
    blob_path(home, catalog.resolve(missing).digest).unlink()
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    guard.check()
    assert report.ok is False
    found = failures(report)
    assert set(found) == {missing} | made_from_it
    assert "missing" in found[missing]
    for ref in made_from_it:
        assert missing in found[ref] and "re-derive" in found[ref]
    assert report.rederived == rederived
    result = run_pem("verify", "--all")
    assert result.exit_code == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    assert sorted(re.match(r"FAILED (\S+):", line)[1] for line in failed) == sorted({missing} | made_from_it)
    assert result.stdout.strip().splitlines()[-1] == f"8 checked, {rederived} re-derived, {1 + len(made_from_it)} failed"


# --- a recorded derivation that no longer produces the stored blob -----------------------------------


def test_verify_catches_a_derivation_that_does_not_reproduce_its_blob(catalog, home, scratch, run_pem):
    # d was made as c - 0.2*a; record c - 0.3*a instead: its stored tensors no longer follow.
    set_recorded_b(catalog, D, A, -0.3)
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    guard.check()
    assert report.ok is False
    found = failures(report)
    assert set(found) == {D}  # e was made from d's stored blob, which is intact
    assert "re-derivation gives sha256:" in found[D]
    assert catalog.resolve("lab/d").digest[:12] in found[D]
    assert report.rederived == 6
    result = run_pem("verify", "--all")
    assert result.exit_code == 1
    assert [line for line in result.stdout.splitlines() if line.startswith("FAILED")] == [f"FAILED {D}: {found[D]}"]
    single = run_pem("verify", "lab/d", "--json")
    assert single.exit_code == 1
    data = json.loads(single.stdout)
    assert data["ok"] is False and [f["ref"] for f in data["failures"]] == [D]


def test_exact_is_compared_bit_for_bit(catalog, home, scratch):
    # A change far below the svd tolerance still fails an elementwise method: 1 -> 1 + 1e-6
    # on c's edge into d changes float32 bits.
    set_recorded_b(catalog, D, C, 1.0 + 1e-6)
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify("lab/d")
    guard.check()
    assert report.ok is False and set(failures(report)) == {D}
    assert report.notes == []


# --- svd: compared by effect, only when the digests differ ------------------------------------------


def test_svd_rederivation_within_tolerance_passes_with_a_note(catalog, home, scratch, run_pem):
    # s = svd(c + m); recording c's coefficient as 1 + 1e-6 moves B@A by about 1e-6
    # relative (far below the 1e-4 tolerance) but changes float32 bits, so the digest differs.
    set_recorded_b(catalog, S, C, 1.0 + 1e-6)
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify("lab/s")
    guard.check()
    assert report.ok is True and report.failures == []
    assert report.rederived == 1
    assert len(report.notes) == 1
    note = report.notes[0]
    assert note.startswith(f"{S}: ") and "tolerance" in note and "effect" in note
    error = float(re.search(r"relative error of B@A ([0-9.e+-]+)", note)[1])
    assert 0 < error <= 1e-4
    result = run_pem("verify", "lab/s")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith(f"note: {S}: ")


def test_svd_rederivation_beyond_tolerance_fails(catalog, home, scratch, run_pem):
    # c's coefficient recorded as 2 instead of 1: s's effect moves by far more than 1e-4.
    set_recorded_b(catalog, S, C, 2.0)
    guard = ReadOnly(catalog, home, scratch)
    report = catalog.verify()
    guard.check()
    assert report.ok is False
    assert set(failures(report)) == {S}
    assert "svd re-derivation differs" in failures(report)[S]
    result = run_pem("verify", "--all")
    assert result.exit_code == 1
    assert f"FAILED {S}: svd re-derivation differs" in result.stdout
