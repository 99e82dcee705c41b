"""Crash safety (issue 8): a ``pem`` process killed with SIGKILL at each fault point
(registry/faults.py) leaves a catalog that never references a missing or partial blob,
that `verify` passes, and whose leftovers `gc` lists and collects exactly (after the grace
period: a fresh orphan may belong to a writer in flight). The same operation run again
afterwards succeeds, with the version it would have had.

Expected sets are computed from the files on disk and the catalog's rows, not from gc.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from independent import make_numpy_lora as make_adapter

ROOT = Path(__file__).resolve().parents[1]


def run_cli(pem_env: dict[str, str], tmp: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **pem_env, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    env.pop("PEM_FAULT", None)
    if fault:
        env["PEM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def stored_blobs(home: Path) -> set[str]:
    return {p.parent.name + p.name for p in (home / "blobs" / "sha256").glob("*/*")}


def temporary_files(home: Path) -> set[str]:
    tmp = home / "blobs" / "tmp"
    return {str(p) for p in tmp.iterdir()} if tmp.is_dir() else set()


def module_digests(registry) -> set[str]:
    return {m.digest for m in registry.list()}


def assert_catalog_whole(registry, home: Path) -> None:
    """Every module's blob exists and hashes to its digest; verify agrees."""
    for module in registry.list():
        path = home / "blobs" / "sha256" / module.digest[:2] / module.digest[2:]
        assert path.is_file(), f"{module.ref} references a missing blob"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == module.digest, f"{module.ref}: partial blob"
    report = registry.verify()
    assert report.ok, report.failures


@pytest.fixture
def seeded(registry, tmp_path: Path):
    """Two registered modules (the inputs of the compositions), and a folder not yet added."""
    a = registry.add(make_adapter(tmp_path / "a", seed=1), "crash/a")
    b = registry.add(make_adapter(tmp_path / "b", seed=2), "crash/b")
    return {"a": a, "b": b, "new": make_adapter(tmp_path / "new", seed=3)}


# Faults inside a database transaction, or followed by gc's PostgreSQL table lock, run on both
# backends; the others happen before the catalog is touched, so SQLite is enough for them.
BOTH = ("sqlite", "postgresql")
CASES = [
    ("blob-written", "add", ("sqlite",)),
    ("blob-stored", "add", BOTH),
    ("row-flushed", "add", BOTH),
    ("compose-layer", "compose", ("sqlite",)),
    ("row-flushed", "compose", BOTH),
    ("pull-downloaded", "pull", ("sqlite",)),
]
PARAMS = [
    pytest.param(fault, operation, backend, id=f"{backend}-{operation}-{fault}")
    for fault, operation, backends in CASES for backend in backends
]


@pytest.mark.parametrize(("fault", "operation", "database_url"), PARAMS, indirect=["database_url"])
def test_a_process_killed_at_a_fault_point_leaves_a_consistent_registry(
    fault: str, operation: str, registry, seeded, home: Path, pem_env, run_pem, tmp_path: Path, request,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if operation == "add":
        args = ("add", str(seeded["new"]), "--name", "crash/new")
    elif operation == "compose":
        args = ("compose", "crash/a + 0.5*crash/b", "--name", "crash/mix")
    else:
        hub = request.getfixturevalue("hub")
        repo = f"crash-{uuid.uuid4().hex[:8]}/adapter"
        new = seeded["new"]
        hub.add_commit(repo, {name: (new / name).read_bytes()
                              for name in ("adapter_config.json", "adapter_model.safetensors")})
        args = ("pull", repo, "--name", "crash/pulled")
    before = registry.list()

    result = run_cli(pem_env, scratch, *args, fault=fault)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)

    # the catalog is what it was: the killed registration left no row
    assert [m.ref for m in registry.list()] == [m.ref for m in before]
    assert_catalog_whole(registry, home)

    # what the crash left behind, from the disk and the catalog
    orphans = stored_blobs(home) - module_digests(registry)
    partial = temporary_files(home)
    if fault == "blob-written" or fault == "compose-layer":
        assert partial, "a writer killed before the rename leaves its temporary file"
    if fault in ("blob-stored", "row-flushed"):
        assert orphans, "a writer killed after the rename leaves an unreferenced blob"
    if fault == "pull-downloaded":
        assert not orphans and not partial

    # the CLI's dry run lists them first (and with the default grace period, nothing)
    listed = run_pem("gc", "--dry-run", "--grace", "0")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert {ln.removeprefix("would delete blob sha256:") for ln in lines
            if ln.startswith("would delete blob ")} == orphans
    assert {ln.removeprefix("would delete partial write ") for ln in lines
            if ln.startswith("would delete partial write ")} == partial
    assert stored_blobs(home) - module_digests(registry) == orphans and temporary_files(home) == partial
    default = run_pem("gc", "--dry-run")
    assert default.exit_code == 0 and "would delete" not in default.output

    report = registry.gc(dry_run=True, grace_seconds=0)
    assert set(report.blobs) == orphans and len(report.blobs) == len(orphans)
    assert set(report.temporary_files) == partial
    assert stored_blobs(home) - module_digests(registry) == orphans and temporary_files(home) == partial

    # fresh leftovers survive a gc with the default grace period
    spared = registry.gc()
    assert spared.blobs == [] and spared.temporary_files == []
    assert stored_blobs(home) - module_digests(registry) == orphans and temporary_files(home) == partial

    referenced = module_digests(registry)
    collected = registry.gc(grace_seconds=0)
    assert set(collected.blobs) == orphans and set(collected.temporary_files) == partial
    assert stored_blobs(home) == referenced
    assert temporary_files(home) == set()
    assert_catalog_whole(registry, home)
    assert registry.gc(dry_run=True, grace_seconds=0).blobs == []

    # and the operation, run again, succeeds with the version it would have had
    again = run_pem(*args)
    assert again.exit_code == 0, again.output
    name = args[args.index("--name") + 1]
    assert [m.version for m in registry.list() if m.name == name] == [1]
    assert_catalog_whole(registry, home)
    assert temporary_files(home) == set()
    assert stored_blobs(home) == module_digests(registry)
