"""Integrity under concurrent `pem rm` (issue 14, item 1), on SQLite and PostgreSQL.

The rule: a writer that resolved a module earlier and writes something referring to it later
(compose, port, push, pull, tag, describe, alias set) either fails naming the module that was
removed meanwhile, writing nothing, or it registers first and the rm is refused because the
module now has a descendant. Never both. Races are made deterministic with the fault points'
``:stop`` mode (registry/faults.py): the writer stops itself with SIGSTOP at a known point,
the test sees it stopped (waitpid WUNTRACED), runs `pem rm`, and resumes it with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from independent import make_numpy_lora as make_adapter
from sqlalchemy import create_engine, text

from registry.errors import ModuleRemovedError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # generous: the machine is shared; a hang fails instead of blocking the suite


def pem_process(pem_env: dict[str, str], *args: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **pem_env, "PYTHONPATH": str(ROOT)}
    env.pop("PEM_FAULT", None)
    if fault:
        env["PEM_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pem(pem_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    process = pem_process(pem_env, *args)
    out, err = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_until_stopped(process: subprocess.Popen) -> None:
    """Returns once the process has stopped itself at its fault point (no sleeping)."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the process ended before its fault point (status {status})"


def resume(process: subprocess.Popen) -> subprocess.CompletedProcess:
    os.kill(process.pid, signal.SIGCONT)
    out, err = process.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture
