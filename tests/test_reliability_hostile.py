"""Hostile inputs (issue 8): malformed or malicious adapter files, absurd configs, compositions
that overflow, and Hub repositories with path-traversal file names.

Each hostile adapter is refused with one clean error line (CLI: exit 1, `error: ...`, no
traceback), and leaves no trace: nothing registered, no new file under the blob store, its
tmp folder empty, nothing written elsewhere. Hostile sizes are never allocated: the same
files are fed to a process limited to 2 GB of address space, which must refuse each quickly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from registry.errors import IncompatibleModulesError, InvalidAdapterError, InvalidNameError, PemError

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
R, HIDDEN = 4, 16


def base_config(**changes) -> dict:
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM"}
    config.update(changes)
    return config


def make_adapter(folder: Path, seed: int = 0, dtype=np.float32, value: float | None = None, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in LAYERS:
        for suffix, shape in ((".lora_A.weight", (R, HIDDEN)), (".lora_B.weight", (HIDDEN, R))):
            array = np.full(shape, value) if value is not None else rng.standard_normal(shape) * 0.3
            tensors[layer + suffix] = array.astype(dtype)
    save_file(tensors, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(base_config(**config)))
    return folder


def valid_layout() -> tuple[dict, bytes]:
    """A safetensors header (as a dict) for the four LoRA tensors, and their data (F32)."""
    header, position = {}, 0
    for layer in LAYERS:
        for suffix, shape in ((".lora_A.weight", [R, HIDDEN]), (".lora_B.weight", [HIDDEN, R])):
            size = math.prod(shape) * 4
            header[layer + suffix] = {"dtype": "F32", "shape": shape, "data_offsets": [position, position + size]}
            position += size
    data = (np.random.default_rng(7).standard_normal(position // 4) * 0.3).astype("<f4").tobytes()
    return header, data


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


A0 = LAYERS[0] + ".lora_A.weight"
B0 = LAYERS[0] + ".lora_B.weight"


def huge_header_length(folder: Path) -> None:
    header, data = valid_layout()
    write_raw(folder / WEIGHTS, header, data, length=2**60)


def overlapping_offsets(folder: Path) -> None:
    header, data = valid_layout()
    start = header[B0]["data_offsets"][0] - 64
    header[B0]["data_offsets"] = [start, start + 256]
    write_raw(folder / WEIGHTS, header, data)


def out_of_range_offsets(folder: Path) -> None:
    header, data = valid_layout()
    end = max(e["data_offsets"][1] for e in header.values())
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    header[last]["data_offsets"] = [end + 1024, end + 1024 + 256]
    write_raw(folder / WEIGHTS, header, data)


def enormous_claimed_tensor(folder: Path) -> None:
    """Shape dims each under the per-dimension limit, but 2**62 bytes of data claimed."""
    header, data = valid_layout()
    end = max(e["data_offsets"][1] for e in header.values())
    header[A0] = {"dtype": "F32", "shape": [2**30, 2**30], "data_offsets": [end, end + 2**62]}
    write_raw(folder / WEIGHTS, header, data)


def unknown_dtype(folder: Path) -> None:
    header, data = valid_layout()
    header[A0]["dtype"] = "F7"
    write_raw(folder / WEIGHTS, header, data)


def gigantic_dimension(folder: Path) -> None:
    header, data = valid_layout()
    end = max(e["data_offsets"][1] for e in header.values())
    header["base_model.model.extra.lora_A.weight"] = {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [end, end]}
    write_raw(folder / WEIGHTS, header, data)


def deeply_nested_header(folder: Path) -> None:
    """A header of nested arrays deep enough to exhaust the JSON decoder's recursion."""
    header, data = valid_layout()
    raw = json.dumps(header).encode()
    depth = 200_000
    raw = raw[:-1] + b', "__x__": ' + b"[" * depth + b"]" * depth + b"}"
    write_raw(folder / WEIGHTS, raw, data)


def enormous_integer_in_header(folder: Path) -> None:
    """An offset written with 5000 digits (Python refuses to convert such strings to int)."""
    header, data = valid_layout()
    raw = json.dumps(header).encode().replace(b'"data_offsets": [0, ', b'"data_offsets": [' + b"9" * 5000 + b", ", 1)
    write_raw(folder / WEIGHTS, raw, data)


def dtype_not_a_string(folder: Path) -> None:
    header, data = valid_layout()
    header[A0]["dtype"] = ["F32"]
    write_raw(folder / WEIGHTS, header, data)


def nan_values(folder: Path) -> None:
    make_adapter(folder, seed=11)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / WEIGHTS))
    tensors[A0][1, 2] = np.nan
    save_file(tensors, str(folder / WEIGHTS))


