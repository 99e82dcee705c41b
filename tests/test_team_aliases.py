"""Aliases and metadata edits (issue 11), on SQLite and PostgreSQL.

* ``pem alias set NS/NAME ALIAS N`` / ``pem alias rm``: ``NS/NAME@ALIAS`` is accepted wherever
  a reference is (get/show, export, rm, expressions); a version an alias points at cannot be
  removed; list and show display the aliases; every move is logged (from, to, when, by whom)
  and ``pem alias log`` shows the moves in order; setting an alias where it already points
  logs nothing; invalid and unknown aliases are one-line errors.
* Concurrent moves: N ``pem alias set`` processes at once, each to its own version; the log
  is one consistent chain (no lost move) and the alias ends where the last event says.
* Versions are immutable: ``pem tag`` / ``pem describe`` edit metadata only, and every edit is
  recorded (``pem history``); digest, config and provenance never change.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from independent import make_numpy_lora as make_adapter

from registry import Registry
from registry.errors import InvalidNameError, ModuleInUseError, NotFoundError, PemError

ROOT = Path(__file__).resolve().parents[1]
CONCURRENT = 6  # processes moving one alias at once
CREATORS = 3  # processes creating one alias at once


# --- helpers ------------------------------------------------------------------------------------


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.stdout


def as_json(result):
    return json.loads(ok(result))


def assert_clean_error(result, *needles: str) -> str:
    """Exit code 1, nothing on stdout, one line ``error: ...`` on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def moves(registry, name: str = "team/x") -> list[tuple]:
    return [(m.alias, m.from_version, m.to_version, m.by) for m in registry.alias_log(name)]


def changes(registry, ref: str) -> list[tuple]:
    return [(c.field, c.old, c.new, c.by) for c in registry.history(ref)]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- adapters, built once -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """LoRA adapters with one config (composable with each other), distinct tensors."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / f"lora{seed}", seed=seed) for seed in range(CONCURRENT + 1)]


@pytest.fixture
def x3(registry, adapters) -> SimpleNamespace:
    """team/x@1..3, registered by the ``registry`` fixture's user (tester)."""
    infos = [registry.add(adapters[i], "team/x") for i in range(3)]
    assert [i.ref for i in infos] == ["team/x@1", "team/x@2", "team/x@3"]
    return SimpleNamespace(infos=infos, registry=registry)


def open_as(home: Path, database_url: str, user: str | None) -> Registry:
    return Registry.open(home, database_url=database_url, user=user)


# --- setting, resolving, removing ---------------------------------------------------------------


def test_alias_set_and_resolve_through_cli_and_api(run_pem, x3):
    registry = x3.registry
    assert ok(run_pem("alias", "set", "team/x", "prod", "2")).strip() == "team/x@prod -> team/x@2"
    info = as_json(run_pem("alias", "set", "team/x", "staging", "3", "--json"))
    assert info == {"alias": "team/x@staging", "ref": "team/x@3", "version": 3}

    got = registry.get("team/x@prod")
    assert (got.ref, got.version, got.digest) == ("team/x@2", 2, x3.infos[1].digest)
    assert got.aliases == ["prod"]
    assert registry.resolve("team/x@staging").ref == "team/x@3"
    # An alias does not change what the bare name means: the latest version.
    assert registry.resolve("team/x").ref == "team/x@3"

    shown = as_json(run_pem("show", "team/x@prod", "--json"))
    assert (shown["ref"], shown["version"], shown["aliases"]) == ("team/x@2", 2, ["prod"])
    table = ok(run_pem("show", "team/x@staging"))
    assert "team/x@3" in table
    assert any(line.split()[:2] == ["aliases", "staging"] for line in table.splitlines()), table

    # The API result of set_alias.
    moved = registry.set_alias("team/x", "prod", 1)
    assert (moved.alias, moved.ref, moved.version) == ("team/x@prod", "team/x@1", 1)
    assert registry.get("team/x@prod").version == 1
    # Aliases belong to one name.
    with pytest.raises(NotFoundError):
        registry.get("team/y@prod")


