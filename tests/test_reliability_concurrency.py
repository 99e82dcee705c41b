"""Concurrent writers (issue 8): eight processes register and compose at once, on SQLite and
PostgreSQL, and every registration lands exactly once with gapless versions per name.

The workers are separate Python processes (the Python API, as ``pem`` uses it) that import
everything first and then wait at a barrier (a file appearing), so that their writes really
overlap. Adapter folders are built in the parent beforehand with numpy (no PEFT, no model),
which keeps the test well inside its time budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from independent import make_numpy_lora as make_adapter
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 8
BAD_STDERR = ("database is locked", "could not serialize", "serializ", "deadlock", "Traceback", "could not allocate")


# One launcher process imports everything once (torch included: compose must not start late),
# then forks the eight workers, which wait at a barrier and then each make 3 adds (distinct
# content to one shared name; identical content to one name; one of two contents to a third
# name) and 1 compose (even workers: the same derivation to the same name; odd workers: a
# derivation of their own). Each worker (or each of its threads, for the burst test) opens its
# own Registry, with its own connections, after the fork.
LAUNCHER = r"""
import json, os, sys, time, traceback
from pathlib import Path
spec = json.loads(sys.argv[1])
from registry import Registry
if any(op[1] == "compose" for worker in spec["workers"] for ops in worker["threads"] for op in ops):
    import torch  # noqa: F401
    from registry.compose import engine  # noqa: F401

def info(value):
    return dict(value.model_dump(mode="json"), created=value.created)

def run_ops(index, ops, out, errors):
    try:
        reg = Registry.open(spec["home"], database_url=spec["url"], user=f"worker{index}")
    except BaseException as exc:
        errors.append(traceback.format_exc())
        return
    go = Path(spec["go"])
    while not go.exists():
        time.sleep(0.002)
    try:
        for key, op, target, name in ops:
            if op == "add":
                out[key] = info(reg.add(target, name))
            else:
                out[key] = info(reg.compose(target.format(**{k: v["ref"] for k, v in out.items()}), name))
    except BaseException:
        errors.append(traceback.format_exc())
    finally:
        reg.close()