def inf_values(folder: Path) -> None:
    make_adapter(folder, seed=12)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / WEIGHTS))
    tensors[B0][3, 0] = -np.inf
    save_file(tensors, str(folder / WEIGHTS))


def config_writer(**changes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(base_config(**changes)))
    return write


def deeply_nested_config(folder: Path) -> None:
    depth = 200_000
    (folder / CONFIG).write_text('{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}")


HOSTILE: dict[str, Callable[[Path], None]] = {
    "header-length-2**60": huge_header_length,
    "overlapping-offsets": overlapping_offsets,
    "out-of-range-offsets": out_of_range_offsets,
    "enormous-claimed-tensor": enormous_claimed_tensor,
    "unknown-dtype-F7": unknown_dtype,
    "gigantic-dimension": gigantic_dimension,
    "nan-values": nan_values,
    "inf-values": inf_values,
    "absurd-rank": config_writer(r=10**12),
    # the ranks of the tensors come from rank_pattern; r itself is still absurd
    "absurd-rank-with-rank-pattern": config_writer(r=10**12, rank_pattern={"q_proj": R, "v_proj": R}),
    "absurd-rank-catalog-only-type": config_writer(peft_type="LOHA", r=10**12),
    "deeply-nested-header": deeply_nested_header,
    "enormous-integer-in-header": enormous_integer_in_header,
    "dtype-not-a-string": dtype_not_a_string,
    "deeply-nested-config": deeply_nested_config,
    "overlong-task-type": config_writer(task_type="T" * 200),
    "overlong-peft-type": config_writer(peft_type="P" * 40),
}


def hostile_folder(root: Path, case: str) -> Path:
    folder = make_adapter(root / case, seed=5)
    HOSTILE[case](folder)
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but the SQLite database and its journals) with size and mtime."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("registry.db"):
            stat = path.stat()
            files[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return files


def invoke(*args: str):
    """The CLI in-process; unlike run_pem, an unexpected exception is captured, not raised,
    so that the assertion can name it (a real `pem` would print its traceback)."""
    from cli.main import pem

    return CliRunner().invoke(pem, [str(a) for a in args])


def assert_clean_error(result) -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(
            f"pem crashed with {type(result.exception).__name__}: {str(result.exception)[:300]} "
            "(a traceback, not an `error:` line)"
        )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def assert_store_untouched(home: Path, before: set[str]) -> None:
    blobs = home / "blobs"
    files = {str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file()} if blobs.exists() else set()
    assert files == before, f"new files in the store: {sorted(files - before)}"
    tmp = blobs / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def store_files(home: Path) -> set[str]:
    blobs = home / "blobs"
    return {str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file()} if blobs.exists() else set()


# Cases whose outcome involves the database (column types and sizes) run on both backends;
# the others are refused before the database is touched, so SQLite is enough.
DATABASE_CASES = ["absurd-rank", "absurd-rank-with-rank-pattern", "absurd-rank-catalog-only-type",
                  "overlong-task-type", "overlong-peft-type"]
FILE_CASES = [case for case in HOSTILE if case not in DATABASE_CASES]
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@SQLITE_ONLY
@pytest.mark.parametrize("case", FILE_CASES)
def test_a_hostile_file_is_refused_cleanly_and_leaves_no_trace(case, registry, home, pem_env, tmp_path) -> None:
    check_refused(case, registry, home, tmp_path)


@pytest.mark.parametrize("case", DATABASE_CASES)
def test_a_hostile_config_is_refused_cleanly_and_leaves_no_trace(case, registry, home, pem_env, tmp_path) -> None:
    check_refused(case, registry, home, tmp_path)


def check_refused(case: str, registry, home: Path, tmp_path: Path) -> None:
    registry.add(make_adapter(tmp_path / "good", seed=1), "team/good")  # the store is not empty
    folder = hostile_folder(tmp_path / "hostile", case)
    before_store, before_tree = store_files(home), snapshot(tmp_path)
    before_modules = [m.ref for m in registry.list()]

    started = time.monotonic()
    line = assert_clean_error(invoke("add", folder, "--name", "evil/adapter"))
    assert time.monotonic() - started < 10, "a hostile file must be refused quickly"
    assert len(line) < 1000

    with pytest.raises(PemError):
        registry.add(folder, "evil/adapter")

    assert [m.ref for m in registry.list()] == before_modules
    assert_store_untouched(home, before_store)
    assert snapshot(tmp_path) == before_tree, "something was written outside the store"


@SQLITE_ONLY
@pytest.mark.parametrize("case", ["nan-values", "inf-values"])
def test_nonfinite_values_are_accepted_when_allowed(case: str, registry, home: Path, pem_env, tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path / "hostile", case)
    with pytest.raises(InvalidAdapterError, match="NaN or Inf"):
        registry.add(folder, "evil/nonfinite")
    result = invoke("add", folder, "--name", "evil/nonfinite", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    info = registry.add(folder, "evil/nonfinite", allow_nonfinite=True)
    assert info.ref == "evil/nonfinite@1" and not info.created
    blob = home / "blobs" / "sha256" / info.digest[:2] / info.digest[2:]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == info.digest
    from safetensors.numpy import load_file

    assert not np.isfinite(np.concatenate([t.ravel() for t in load_file(str(blob)).values()])).all()


@SQLITE_ONLY
def test_a_composition_that_overflows_is_refused_and_registers_nothing(
    registry, home: Path, pem_env, tmp_path: Path
) -> None:
    registry.add(make_adapter(tmp_path / "a", dtype=np.float16, value=65000.0), "big/a")
    registry.add(make_adapter(tmp_path / "b", dtype=np.float16, value=64000.0), "big/b")
    before_store, before_modules = store_files(home), [m.ref for m in registry.list()]

    line = assert_clean_error(invoke("compose", "10000*big/a + 10000*big/b", "--name", "big/sum"))
    assert "finite" in line.lower()
    with pytest.raises(IncompatibleModulesError, match="not (be )?finite"):
        registry.compose("10000*big/a + 10000*big/b", "big/sum")

    assert [m.ref for m in registry.list()] == before_modules
    assert_store_untouched(home, before_store)
    assert registry.verify().ok


# --- bounded memory ----------------------------------------------------------------------------

MEMORY_CASES = [
    "header-length-2**60", "enormous-claimed-tensor", "gigantic-dimension", "out-of-range-offsets",
    "overlapping-offsets", "deeply-nested-header", "enormous-integer-in-header", "absurd-rank",
]

LIMITED = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))
from registry import Registry
from registry.errors import PemError
spec = json.loads(sys.argv[1])
reg = Registry.init(spec["home"], database_url=spec["url"], user="tester")
results = {}
for case, folder in spec["folders"].items():
    started = time.monotonic()
    try:
        reg.add(folder, "evil/adapter")
        outcome = "registered"
    except PemError as exc:
        outcome = "PemError"
    except BaseException as exc:
        outcome = type(exc).__name__
    results[case] = [outcome, time.monotonic() - started]