def test_export_by_alias(run_pem, x3, tmp_path):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 2)
    target = tmp_path / "exported"
    assert ok(run_pem("export", "team/x@prod", target)).strip() == f"exported team/x@2 to {target}"
    assert sha256_file(target / "adapter_model.safetensors") == x3.infos[1].digest
    assert json.loads((target / "adapter_config.json").read_text()) == registry.get("team/x@2").config

    api_target = registry.export("team/x@prod", tmp_path / "api")
    assert sha256_file(api_target / "adapter_model.safetensors") == x3.infos[1].digest


def test_rm_is_refused_while_an_alias_points_at_the_version(run_pem, x3):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 2)
    registry.set_alias("team/x", "canary", 2)
    for ref in ("team/x@2", "team/x@prod"):
        with pytest.raises(ModuleInUseError) as caught:
            registry.remove(ref)
        message = str(caught.value)
        assert "team/x@2" in message and "canary" in message and "prod" in message
        assert "pem alias set" in message and "pem alias rm" in message
    line = assert_clean_error(run_pem("rm", "team/x@prod"), "cannot remove team/x@2", "alias")
    assert "pem alias set" in line and "pem alias rm" in line
    assert registry.get("team/x@2").aliases == ["canary", "prod"]

    # Move one away and remove the other: now it can go.
    ok(run_pem("alias", "set", "team/x", "prod", "3"))
    assert_clean_error(run_pem("rm", "team/x@2"), "canary")
    assert ok(run_pem("alias", "rm", "team/x", "canary")).strip() == "removed team/x@canary (was team/x@2)"
    assert ok(run_pem("rm", "team/x@2")).strip() == "removed team/x@2"
    assert [m.ref for m in registry.list()] == ["team/x@1", "team/x@3"]
    # The version an alias points at after the removal is still protected.
    with pytest.raises(ModuleInUseError):
        registry.remove("team/x@prod")
    assert registry.get("team/x@prod").ref == "team/x@3"


def test_compose_records_the_version_an_alias_resolved_to(x3):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 2)
    expression = "team/x@prod + 0.5 * team/x@3"

    report = registry.check(expression)
    assert report.composable, report.violations
    assert report.canonical == "team/x@2 + 0.5*team/x@3"
    assert sorted(t.ref for t in report.terms) == ["team/x@2", "team/x@3"]

    info = registry.compose(expression, "team/mix")
    assert info.created
    provenance = registry.get("team/mix").provenance
    assert provenance is not None
    assert provenance.expression == expression  # as written, alias kept
    assert "@prod" in provenance.expression
    assert provenance.canonical == "team/x@2 + 0.5*team/x@3"  # resolved
    assert "prod" not in provenance.canonical
    assert sorted(i.ref for i in provenance.inputs) == ["team/x@2", "team/x@3"]
    assert {i.digest for i in provenance.inputs} == {x3.infos[1].digest, x3.infos[2].digest}

    # The same derivation written with versions is the same module.
    again = registry.compose("team/x@2 + 0.5 * team/x@3", "team/mix")
    assert (again.created, again.ref, again.digest) == (False, info.ref, info.digest)

    # Moving the alias later does not rewrite the recorded provenance.
    registry.set_alias("team/x", "prod", 1)
    after = registry.get("team/mix").provenance
    assert after.canonical == "team/x@2 + 0.5*team/x@3"
    assert sorted(i.ref for i in after.inputs) == ["team/x@2", "team/x@3"]
    # ...and the expression now means something else: a different derivation.
    assert registry.check(expression).canonical == "team/x@1 + 0.5*team/x@3"


