"""What a user expects of names, references, versions and removal (issue 14): a full digest
shared by several modules, `rm` of one version and its dry run, new versions keeping their
name's task and tags, `list --latest` after the filters, names unique ignoring case and
never a number, and suggestions ranked by similarity. On SQLite and PostgreSQL.

Expected values come from how the adapters were built (hashlib over the exported files, the
blob's size on disk) and from the names written here, never from the registry's own answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import make_ia3, make_lora
from registry.errors import AmbiguousReferenceError, InvalidNameError, NameConflictError, UnknownModuleError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORKTREE = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("rules-adapters")
    return SimpleNamespace(
        a=make_lora(root / "a", seed=51), b=make_lora(root / "b", seed=52), c=make_lora(root / "c", seed=53),
        ia3=make_ia3(root / "ia3", seed=54),
    )


def blob_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refs(modules) -> list[str]:
    return [m.ref for m in modules]


def pem(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=WORKTREE, env={**os.environ, **env},
                          capture_output=True, text=True)


def legacy_module(registry, source_ref: str, namespace: str, name: str) -> None:
    """A copy of a module's row under a name the rules refuse today, as a registry written
    before them holds (its counter too)."""
    from registry.db.models import Module, NameCounter

    ns, rest = source_ref.split("@")[0].split("/")
    with Session(registry.engine) as session, session.begin():
        row = session.scalars(select(Module).where(Module.namespace == ns, Module.name == rest)).first()
        columns = {c.key: getattr(row, c.key) for c in Module.__table__.columns if c.key != "id"}
        session.add(Module(**{**columns, "namespace": namespace, "name": name, "version": 1}))
        session.add(NameCounter(namespace=namespace, name=name, last_version=1))


# --- item 3: a full digest shared by several modules --------------------------------------------


def test_full_digest_shared_by_several_modules_lists_them_all_and_says_to_pick_by_name(registry, ad, tmp_path):
    registry.add(ad.a, "team/a")
    registry.add(ad.a, "team/a-copy")  # the same tensors and config under another name
    registry.add(ad.a, "team/a-rebased", base_model="other-org/other-base")  # the same tensors, another config
    registry.add(ad.b, "team/b")
    registry.compose("0.5*team/a + 0.5*team/b", "team/mix")
    registry.compose("0.5*team/a + 0.5*team/b", "team/mix-again")  # the same derivation under another name
    registry.export("team/a", tmp_path / "a")
    digest = file_digest(tmp_path / "a" / "adapter_model.safetensors")

    for reference in (f"sha256:{digest}", f"sha256:{digest[:8]}", f"sha256:{digest.upper()}"):
        with pytest.raises(AmbiguousReferenceError) as raised:
            registry.get(reference)
        message = str(raised.value)
        assert "matches 3 modules: team/a@1, team/a-copy@1, team/a-rebased@1;" in message, message
        assert "longer prefix" not in message  # it can never help: they hold one digest
        assert "pick one by NS/NAME@VERSION" in message
        assert "\n" not in message

    mixed = registry.get("team/mix").digest
    with pytest.raises(AmbiguousReferenceError, match=r"matches 2 modules: team/mix@1, team/mix-again@1; .*pick one"):
        registry.get(f"sha256:{mixed}")
    # picking by name works for each
    assert {registry.get(r).digest for r in ("team/a@1", "team/a-copy@1", "team/a-rebased@1")} == {digest}


def test_a_short_prefix_over_different_digests_asks_for_a_longer_one(registry, ad):
    registry.add(ad.a, "team/a")
    digest = registry.get("team/a").digest
    # Another digest with the same first 8 hex digits (a collision made by hand: the row is
    # written directly, with a blob row to satisfy the foreign key).
    from registry.db.models import Blob, Module

    twin = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    with Session(registry.engine) as session, session.begin():
        row = session.scalars(select(Module)).one()
        columns = {c.key: getattr(row, c.key) for c in Module.__table__.columns if c.key != "id"}
        session.add(Blob(digest=twin, size_bytes=1))
        session.flush()
        session.add(Module(**{**columns, "name": "twin", "digest": twin}))

    with pytest.raises(AmbiguousReferenceError) as raised:
        registry.get(f"sha256:{digest[:8]}")
    message = str(raised.value)
    assert f"team/a@1 (sha256:{digest[:12]})" in message and f"team/twin@1 (sha256:{twin[:12]})" in message
    assert "use a longer prefix" in message
    assert registry.get(f"sha256:{digest[:10]}").ref == "team/a@1"
    assert registry.get(f"sha256:{twin}").ref == "team/twin@1"


def test_cli_show_of_a_shared_digest_is_one_line_naming_every_module(registry, ad, run_pem):
    registry.add(ad.ia3, "team/x")
    registry.add(ad.ia3, "lab/x")
    digest = registry.get("team/x").digest
    result = run_pem("show", f"sha256:{digest}")
    assert result.exit_code == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "lab/x@1" in line and "team/x@1" in line and "longer prefix" not in line


# --- rm: one version, and its dry run -----------------------------------------------------------


def test_rm_dry_run_shows_what_would_go_and_the_blob_it_frees(registry, ad, run_pem, home):
    registry.add(ad.a, "team/a", tags={"stage": "dev"})
    registry.add(ad.a, "team/shared")
    registry.add(ad.b, "team/b")
    before = (refs(registry.list()), blob_files(home))
    b_digest = registry.get("team/b").digest
    b_blob = home / "blobs" / "sha256" / b_digest[:2] / b_digest[2:]

    report = registry.remove("team/b@1", dry_run=True)
    assert (report.ref, report.dry_run, report.blob_freed) == ("team/b@1", True, True)
    assert report.bytes_freed == b_blob.stat().st_size
    shared = registry.remove("team/a@1", dry_run=True)
    assert (shared.blob_freed, shared.bytes_freed, shared.blob_kept_for, shared.tags) == (
        False, 0, ["team/shared@1"], {"stage": "dev"})
    assert (refs(registry.list()), blob_files(home)) == before  # nothing removed

    result = run_pem("rm", "team/b@1", "--dry-run")
    assert result.exit_code == 0, result.output
    size_mb = f"{b_blob.stat().st_size / 1000:.1f} KB"
    assert result.stdout.splitlines() == ["would remove team/b@1", f"would free blob sha256:{b_digest[:12]} ({size_mb})"]
    text = run_pem("rm", "team/a@1", "--dry-run").stdout.splitlines()
    assert text[0] == "would remove team/a@1 (tags stage=dev)"
    assert text[1].endswith("also used by team/shared@1")
    as_json = json.loads(run_pem("rm", "team/b@1", "--dry-run", "--json").stdout)
    assert as_json["blob_freed"] is True and as_json["bytes_freed"] == b_blob.stat().st_size
    assert (refs(registry.list()), blob_files(home)) == before

    # the real thing frees what the dry run said
    assert run_pem("rm", "team/b@1").stdout.strip() == "removed team/b@1"
    assert not b_blob.exists()


def test_rm_refuses_a_bare_name_and_a_dry_run_refuses_what_rm_would(registry, ad, run_pem):
    registry.add(ad.a, "team/a")
    registry.add(ad.b, "team/a")
    registry.compose("team/a@1 + team/a@2", "team/sum", method="exact")
    result = run_pem("rm", "team/a")
    assert result.exit_code == 1 and result.stdout == ""
    assert "team/a names no version" in result.stderr and "versions 1, 2" in result.stderr
    dry = run_pem("rm", "team/a@1", "--dry-run")
    assert dry.exit_code == 1 and "team/sum@1" in dry.stderr and dry.stdout == ""
    assert refs(registry.list()) == ["team/a@1", "team/a@2", "team/sum@1"]
    with pytest.raises(UnknownModuleError, match="did you mean team/a"):
        registry.remove("team/aa")
    # a digest names one version too
    digest = registry.get("team/sum").digest
    assert registry.remove(f"sha256:{digest}", dry_run=True).ref == "team/sum@1"


# --- new versions keep the task and tags of the previous one -------------------------------------


def test_a_new_version_keeps_task_and_tags_unless_given(registry, ad):
    registry.add(ad.a, "team/x", task="sentiment", tags={"domain": "reviews", "lang": "en"}, description="first")
    second = registry.add(ad.b, "team/x")
    assert (second.version, second.task, second.tags) == (2, "sentiment", {"domain": "reviews", "lang": "en"})
    assert second.description is None  # a description is about one version
    third = registry.add(ad.c, "team/x", task="toxicity", tags={"lang": "de"})
    assert (third.task, third.tags) == ("toxicity", {"lang": "de"})  # given: replaced
    # a composed new version keeps them too
    registry.add(ad.a, "team/in", task="t", tags={"k": "v"})
    registry.compose("team/in", "team/derived")
    registry.tag("team/derived", {"owner": "ml"})
    newer = registry.compose("0.5*team/in", "team/derived", new_version=True)
    assert (newer.version, newer.tags) == (2, {"owner": "ml"})
    # the previous versions are untouched
    assert registry.get("team/x@1").tags == {"domain": "reviews", "lang": "en"}
    assert registry.get("team/x@2").task == "sentiment"


def test_list_latest_applies_the_filters_first(registry, ad):
    registry.add(ad.a, "team/x", task="sentiment", tags={"tier": "gold"})
    registry.add(ad.b, "team/x", task="toxicity", tags={"tier": "silver"})
    registry.add(ad.c, "team/y", task="sentiment")
    assert refs(registry.list(task="sentiment", latest=True)) == ["team/x@1", "team/y@1"]
    assert refs(registry.list(tags={"tier": "gold"}, latest=True)) == ["team/x@1"]
    assert refs(registry.list(latest=True)) == ["team/x@2", "team/y@1"]
    assert refs(registry.list(task="toxicity", latest=True)) == ["team/x@2"]


# --- names: unique ignoring case, never a number --------------------------------------------------


def test_a_name_equal_ignoring_case_to_a_registered_one_is_refused(registry, ad, home):
    registry.add(ad.a, "team/toxic")
    files = blob_files(home)
    for spelling in ("team/Toxic", "TEAM/toxic", "Team/TOXIC"):
        with pytest.raises(NameConflictError, match=r"only in case.*register it as team/toxic"):
            registry.add(ad.b, spelling)
    with pytest.raises(NameConflictError):
        registry.compose("team/toxic", "team/TOXIC")
    assert blob_files(home) == files  # refused before any blob is written
    assert registry.add(ad.b, "team/toxic").ref == "team/toxic@2"  # the name itself goes on
    # once every version of it is gone, the other spelling is free
    registry.remove("team/toxic@2")
    registry.remove("team/toxic@1")
    assert registry.add(ad.b, "team/Toxic").ref == "team/Toxic@1"


@pytest.mark.parametrize("name", ["team/2", "1e5/x", "team/nan", "team/inf", "team/Infinity", "team/1.5", "3/team"])
def test_a_name_part_that_reads_as_a_number_is_refused(registry, ad, home, name):
    with pytest.raises(InvalidNameError, match="reads as a number"):
        registry.add(ad.a, name)
    assert registry.list() == [] and blob_files(home) == []


def test_names_that_look_numeric_but_are_not_numbers_are_accepted(registry, ad):
    for name in ("team/v2", "team/2b", "team/nan-filter", "team/e5", "x1/y"):
        assert registry.add(ad.a, name).created


def test_names_registered_before_the_rules_stay_addressable_and_doctor_lists_them(registry, ad, run_pem, pem_env):
    registry.add(ad.a, "team/toxic")
    registry.add(ad.b, "team/base")
    legacy_module(registry, "team/toxic@1", "team", "Toxic")
    legacy_module(registry, "team/base@1", "team", "2")
    assert registry.get("team/Toxic@1").name == "team/Toxic"
    assert registry.get("team/2@1").ref == "team/2@1"
    assert registry.resolve("team/2").ref == "team/2@1"
    # both keep getting versions
    assert registry.add(ad.c, "team/2").ref == "team/2@2"
    assert registry.add(ad.c, "team/Toxic").ref == "team/Toxic@2"

    result = run_pem("doctor", "--json")
    assert result.exit_code == 0, result.output  # a warning, not a failure
    names = next(c for c in json.loads(result.stdout) if c["name"] == "names")
    assert names["status"] == "warn"
    assert "team/2" in names["detail"] and "team/Toxic = team/toxic" in names["detail"]
    table = run_pem("doctor")
    assert any(line.startswith("WARN") and "names" in line for line in table.stdout.splitlines())


def test_concurrent_registrations_of_two_spellings_register_one(registry, ad, database_url, home, monkeypatch):
    """A registers team/Toxic and stops inside its transaction, its row flushed; B then
    registers team/toxic. B must wait for A and then be refused, on both backends."""
    from registry import Registry, faults

    a_inside, b_finished = threading.Event(), threading.Event()
    real_point = faults.point

    def pause_a(name: str) -> None:
        if name == "row-flushed" and threading.current_thread().name == "writer-a":
            a_inside.set()
            b_finished.wait(timeout=3)  # B cannot finish while A holds the name: A goes on after 3 s
        real_point(name)

    monkeypatch.setattr(faults, "point", pause_a)
    outcome: dict[str, object] = {}

    def register(thread: str, name: str, folder: Path) -> None:
        other = Registry.open(home, database_url=database_url, user=thread)
        try:
            outcome[thread] = other.add(folder, name).ref
        except Exception as exc:
            outcome[thread] = exc
        finally:
            other.close()
            if thread == "writer-b":
                b_finished.set()

    a = threading.Thread(target=register, args=("writer-a", "team/Toxic", ad.a), name="writer-a")
    a.start()
    assert a_inside.wait(timeout=60)
    b = threading.Thread(target=register, args=("writer-b", "team/toxic", ad.b), name="writer-b")
    b.start()
    a.join(timeout=120)
    b.join(timeout=120)
    assert outcome["writer-a"] == "team/Toxic@1"
    assert isinstance(outcome["writer-b"], NameConflictError), outcome["writer-b"]
    assert refs(registry.list()) == ["team/Toxic@1"]


# --- did you mean ----------------------------------------------------------------------------------


def test_suggestions_are_ranked_by_similarity(registry, ad):
    for name in ("team/help", "team/yelp-v2", "team/yelps", "team/yelp", "team/amazon"):
        registry.add(ad.ia3, name)
    with pytest.raises(UnknownModuleError) as raised:
        registry.get("team/yelpp")
    # edits away from yelpp: yelp 1 (and the closest in length), yelps 1, help 2, yelp-v2 3
    assert str(raised.value).endswith("did you mean team/yelp, team/yelps, team/help?")
    with pytest.raises(UnknownModuleError, match=r"did you mean team/yelp\b"):
        registry.get("team/YELP")  # case differs: still the obvious suggestion
    with pytest.raises(UnknownModuleError) as raised:
        registry.get("zzz/qqq")
    assert "did you mean" not in str(raised.value)