def stopped_processes():
    """Processes a test stops; killed at the end whatever happened, so none is left behind."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            os.kill(process.pid, signal.SIGCONT)
            process.wait()


def stored_blobs(home: Path) -> set[str]:
    return {p.parent.name + p.name for p in (home / "blobs" / "sha256").glob("*/*")}


def module_ids(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, namespace, name, version FROM modules"))
            return {f"{ns}/{n}@{v}": i for i, ns, n, v in rows}
    finally:
        engine.dispose()


@pytest.fixture
def inputs(registry, tmp_path: Path):
    """r/one, then r/two: r/two holds the newest row, whose id SQLite used to give again."""
    one = registry.add(make_adapter(tmp_path / "one", seed=1), "r/one")
    two = registry.add(make_adapter(tmp_path / "two", seed=2), "r/two")
    return one, two


# --- compose against rm -----------------------------------------------------------------------


def test_rm_of_an_input_while_it_is_composed_fails_the_compose(
    registry, inputs, home: Path, pem_env, database_url: str, stopped_processes
) -> None:
    one, two = inputs
    compose = pem_process(pem_env, "compose", "r/one + r/two", "--name", "r/s", "--method", "exact",
                          fault="compose-layer:stop")
    stopped_processes.append(compose)
    wait_until_stopped(compose)  # it has resolved both inputs and written its first layer

    removed = pem(pem_env, "rm", "r/two@1")
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed r/two@1"), removed.stderr

    result = resume(compose)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: input r/two@1 was removed while composing; nothing was registered"

    # Nothing was registered: the catalog is r/one alone, and everything about it is right.
    assert [m.ref for m in registry.list()] == ["r/one@1"]
    lineage = registry.lineage("r/one")
    assert [n.ref for n in lineage.nodes] == ["r/one@1"] and lineage.edges == []
    contents = registry.contents("r/one")
    assert [(t.ref, t.a, t.b) for t in contents.terms] == [("r/one@1", 1.0, 1.0)]
    report = registry.verify()
    assert (report.ok, report.checked, report.failures) == (True, 1, [])
    checked = pem(pem_env, "verify", "--all")
    assert checked.returncode == 0 and "1 checked" in checked.stdout, checked.stdout + checked.stderr
    # r/two's blob went with it; the compose's output blob is left for `pem gc`.
    leftovers = stored_blobs(home) - {one.digest}
    assert two.digest not in stored_blobs(home) and len(leftovers) == 1
    assert registry.gc(dry_run=True, grace_seconds=0).blobs == sorted(leftovers)

    # The next module gets a new id, never the removed r/two's (SQLite reused it before 0005).
    again = registry.add(make_adapter(Path(str(home) + "-new"), seed=3), "r/new")
    assert module_ids(database_url)[again.ref] > 2


def test_a_compose_that_registers_first_makes_the_rm_wait_and_refuses_it(
    registry, inputs, pem_env, database_url: str, stopped_processes
) -> None:
    compose = pem_process(pem_env, "compose", "r/one + r/two", "--name", "r/s", "--method", "exact",
                          fault="row-flushed:stop")
    stopped_processes.append(compose)
    wait_until_stopped(compose)  # inside its registering transaction: the inputs are locked

    rm = pem_process(pem_env, "rm", "r/two@1")
    stopped_processes.append(rm)
    if database_url.startswith("postgresql"):
        wait_for_a_lock_wait(database_url)  # the rm queues behind the compose's lock on r/two
    result = resume(compose)
    assert result.returncode == 0, result.stderr
    assert "r/s@1" in result.stdout

    out, err = rm.communicate(timeout=TIMEOUT)
    assert rm.returncode == 1
    assert err.strip() == "error: cannot remove r/two@1: r/s@1 was derived from it; remove those first"
    assert [m.ref for m in registry.list()] == ["r/one@1", "r/s@1", "r/two@1"]
    assert sorted(e.input for e in registry.lineage("r/s").edges) == ["r/one@1", "r/two@1"]
    assert registry.verify().ok


def wait_for_a_lock_wait(database_url: str) -> None:
    """Until a session of this test's database waits for a row lock (polling pg_stat_activity;
    a wait, not a timed assertion)."""
    engine = create_engine(database_url)
    database = database_url.rsplit("/", 1)[1]
    try:
        with engine.connect() as conn:
            while not conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND wait_event_type = 'Lock'"
            ), {"db": database}).scalar():
                conn.commit()  # a new snapshot of the activity view each time
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_never_gives_a_removed_module_id_again(registry, inputs, tmp_path: Path, database_url: str) -> None:
    removed_id = module_ids(database_url)["r/two@1"]
    registry.remove("r/two@1")
    new = registry.add(make_adapter(tmp_path / "three", seed=3), "r/three")
    assert module_ids(database_url)[new.ref] == removed_id + 1


# --- the other writers that resolve first and write later -------------------------------------


def remove_meanwhile(monkeypatch, registry, target: object, attribute: str, ref: str) -> None:
    """Make the next call of ``target.attribute`` do its work, then remove ``ref`` through a
    second registry (another process, as far as the database is concerned): the window
    between a writer resolving a module and writing what refers to it."""
    from registry import Registry

    original = getattr(target, attribute)

    def removing(*args, **kwargs):
        result = original(*args, **kwargs)
        monkeypatch.setattr(target, attribute, original)  # once; the rm below may call it too
        with Registry.open(registry.settings.home, database_url=registry.settings.database_url) as other:
            other.remove(ref)
        return result

    monkeypatch.setattr(target, attribute, removing)


def test_port_whose_source_is_removed_meanwhile_registers_nothing(registry, tmp_path: Path, monkeypatch) -> None:
    import json

    from registry import safetensors_io  # port imports read_header from it when it runs

    source = registry.add(make_adapter(tmp_path / "a", seed=1), "team/a")
    dims = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, model_type="llama",
                architectures=["LlamaForCausalLM"])
    for host, vocab in (("tiny-org/tiny-llama", 64), ("tiny-org/tiny-llama-v2", 80)):
        config = tmp_path / host.split("/")[1] / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps({**dims, "vocab_size": vocab}))
        registry.add_base(host, config_path=config)
    assert registry.check_port("team/a", "tiny-org/tiny-llama-v2").level == "compatible"

    # the port has resolved team/a and read its header; then team/a goes
    remove_meanwhile(monkeypatch, registry, safetensors_io, "read_header", source.ref)
    with pytest.raises(ModuleRemovedError) as caught:
        registry.port("team/a", "tiny-org/tiny-llama-v2", "team/a-v2")
    assert str(caught.value) == "input team/a@1 was removed while porting; nothing was registered"
    assert registry.list() == []


def test_push_whose_module_is_removed_meanwhile_says_so(registry, tmp_path: Path, monkeypatch, hub) -> None:
    import uuid

    from registry import hub as hub_client

    registry.add(make_adapter(tmp_path / "a", seed=1), "team/a")
    repo = f"race-{uuid.uuid4().hex[:8]}/a"
    remove_meanwhile(monkeypatch, registry, hub_client, "upload", "team/a@1")
    with pytest.raises(ModuleRemovedError) as caught:
        registry.push("team/a@1", repo)
    message = str(caught.value)
    assert message.startswith(f"team/a@1 was removed while pushing: {repo}@") and message.endswith(
        "holds it, but the push was not recorded")
    assert registry.list() == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("edit", ["tag", "describe", "alias"])
def test_an_edit_of_a_module_removed_meanwhile_says_so(registry, inputs, monkeypatch, edit: str) -> None:
    """On PostgreSQL an edit resolves its module and writes in one read-committed transaction;
    a rm committed in between used to surface as a foreign-key traceback (tag, alias) or a
    stale-row error (describe). On SQLite the edit holds the write lock from the start: no window."""
    from registry.api.catalog import Catalog

    remove_meanwhile(monkeypatch, registry, Catalog, "_resolve_row", "r/two@1")
    with pytest.raises(ModuleRemovedError) as caught:
        if edit == "tag":
            registry.tag("r/two@1", {"stage": "prod"})
        elif edit == "describe":
            registry.describe("r/two@1", "a description")
        else:
            registry.set_alias("r/two", "prod", 1)
    assert str(caught.value) == "r/two@1 was removed by another process meanwhile"
    assert [m.ref for m in registry.list()] == ["r/one@1"]