def test_list_and_show_display_aliases(run_pem, x3):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 2)
    registry.set_alias("team/x", "staging", 2)
    registry.set_alias("team/x", "canary", 3)
    expected = {"team/x@1": [], "team/x@2": ["prod", "staging"], "team/x@3": ["canary"]}

    assert {m.ref: m.aliases for m in registry.list()} == expected
    assert {m.ref: m.aliases for m in registry.list(limit=2)} == {k: expected[k] for k in ("team/x@1", "team/x@2")}
    assert {m.ref: m.aliases for m in registry.list(latest=True)} == {"team/x@3": ["canary"]}
    assert registry.resolve("team/x@staging").aliases == ["prod", "staging"]
    assert registry.get("team/x@1").aliases == []

    listed = as_json(run_pem("list", "--json"))
    assert {f"{m['name']}@{m['version']}": m["aliases"] for m in listed} == expected

    table = ok(run_pem("list"))
    assert "ALIASES" in table.splitlines()[0]
    rows = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
    assert "prod staging" in rows["team/x@2"]
    assert "canary" in rows["team/x@3"]
    assert not any(a in rows["team/x@1"] for a in ("prod", "staging", "canary"))

    assert as_json(run_pem("show", "team/x@2", "--json"))["aliases"] == ["prod", "staging"]


# --- the log ------------------------------------------------------------------------------------


def test_every_move_is_logged_with_who_and_when(run_pem, x3, home, database_url, monkeypatch):
    registry = x3.registry
    start = datetime.now(timezone.utc)
    with open_as(home, database_url, "alice") as alice:
        alice.set_alias("team/x", "prod", 1)  # created
    monkeypatch.setenv("PEM_USER", "bob")
    ok(run_pem("alias", "set", "team/x", "prod", "3"))  # moved, by PEM_USER
    ok(run_pem("alias", "set", "team/x", "staging", "2"))  # another alias, interleaved
    with open_as(home, database_url, "alice") as alice:
        assert alice.set_alias("team/x", "prod", 3).version == 3  # already there: not a move
    monkeypatch.setenv("PEM_USER", "carol")
    ok(run_pem("alias", "rm", "team/x", "prod"))  # removed
    registry.set_alias("team/x", "prod", 2)  # created again, by the fixture's user
    end = datetime.now(timezone.utc)

    assert moves(registry) == [
        ("prod", None, 1, "alice"),
        ("prod", 1, 3, "bob"),
        ("staging", None, 2, "bob"),
        ("prod", 3, None, "carol"),
        ("prod", None, 2, "tester"),
    ]
    log = registry.alias_log("team/x")
    times = [m.at for m in log]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert start.replace(microsecond=0) <= times[0] and times[-1] <= end

    printed = ok(run_pem("alias", "log", "team/x")).splitlines()
    assert len(printed) == 5
    assert [line.split()[1:] for line in printed] == [
        ["alice", "prod:", "(new)", "->", "@1"],
        ["bob", "prod:", "@1", "->", "@3"],
        ["bob", "staging:", "(new)", "->", "@2"],
        ["carol", "prod:", "@3", "->", "(removed)"],
        ["tester", "prod:", "(new)", "->", "@2"],
    ]
    dumped = as_json(run_pem("alias", "log", "team/x", "--json"))
    assert [(d["alias"], d["from_version"], d["to_version"], d["by"]) for d in dumped] == moves(registry)
    assert all(set(d) == {"alias", "from_version", "to_version", "at", "by"} for d in dumped)

    assert ok(run_pem("alias", "log", "team/other")).strip() == "team/other has no alias history"


def test_the_os_user_is_recorded_without_pem_user(x3, home, database_url, monkeypatch):
    monkeypatch.delenv("PEM_USER", raising=False)
    with open_as(home, database_url, None) as anonymous:
        anonymous.set_alias("team/x", "prod", 1)
    assert moves(x3.registry) == [("prod", None, 1, getpass.getuser())]


def test_setting_an_alias_where_it_points_logs_nothing(run_pem, x3):
    registry = x3.registry
    ok(run_pem("alias", "set", "team/x", "prod", "2"))
    for _ in range(3):
        assert ok(run_pem("alias", "set", "team/x", "prod", "2")).strip() == "team/x@prod -> team/x@2"
        assert registry.set_alias("team/x", "prod", 2).version == 2
    assert moves(registry) == [("prod", None, 2, "tester")]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["2", "-x", "a b", "", "a..b", "x" * 65])
