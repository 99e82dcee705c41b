"""A lineage graph corrupted the way a compose racing `pem rm` left it before schema 0005 (a
module listed as its own input), or by hand (cycles), on SQLite and PostgreSQL: every graph
query stops and names the cycle instead of looping, `pem verify` and `pem doctor` name the
corrupt modules, and the self-referencing module can be removed.

The corruption is written with plain SQL. Commands that used to loop run as subprocesses
with a timeout, so that a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from independent import make_numpy_lora as make_adapter
from sqlalchemy import create_engine, text

from registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def pem(pem_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **pem_env, "PYTHONPATH": str(ROOT)}
    env.pop("PEM_FAULT", None)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def execute(database_url: str, statement: str, **params: object) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def module_id(database_url: str, ref: str) -> int:
    name, version = ref.split("@")
    namespace, short = name.split("/")
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT id FROM modules WHERE namespace = :ns AND name = :n AND version = :v"),
                                {"ns": namespace, "n": short, "v": int(version)}).scalar_one()
    finally:
        engine.dispose()


def point_input(database_url: str, output: str, old_input: str, new_input: str, *, digest: str | None = None) -> None:
    """Rewrite the edge ``output`` <- ``old_input`` to point at ``new_input`` (keeping the
    recorded digest, as the race did, unless ``digest`` is given)."""
    execute(
        database_url,
        "UPDATE derivation_inputs SET input_id = :new, input_digest = COALESCE(:digest, input_digest) "
        "WHERE module_id = :out AND input_id = :old",
        new=module_id(database_url, new_input), out=module_id(database_url, output),
        old=module_id(database_url, old_input), digest=digest,
    )


@pytest.fixture
def graph(registry, tmp_path: Path):
    a = registry.add(make_adapter(tmp_path / "a", seed=1), "g/a")
    b = registry.add(make_adapter(tmp_path / "b", seed=2), "g/b")
    s = registry.compose("g/a + g/b", "g/s")
    return {"a": a, "b": b, "s": s}


def position_of_b(graph) -> int:
    """Where g/b is among g/s's inputs (1-based): inputs are kept in the order of their digests."""
    return sorted([graph["a"].digest, graph["b"].digest]).index(graph["b"].digest) + 1


def cycle_error(root: str, *cycle: str) -> str:
    return (f"error: the provenance of {root} is corrupt: {' > '.join(cycle)} is a cycle (a module made from "
            "itself); `pem verify --all` lists every such problem")


def test_a_module_listed_as_its_own_input_is_named_and_no_query_loops(
    registry, graph, pem_env, database_url: str, home: Path
) -> None:
    point_input(database_url, "g/s@1", "g/b@1", "g/s@1")  # what the race left: g/b's id reused by g/s

    for command in (("lineage", "g/s"), ("contents", "g/s"), ("descendants", "g/a")):
        result = pem(pem_env, *command)
        root = "g/a@1" if command[0] == "descendants" else "g/s@1"
        assert (result.returncode, result.stderr.strip()) == (1, cycle_error(root, "g/s@1", "g/s@1")), command
        assert result.stdout == ""

    verified = pem(pem_env, "verify", "--all")
    assert verified.returncode == 1
    assert verified.stdout.splitlines() == [
        f"FAILED g/s@1: corrupt provenance: g/s@1 lists itself as its own input (input {position_of_b(graph)}, made from "
        f"sha256:{graph['b'].digest[:12]}): that input was removed while this module was composed, and its row "
        "id reused; remove it with `pem rm g/s@1`",
        "3 checked, 0 re-derived, 1 failed",
    ]
    single = registry.verify("g/s")
    assert [f.ref for f in single.failures] == ["g/s@1"] and not single.ok

    doctor = {c.name: c for c in Registry.doctor(home)}
    assert not doctor["lineage"].ok and "g/s@1 lists itself as its own input" in doctor["lineage"].detail
    assert doctor["lineage"].fix == "run `pem verify --all` for the full list"
    listed = pem(pem_env, "doctor", "--json")
    assert listed.returncode == 1 and not {c["name"]: c for c in json.loads(listed.stdout)}["lineage"]["ok"]

    # The corrupt module can be removed (its edge to itself is no descendant); all is well then.
    removed = pem(pem_env, "rm", "g/s@1")
    assert removed.returncode == 0, removed.stderr
    assert registry.verify().ok
    assert {c.name: c for c in Registry.doctor(home)}["lineage"].ok


def test_an_input_row_given_to_another_module_is_named(registry, graph, pem_env, database_url: str, tmp_path) -> None:
    """The race's other outcome before 0005: the input's id went to an unrelated new module."""
    registry.add(make_adapter(tmp_path / "c", seed=3), "g/c")
    c = registry.resolve("g/c")
    point_input(database_url, "g/s@1", "g/b@1", "g/c@1")
    report = registry.verify()
    assert [(f.ref, f.problem) for f in report.failures] == [(
        "g/s@1",
        f"corrupt provenance: g/s@1 input {position_of_b(graph)} was sha256:{graph['b'].digest[:12]} but points at g/c@1 "
        f"(sha256:{c.digest[:12]}): that input was removed and its row id reused; remove it with `pem rm g/s@1`",
    )]


def test_a_cycle_through_two_modules_stops_every_walk(registry, graph, pem_env, database_url: str) -> None:
    t = registry.compose("2*g/s", "g/t")
    point_input(database_url, "g/s@1", "g/b@1", "g/t@1", digest=t.digest)  # g/s <- g/t <- g/s

    for command, root in (("lineage", "g/t@1"), ("contents", "g/t@1"), ("contents", "g/s@1"), ("descendants", "g/a@1")):
        result = pem(pem_env, command, root)
        loop = ("g/t@1", "g/s@1", "g/t@1") if root == "g/t@1" else ("g/s@1", "g/t@1", "g/s@1")
        assert (result.returncode, result.stderr.strip()) == (1, cycle_error(root, *loop)), (command, root)

    report = registry.verify()
    assert sorted((f.ref, f.problem) for f in report.failures) == [
        ("g/s@1", "corrupt provenance: g/s@1 is on a provenance cycle: g/s@1 > g/t@1 > g/s@1"),
        ("g/t@1", "corrupt provenance: g/t@1 is on a provenance cycle: g/s@1 > g/t@1 > g/s@1"),
    ]


def test_a_cycle_through_non_linear_modules_stops_contents(registry, graph, pem_env, database_url: str) -> None:
    """svd modules are opaque: contents lists each one's own contents in turn, a walk per
    module, so a cycle through two of them is seen by no single walk."""
    registry.compose("g/a + g/b", "g/x", method="svd")
    y = registry.compose("g/x + g/a", "g/y", method="svd")
    point_input(database_url, "g/x@1", "g/a@1", "g/y@1", digest=y.digest)  # g/x <- g/y <- g/x

    result = pem(pem_env, "contents", "g/y")
    assert (result.returncode, result.stderr.strip()) == (1, cycle_error("g/y@1", "g/y@1", "g/x@1", "g/y@1"))
    assert registry.verify("g/y").failures[0].problem.startswith("corrupt provenance: ")