reg.close()
print(json.dumps(results))
"""


def test_hostile_sizes_are_never_allocated(fresh_database_url: str, tmp_path: Path) -> None:
    """Under a 2 GB address-space limit, every hostile file is refused with a PemError, fast."""
    folders = {case: str(hostile_folder(tmp_path / "hostile", case)) for case in MEMORY_CASES}
    spec = {"home": str(tmp_path / "home"), "url": fresh_database_url, "folders": folders}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PEM_FAULT", None)
    result = subprocess.run([sys.executable, "-c", LIMITED, json.dumps(spec)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert {case: outcome for case, (outcome, _) in outcomes.items()} == {case: "PemError" for case in MEMORY_CASES}
    assert all(seconds < 5 for _, seconds in outcomes.values()), outcomes


def _limit_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


@SQLITE_ONLY
@pytest.mark.parametrize("case", ["header-length-2**60", "deeply-nested-header"])
def test_the_pem_command_refuses_a_hostile_file_in_one_line(case: str, registry, home: Path, pem_env,
                                                             tmp_path: Path) -> None:
    """The real command, in its own process limited to 2 GB: exit 1, one `error:` line."""
    folder = hostile_folder(tmp_path / "hostile", case)
    before = store_files(home)
    env = {**os.environ, **pem_env, "PYTHONPATH": str(ROOT)}
    env.pop("PEM_FAULT", None)
    result = subprocess.run([sys.executable, "-m", "cli.main", "add", str(folder), "--name", "evil/adapter"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=_limit_address_space)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert registry.list() == []
    assert_store_untouched(home, before)


# --- Hub names ---------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize("repo", ["../x", "a/../b", "..", "a/..", "./x", "a/./b", "a/b/../../c", "/etc/passwd",
                                  "a\\..\\b", "a/b/c", ".a/b", "a/.b"])
def test_a_repo_id_with_path_segments_is_refused(repo: str, registry, pem_env) -> None:
    with pytest.raises(InvalidNameError, match="invalid Hub repo"):
        registry.pull(repo)
    line = assert_clean_error(invoke("pull", repo))
    assert "invalid hub repo" in line.lower()
    assert registry.list() == []


@SQLITE_ONLY
def test_a_repo_listing_traversal_names_is_pulled_without_touching_them(
    hub, registry, home: Path, tmp_path: Path
) -> None:
    """The registry downloads fixed names only: siblings '../evil.safetensors' and
    '/etc/passwd' are never fetched or written anywhere."""
    folder = make_adapter(tmp_path / "adapter", seed=21)
    passwd = Path("/etc/passwd")
    passwd_bytes = passwd.read_bytes() if passwd.exists() else b"root:x:0:0::/root:/bin/sh\n"
    passwd_stat = passwd.stat() if passwd.exists() else None
    repo = f"trav-{uuid.uuid4().hex[:8]}/adapter"
    # the '/etc/passwd' entry holds the machine's own bytes: were it ever written, nothing changes
    hub.add_commit(repo, {
        CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes(),
        "../evil.safetensors": b"EVIL" * 64, "/etc/passwd": passwd_bytes, "../../pem-evil-marker": b"EVIL",
    })
    cache = Path(os.environ["HF_HUB_CACHE"])
    system_tmp = Path(tempfile.gettempdir())
    watched = [tmp_path, cache, system_tmp, ROOT, Path.cwd()]
    before = {root: {p.name for p in root.rglob("*evil*")} for root in (tmp_path, cache)}
    before_top = {root: set(os.listdir(root)) for root in (system_tmp, ROOT, Path.cwd(), cache.parent)}

    info = registry.pull(repo)
    assert info.created and info.ref == f"{repo}@1"
    blob = home / "blobs" / "sha256" / info.digest[:2] / info.digest[2:]
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == info.digest

    assert {root: {p.name for p in root.rglob("*evil*")} for root in (tmp_path, cache)} == before
    for root, names in before_top.items():
        new = set(os.listdir(root)) - names
        assert not {n for n in new if "evil" in n or n == "passwd"}, (root, new)
    if passwd_stat is not None:
        assert passwd.stat().st_mtime_ns == passwd_stat.st_mtime_ns and passwd.read_bytes() == passwd_bytes
    assert not any((root / "evil.safetensors").exists() for root in watched)
    assert not any(root.parent.joinpath("evil.safetensors").exists() for root in watched)
    # only the fixed names were taken from the repo
    blobs = home / "blobs"
    stored = [p for p in blobs.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0] == blob


# --- values beyond the columns' ranges ----------------------------------------------------------


def test_an_adapter_mixing_three_float_dtypes_registers(registry, home: Path, pem_env, tmp_path: Path) -> None:
    """F16, F32 and F64 tensors in one (valid) file: the recorded dtype ("mixed")
    must fit the catalog on every backend."""
    folder = make_adapter(tmp_path / "mixed", seed=31)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / WEIGHTS))
    names = sorted(tensors)
    tensors[names[0]] = tensors[names[0]].astype(np.float16)
    tensors[names[1]] = tensors[names[1]].astype(np.float64)
    save_file(tensors, str(folder / WEIGHTS))
    result = invoke("add", folder, "--name", "team/mixed")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pem crashed with {type(result.exception).__name__}: {str(result.exception)[:200]}")
    assert result.exit_code == 0, result.output
    assert registry.get("team/mixed").dtype == "mixed"
    assert registry.verify().ok


def test_a_reference_to_an_enormous_version_is_a_clean_error(registry, pem_env, tmp_path: Path) -> None:
    """A version beyond the database's integer column (2**31 on PostgreSQL, 2**63 on SQLite),
    or with more digits than int() converts, is simply a version that does not exist."""
    registry.add(make_adapter(tmp_path / "good", seed=1), "team/good")
    problems = []
    for ref in ["team/good@2147483648", "team/good@9223372036854775808", "team/good@99999999999999999999",
                "team/good@" + "9" * 5000]:
        shown = ref if len(ref) < 40 else ref[:30] + "..."
        for what, call in [("get", lambda: registry.get(ref)), ("check", lambda: registry.check(f"0.5*{ref}"))]:
            try:
                call()
            except PemError:
                continue
            except Exception as exc:
                problems.append(f"{what}({shown}) raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            else:
                problems.append(f"{what}({shown}) found a module")
        result = invoke("show", ref)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"pem show {shown} crashed with {type(result.exception).__name__}")
        elif result.exit_code != 1 or len(result.stderr.splitlines()) != 1:
            problems.append(f"pem show {shown}: exit {result.exit_code}, {result.stderr!r}")
    assert not problems, "\n".join(problems)