def test_invalid_aliases_are_one_line_errors(run_pem, x3, bad):
    registry = x3.registry
    with pytest.raises(InvalidNameError, match="invalid alias"):
        registry.set_alias("team/x", bad, 1)
    # `--` so that "-x" reaches the command as the alias, not as an option.
    assert_clean_error(run_pem("alias", "set", "team/x", "--", bad, "1"), "invalid alias")
    assert_clean_error(run_pem("alias", "rm", "team/x", "--", bad), "invalid alias")
    assert registry.alias_log("team/x") == []
    assert all(m.aliases == [] for m in registry.list())


def test_an_alias_reference_that_is_not_an_alias(run_pem, x3):
    registry = x3.registry
    # None yet: the message says how to make one.
    with pytest.raises(NotFoundError) as caught:
        registry.get("team/x@prod")
    assert "pem alias set" in str(caught.value)
    registry.set_alias("team/x", "prod", 1)
    registry.set_alias("team/x", "staging", 2)
    for call in (lambda: registry.get("team/x@nope"), lambda: registry.resolve("team/x@nope"),
                 lambda: registry.check("team/x@nope + team/x@1")):
        with pytest.raises(NotFoundError) as caught:
            call()
        assert "nope" in str(caught.value) and "prod" in str(caught.value) and "staging" in str(caught.value)
    line = assert_clean_error(run_pem("show", "team/x@nope"), "nope")
    assert "prod" in line and "staging" in line
    assert_clean_error(run_pem("export", "team/x@nope", "out"), "nope", "prod", "staging")
    assert_clean_error(run_pem("rm", "team/x@nope"), "nope", "prod", "staging")
    assert_clean_error(run_pem("alias", "rm", "team/x", "nope"), "nope")
    with pytest.raises(NotFoundError):
        registry.remove_alias("team/x", "nope")
    # An alias to a version that does not exist is refused, and nothing is logged.
    assert_clean_error(run_pem("alias", "set", "team/x", "prod", "9"), "no version 9", "1, 2, 3")
    assert_clean_error(run_pem("alias", "set", "team/nothing", "prod", "1"), "team/nothing")
    assert registry.get("team/x@prod").version == 1
    assert moves(registry) == [("prod", None, 1, "tester"), ("staging", None, 2, "tester")]


def test_longest_alias_round_trips(x3):
    registry = x3.registry
    longest = "a" + "b" * 63  # the limit: 64 characters
    assert registry.set_alias("team/x", longest, 2).alias == f"team/x@{longest}"
    assert registry.get(f"team/x@{longest}").aliases == [longest]
    assert moves(registry) == [(longest, None, 2, "tester")]


# --- concurrent moves ---------------------------------------------------------------------------


