"""Regressions found by review: hostile config values, unwritable export targets, stray files
in the store, and a damaged blob repaired by re-adding its content."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from independent import CONFIG, make_numpy_lora

from registry.errors import InvalidAdapterError, PemError


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def with_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    # json.dumps writes float("inf") as Infinity, which Python's json reads back as inf
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"revision": ["x"]}, "revision must be a string"),
        ({"base_model_name_or_path": 5}, "base_model_name_or_path must be a string"),
        ({"task_type": 5}, "task_type must be a string"),
        ({"rank_pattern": {"[": 4}}, "not a valid regex"),
        ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern gives 'x'"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ],
)
def test_hostile_config_values_are_refused_before_anything_is_written(registry, home, tmp_path, changes, message):
    folder = with_config(make_numpy_lora(tmp_path / "a", seed=1), **changes)
    with pytest.raises(InvalidAdapterError, match=message):
        registry.add(folder, "team/a")
    assert registry.list() == []
    assert blob_files(home) == []


def test_export_to_an_unwritable_place_is_a_one_line_error(registry, run_pem, tmp_path):
    registry.add(make_numpy_lora(tmp_path / "a", seed=1), "team/a")
    with pytest.raises(PemError, match="cannot write to /dev/null/x"):
        registry.export("team/a", "/dev/null/x")
    result = run_pem("export", "team/a", "/dev/null/x")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot write to /dev/null/x")


def test_gc_and_verify_ignore_stray_files_in_the_store(registry, home, tmp_path):
    info = registry.add(make_numpy_lora(tmp_path / "a", seed=1), "team/a")
    (home / "blobs" / "sha256" / "stray").write_text("not a blob")
    report = registry.gc(grace_seconds=0)
    assert report.blobs == []
    assert registry.verify().ok
    # gc leaves both alone: the referenced blob, and the stray file that is not a blob
    assert sorted(p.name for p in blob_files(home)) == sorted([info.digest[2:], "stray"])


@pytest.mark.parametrize("damage", ["directory", "truncated"])
def test_re_adding_the_content_repairs_a_damaged_blob(registry, home, tmp_path, damage):
    folder = make_numpy_lora(tmp_path / "a", seed=1)
    info = registry.add(folder, "team/a")
    blob = home / "blobs" / "sha256" / info.digest[:2] / info.digest[2:]
    os.chmod(blob, 0o644)
    if damage == "directory":
        blob.unlink()
        blob.mkdir()
    else:
        blob.write_bytes(blob.read_bytes()[:100])
    assert not registry.verify().ok
    again = registry.add(folder, "team/a")
    assert again.ref == "team/a@1" and not again.created
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == info.digest
    assert registry.verify().ok
    shutil.rmtree(tmp_path / "a")


def test_a_single_input_scaled_beyond_the_float_range_is_reported_not_raised(registry, tmp_path):
    """--(team/a / 1e-300) with `module`: the effect a*b = 1e600 cannot be a float; check
    reports it instead of failing with OverflowError (since issue 14: as a violation, the
    coefficient being beyond the float32 range the arithmetic runs in)."""
    registry.add(make_numpy_lora(tmp_path / "a", seed=1), "team/a")
    report = registry.check("-(-(team/a / 1e-300))")
    assert report.terms[0].b == 1e300
    assert not report.composable
    assert any("1e+300" in v and "beyond the float32 range" in v for v in report.violations)