def work(args):
    # one thread per list of operations, each with its own Registry (its own connections)
    import threading
    out, errors = {}, []
    threads = [threading.Thread(target=run_ops, args=(args["index"], ops, out, errors)) for ops in args["threads"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        sys.stderr.write("\n".join(errors))
        raise SystemExit(1)
    print(json.dumps(out))

pids = {}
for args in spec["workers"]:
    out_path, err_path = Path(args["stdout"]), Path(args["stderr"])
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            work(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pids[pid] = args["index"]
Path(spec["go"]).touch()  # every worker is forked: release them together
codes = {}
for _ in range(len(pids)):
    pid, status = os.wait()
    codes[pids[pid]] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


def _run_workers(home: Path, url: str, ops: list, tmp: Path) -> list[dict]:
    """Run one worker process per entry of ``ops``: a list of operations (key, "add" or
    "compose", folder or expression, name), or a list of such lists, one thread each.
    Returns each worker's {key: ModuleInfo as JSON + created}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEM_USER": "tester", "OMP_NUM_THREADS": "1"}
    env.pop("PEM_FAULT", None)
    workers = [
        {"index": i, "threads": worker_ops if isinstance(worker_ops[0], list) else [worker_ops],
         "stdout": str(tmp / f"worker{i}.out"), "stderr": str(tmp / f"worker{i}.err")}
        for i, worker_ops in enumerate(ops)
    ]
    spec = {"home": str(home), "url": url, "go": str(tmp / "go"), "workers": workers}
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=90)
    assert launcher.returncode == 0, launcher.stderr
    codes = {int(k): v for k, v in json.loads(launcher.stdout.strip().splitlines()[-1]).items()}
    results = []
    for i in range(len(ops)):
        stderr = (tmp / f"worker{i}.err").read_text()
        assert codes[i] == 0, f"worker {i} failed (exit {codes[i]}):\n{stderr}"
        lowered = stderr.lower()
        assert not any(bad.lower() in lowered for bad in BAD_STDERR), f"worker {i} stderr:\n{stderr}"
        results.append(json.loads((tmp / f"worker{i}.out").read_text().strip().splitlines()[-1]))
    return results


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eight_concurrent_writers_register_everything_exactly_once(registry, home: Path, database_url: str,
                                                                   tmp_path: Path) -> None:
    folders = {"common": make_adapter(tmp_path / "adapters" / "common", seed=1000)}
    for i in range(WORKERS):
        folders[f"shared{i}"] = make_adapter(tmp_path / "adapters" / f"shared{i}", seed=2000 + i)
    for i in range(2):
        folders[f"pair{i}"] = make_adapter(tmp_path / "adapters" / f"pair{i}", seed=3000 + i)

    ops = []
    for i in range(WORKERS):
        worker = [("shared", "add", str(folders[f"shared{i}"]), "race/shared"),
                  ("common", "add", str(folders["common"]), "race/common"),
                  ("pair", "add", str(folders[f"pair{i % 2}"]), "race/pair")]
        if i % 2 == 0:
            worker.append(("compose", "compose", "2*race/common", "race/double"))
        else:
            worker.append(("compose", "compose", "{shared} - 0.5*race/common", f"race/mix-{i}"))
        ops.append(worker)
    results = _run_workers(home, database_url, ops, tmp_path)

    modules = registry.list()
    by_name: dict[str, list] = {}
    for m in modules:
        by_name.setdefault(m.name, []).append(m)
    mixes = {f"race/mix-{i}" for i in range(WORKERS) if i % 2}
    assert set(by_name) == {"race/common", "race/shared", "race/pair", "race/double"} | mixes

    # versions per name: unique and gapless, 1..n
    for name, versions in by_name.items():
        numbers = sorted(m.version for m in versions)
        assert numbers == list(range(1, len(numbers) + 1)), (name, numbers)

    # identical content under one name: exactly one module, exactly one creator
    assert len(by_name["race/common"]) == 1
    assert {r["common"]["ref"] for r in results} == {"race/common@1"}
    assert sum(r["common"]["created"] for r in results) == 1

    # eight different contents under one name: eight versions, each worker's content once
    shared = by_name["race/shared"]
    assert len(shared) == WORKERS
    assert len({m.digest for m in shared}) == WORKERS
    assert all(r["shared"]["created"] for r in results)
    assert sorted(r["shared"]["ref"] for r in results) == sorted(m.ref for m in shared)
    assert {r["shared"]["ref"]: r["shared"]["digest"] for r in results} == {m.ref: m.digest for m in shared}
    for i, r in enumerate(results):  # the content each worker sent is the version it was told it got
        source = registry.get(r["shared"]["ref"]).source
        assert source["file_sha256"] == _file_digest(folders[f"shared{i}"] / "adapter_model.safetensors")

    # two contents, four writers each: two versions, one creator per content
    pair = by_name["race/pair"]
    assert len(pair) == 2 and len({m.digest for m in pair}) == 2
    created = Counter(r["pair"]["digest"] for r in results if r["pair"]["created"])
    assert sorted(created.values()) == [1, 1]
    for i, r in enumerate(results):
        assert r["pair"]["digest"] == results[i % 2]["pair"]["digest"]

    # the same derivation composed by four workers at once: one module
    assert len(by_name["race/double"]) == 1
    doubles = [r["compose"] for i, r in enumerate(results) if i % 2 == 0]
    assert {d["ref"] for d in doubles} == {"race/double@1"}
    assert sum(d["created"] for d in doubles) == 1
    for i, r in enumerate(results):
        if i % 2:
            assert r["compose"]["ref"] == f"race/mix-{i}@1" and r["compose"]["created"]
            provenance = registry.get(r["compose"]["ref"]).provenance
            assert sorted(p.ref for p in provenance.inputs) == sorted([r["shared"]["ref"], "race/common@1"])

    # 1 + 8 + 2 + 1 + 4 registrations, each landed once
    assert len(modules) == 1 + WORKERS + 2 + 1 + WORKERS // 2

    # the version counters agree with the versions handed out
    with registry.engine.connect() as conn:
        counters = {f"{ns}/{n}": v for ns, n, v in conn.execute(
            text("SELECT namespace, name, last_version FROM module_names"))}
        blob_rows = set(conn.execute(text("SELECT digest FROM blobs")).scalars())
    assert counters == {name: len(versions) for name, versions in by_name.items()}
    assert blob_rows >= {m.digest for m in modules}

    # every blob is whole, every derivation re-derives, nothing is left half-written
    report = registry.verify()
    assert report.ok, report.failures
    tmp_dir = home / "blobs" / "tmp"
    assert not tmp_dir.exists() or list(tmp_dir.iterdir()) == []
    stored = {p.parent.name + p.name for p in (home / "blobs" / "sha256").glob("*/*")}
    assert stored == {m.digest for m in modules}


def test_a_burst_of_writers_to_one_name_never_gives_up(registry, home: Path, database_url: str, tmp_path: Path) -> None:
    """Eight processes of four threads each register two different contents apiece under the
    same name at once: 64 versions, 1..64, and no writer is turned away (a version counter
    that loses updates under concurrency makes writers retry until they give up)."""
    threads, per_thread = 4, 2

    def folder(i: int, t: int, k: int) -> Path:
        return make_adapter(tmp_path / "adapters" / f"w{i}-{t}-{k}", seed=5000 + 100 * i + 10 * t + k)

    ops = [
        [
            [(f"v{t}-{k}", "add", str(folder(i, t, k)),
              "burst/one") for k in range(per_thread)]
            for t in range(threads)
        ]
        for i in range(WORKERS)
    ]
    total = WORKERS * threads * per_thread
    results = _run_workers(home, database_url, ops, tmp_path)
    modules = registry.list()
    assert sorted(m.version for m in modules) == list(range(1, total + 1))
    assert len({m.digest for m in modules}) == total
    assert sorted(r[key]["ref"] for r in results for key in r) == sorted(m.ref for m in modules)
    assert all(r[key]["created"] for r in results for key in r)