def _set_alias_at_once(pem_env: dict[str, str], versions: list[int]) -> None:
    """Start one `pem alias set team/x prod V` process per version, all at once; all must succeed."""
    procs = []
    for version in versions:
        env = {**os.environ, **pem_env, "PEM_USER": f"worker{version}"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cli.main", "alias", "set", "team/x", "prod", str(version)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for version, proc in zip(versions, procs):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (version, out, err)
        assert out.strip() == f"team/x@prod -> team/x@{version}", (version, out, err)
        assert "Traceback" not in err, err


def _assert_consistent_chain(registry, log: list, versions: list[int]) -> None:
    for previous, event in zip(log, log[1:]):
        assert event.from_version == previous.to_version, [(m.from_version, m.to_version, m.by) for m in log]
    assert sorted(m.to_version for m in log[-len(versions):]) == sorted(versions)
    assert all(m.by == f"worker{m.to_version}" for m in log[-len(versions):])
    assert registry.get("team/x@prod").version == log[-1].to_version
    assert {m.ref: m.aliases for m in registry.list() if m.aliases} == {f"team/x@{log[-1].to_version}": ["prod"]}


def test_concurrent_moves_are_never_lost(registry, adapters, pem_env):
    for folder in adapters[: CONCURRENT + 1]:
        registry.add(folder, "team/x")
    registry.set_alias("team/x", "prod", 1)  # a version none of the processes targets
    versions = list(range(2, CONCURRENT + 2))

    _set_alias_at_once(pem_env, versions)

    log = registry.alias_log("team/x")
    assert len(log) == 1 + CONCURRENT, [(m.from_version, m.to_version, m.by) for m in log]
    assert (log[0].from_version, log[0].to_version, log[0].by) == (None, 1, "tester")
    _assert_consistent_chain(registry, log, versions)


def test_concurrent_creations_of_one_alias_are_never_lost(registry, adapters, pem_env):
    for folder in adapters[:CREATORS]:
        registry.add(folder, "team/x")
    versions = list(range(1, CREATORS + 1))  # no alias yet: every process may be the creator

    _set_alias_at_once(pem_env, versions)

    log = registry.alias_log("team/x")
    assert len(log) == CREATORS, [(m.from_version, m.to_version, m.by) for m in log]
    assert log[0].from_version is None  # exactly one creation, first
    assert all(m.from_version is not None for m in log[1:])
    _assert_consistent_chain(registry, log, versions)


# --- immutable versions, metadata edits ----------------------------------------------------------


def test_tag_and_describe_are_recorded_in_order(run_pem, x3, home, database_url):
    registry = x3.registry
    start = datetime.now(timezone.utc)
    assert ok(run_pem("tag", "team/x@1", "stage=dev", "team=ml")).strip() == "team/x@1: stage=dev team=ml"
    ok(run_pem("tag", "team/x@1", "stage=dev"))  # same value: not an edit
    info = as_json(run_pem("tag", "team/x@1", "stage=prod", "--rm", "team", "--json"))
    assert info["tags"] == {"stage": "prod"}
    assert ok(run_pem("describe", "team/x@1", "the first one")).strip() == "team/x@1: the first one"
    ok(run_pem("describe", "team/x@1", "the first one"))  # unchanged: not an edit
    with open_as(home, database_url, "alice") as alice:
        alice.describe("team/x@1", "reviewed")
        alice.tag("team/x@1", {"reviewed": "yes"})
    assert ok(run_pem("describe", "team/x@1", "--clear")).strip() == "team/x@1: (no description)"
    end = datetime.now(timezone.utc)

    assert changes(registry, "team/x@1") == [
        ("tag:stage", None, "dev", "tester"),
        ("tag:team", None, "ml", "tester"),
        ("tag:team", "ml", None, "tester"),
        ("tag:stage", "dev", "prod", "tester"),
        ("description", None, "the first one", "tester"),
        ("description", "the first one", "reviewed", "alice"),
        ("tag:reviewed", None, "yes", "alice"),
        ("description", "reviewed", None, "tester"),
    ]
    history = registry.history("team/x@1")
    times = [c.at for c in history]
    assert times == sorted(times) and start.replace(microsecond=0) <= times[0] and times[-1] <= end

    current = registry.get("team/x@1")
    assert current.tags == {"reviewed": "yes", "stage": "prod"}
    assert current.description is None
    assert [m.ref for m in registry.list(tags={"stage": "prod"})] == ["team/x@1"]
    # Other versions are untouched.
    assert registry.history("team/x@2") == [] and registry.get("team/x@2").tags == {}

    dumped = as_json(run_pem("history", "team/x@1", "--json"))
    assert [(d["field"], d["old"], d["new"], d["by"]) for d in dumped] == changes(registry, "team/x@1")
    assert all(set(d) == {"field", "old", "new", "at", "by"} for d in dumped)
    printed = ok(run_pem("history", "team/x@1")).splitlines()
    assert len(printed) == len(history) and "tag:stage: None -> 'dev'" in printed[0]
    assert ok(run_pem("history", "team/x@3")).strip() == "team/x@3 has no metadata edits"


def test_metadata_edits_through_an_alias(run_pem, x3):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 2)
    ok(run_pem("tag", "team/x@prod", "deployed=yes"))
    ok(run_pem("describe", "team/x@prod", "serving"))
    assert registry.get("team/x@2").tags == {"deployed": "yes"}
    assert changes(registry, "team/x@prod") == changes(registry, "team/x@2") == [
        ("tag:deployed", None, "yes", "tester"),
        ("description", None, "serving", "tester"),
    ]


def test_metadata_edits_never_change_the_version(run_pem, x3, home):
    registry = x3.registry
    registry.compose("team/x@1 - 0.5 * team/x@2", "team/mix", description="made")
    before = registry.get("team/mix")
    blob = home / "blobs" / "sha256" / before.digest[:2] / before.digest[2:]
    blob_sha = sha256_file(blob)

    ok(run_pem("tag", "team/mix", "stage=dev", "owner=ml"))
    ok(run_pem("tag", "team/mix", "stage=prod", "--rm", "owner"))
    ok(run_pem("describe", "team/mix", "edited"))
    ok(run_pem("describe", "team/mix", "--clear"))

    after = registry.get("team/mix")
    assert (after.ref, after.version, after.digest, after.kind) == (before.ref, before.version, before.digest, before.kind)
    assert after.config == before.config
    assert after.layers == before.layers
    assert after.created_at == before.created_at
    assert after.provenance.model_dump() == before.provenance.model_dump()
    assert sha256_file(blob) == blob_sha == before.digest
    assert [m.ref for m in registry.list()] == ["team/mix@1", "team/x@1", "team/x@2", "team/x@3"]
    assert (after.tags, after.description) == ({"stage": "prod"}, None)
    assert [c.field for c in registry.history("team/mix")] == [
        "tag:owner", "tag:stage", "tag:owner", "tag:stage", "description", "description",
    ]
    assert registry.history("team/mix")[4].old == "made"
    assert registry.verify("team/mix").ok


def test_metadata_edit_errors(run_pem, x3):
    registry = x3.registry
    registry.tag("team/x@1", {"stage": "dev"})
    # Removing a tag the version does not have is an error, and the whole call is refused.
    with pytest.raises(PemError, match="nope"):
        registry.tag("team/x@1", {"other": "1"}, ["nope"])
    assert_clean_error(run_pem("tag", "team/x@1", "other=1", "--rm", "nope"), "team/x@1", "nope")
    assert registry.get("team/x@1").tags == {"stage": "dev"}
    assert changes(registry, "team/x@1") == [("tag:stage", None, "dev", "tester")]

    assert_clean_error(run_pem("tag", "team/x@1", "bad key=1"), "invalid tag")
    assert_clean_error(run_pem("tag", "team/x@9", "a=1"), "no version 9")
    assert_clean_error(run_pem("describe", "team/nothing", "text"), "team/nothing")
    # TEXT or --clear, not both, not neither.
    assert run_pem("describe", "team/x@1").exit_code == 2
    assert run_pem("describe", "team/x@1", "text", "--clear").exit_code == 2
    assert changes(registry, "team/x@1") == [("tag:stage", None, "dev", "tester")]


# --- known bugs (kept last, so that `-x` runs everything else first) ----------------------------


def test_removing_an_unknown_alias_lists_the_existing_ones(run_pem, x3):
    registry = x3.registry
    registry.set_alias("team/x", "prod", 1)
    registry.set_alias("team/x", "staging", 2)
    with pytest.raises(NotFoundError) as caught:
        registry.remove_alias("team/x", "nope")
    message = str(caught.value)
    assert "nope" in message and "prod" in message and "staging" in message, message
    assert_clean_error(run_pem("alias", "rm", "team/x", "nope"), "nope", "prod", "staging")
    assert len(registry.alias_log("team/x")) == 2
