"""The catalog through the `pem` command: add, list, show, export, rm, init, db current, --home,
and every kind of bad input (one `error: ` line, a non-zero exit, nothing changed).

Expected values come from how the adapters were built, from safetensors and hashlib.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from sqlalchemy import select
from sqlalchemy.orm import Session

from cli.main import pem
from helpers import LLAMA_ID, make_ia3, make_lora, tensors, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
DOCUMENTED_FIELDS = {
    "name", "version", "digest", "peft_type", "base_model", "base_revision", "task", "rank", "lora_alpha",
    "target_modules", "dtype", "num_parameters", "size_bytes", "tags", "kind", "created_at",
}


# --- helpers ------------------------------------------------------------------------------------


def alembic_head() -> str:
    """The newest migration, read by Alembic from migrations/."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest[:2] / digest[2:]


def store_files(home: Path) -> dict[str, str]:
    """Every file of the blob store but its tmp folder, with its sha256."""
    root = home / "blobs"
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "tmp"
    }


def tmp_files(home: Path) -> list[Path]:
    tmp = home / "blobs" / "tmp"
    return list(tmp.rglob("*")) if tmp.exists() else []


def snapshot(registry) -> tuple[list[dict], dict[str, str]]:
    return [m.model_dump() for m in registry.list()], store_files(registry.settings.home)


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_clean_error(result, *needles: str) -> str:
    """Exit code != 0, nothing on stdout, one line `error: ...` on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def as_json(result):
    return json.loads(ok(result))


def refs(items: list[dict]) -> list[str]:
    return [f"{m['name']}@{m['version']}" for m in items]


# --- adapters, built once -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("adapters")
    ns = SimpleNamespace(
        llama=make_lora(root / "llama", seed=21),  # r=4, alpha=8, q_proj+v_proj
        llama8=make_lora(root / "llama8", seed=22, r=8, lora_alpha=16),
        ia3=make_ia3(root / "ia3", seed=23),
    )
    from peft import LoHaConfig, get_peft_model

    get_peft_model(tiny_llama(), LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
        root / "loha"
    )
    ns.loha = root / "loha"
    return ns


# --- add ----------------------------------------------------------------------------------------


def test_add_json(run_pem, ad, home):
    before = datetime.now(timezone.utc)
    out = as_json(run_pem("add", ad.llama, "--name", "team/a", "--task", "sentiment",
                          "--tag", "lang=en", "--tag", "tier=gold", "--json"))
    assert DOCUMENTED_FIELDS <= set(out)
    assert out["name"] == "team/a" and out["version"] == 1
    assert out["peft_type"] == "LORA"
    assert out["base_model"] == LLAMA_ID and out["base_revision"] is None
    assert out["task"] == "sentiment"
    assert out["rank"] == 4 and out["lora_alpha"] == 8
    assert out["target_modules"] == ["q_proj", "v_proj"]
    assert out["dtype"] == "F32"
    assert out["num_parameters"] == sum(t.numel() for t in tensors(ad.llama).values()) == 512
    assert out["tags"] == {"lang": "en", "tier": "gold"}
    assert out["kind"] == "trained"
    blob = blob_path(home, out["digest"])
    assert sha256_file(blob) == out["digest"]
    assert out["size_bytes"] == blob.stat().st_size
    created_at = datetime.fromisoformat(out["created_at"])
    assert created_at.tzinfo is not None
    assert before - timedelta(minutes=5) <= created_at <= datetime.now(timezone.utc) + timedelta(minutes=5)


def test_add_human_output_and_readd(run_pem, ad, registry):
    out = ok(run_pem("add", ad.llama, "--name", "team/a"))
    digest = registry.get("team/a").digest
    assert out.startswith("registered team/a@1")
    assert f"sha256:{digest[:12]}" in out
    before = snapshot(registry)
    again = ok(run_pem("add", ad.llama, "--name", "team/a"))
    assert "already registered as team/a@1" in again
    assert snapshot(registry) == before
    assert ok(run_pem("add", ad.llama8, "--name", "team/a")).startswith("registered team/a@2")


def test_add_overrides(run_pem, ad):
    out = as_json(run_pem("add", ad.llama, "--name", "team/o", "--base-model", "org/other",
                          "--base-revision", "r1", "--description", "a test module", "--json"))
    assert out["base_model"] == "org/other"
    assert out["base_revision"] == "r1"
    assert out["description"] == "a test module"


# --- list ---------------------------------------------------------------------------------------


@pytest.fixture
def filled(run_pem, ad):
    ok(run_pem("add", ad.llama, "--name", "team/llama", "--task", "sentiment",
               "--tag", "lang=en", "--tag", "tier=gold"))
    ok(run_pem("add", ad.llama8, "--name", "team/llama", "--task", "sentiment", "--tag", "lang=en"))
    ok(run_pem("add", ad.ia3, "--name", "other/ia3", "--task", "nli", "--tag", "lang=de", "--tag", "tier=gold",
               "--base-model", "org/base"))
    return run_pem


def test_list_json_is_an_array(filled):
    out = as_json(filled("list", "--json"))
    assert isinstance(out, list)
    assert refs(out) == ["other/ia3@1", "team/llama@1", "team/llama@2"]
    for item in out:
        assert DOCUMENTED_FIELDS <= set(item)


def test_list_json_empty(run_pem):
    assert as_json(run_pem("list", "--json")) == []


LIST_CASES = [
    (["--base-model", "org/base"], ["other/ia3@1"]),
    (["--base-model", LLAMA_ID], ["team/llama@1", "team/llama@2"]),
    (["--peft-type", "ia3"], ["other/ia3@1"]),
    (["--peft-type", "Lora"], ["team/llama@1", "team/llama@2"]),
    (["--task", "nli"], ["other/ia3@1"]),
    (["--rank", "8"], ["team/llama@2"]),
    (["--tag", "lang=en"], ["team/llama@1", "team/llama@2"]),
    (["--tag", "lang=en", "--tag", "tier=gold"], ["team/llama@1"]),
    (["--tag", "tier=gold"], ["other/ia3@1", "team/llama@1"]),
    (["--kind", "trained"], ["other/ia3@1", "team/llama@1", "team/llama@2"]),
    (["--kind", "derived"], []),
    (["--latest"], ["other/ia3@1", "team/llama@2"]),
    (["--latest", "--tag", "lang=en"], ["team/llama@2"]),
]


def test_list_filters(filled):
    for args, expected in LIST_CASES:
        assert refs(as_json(filled("list", *args, "--json"))) == expected, args


def test_list_table(filled):
    out = ok(filled("list"))
    for ref in ("other/ia3@1", "team/llama@1", "team/llama@2"):
        assert ref in out
    assert "no modules match" in ok(filled("list", "--task", "nothing"))


# --- show ---------------------------------------------------------------------------------------


def test_show_json(filled, ad, home):
    out = as_json(filled("show", "team/llama@1", "--json"))
    assert DOCUMENTED_FIELDS <= set(out)
    assert {"layers", "config", "source", "unsupported", "provenance"} <= set(out)
    assert (out["name"], out["version"], out["rank"]) == ("team/llama", 1, 4)
    assert out["config"] == json.loads((ad.llama / CONFIG).read_text())
    assert out["source"]["file_sha256"] == sha256_file(ad.llama / WEIGHTS)
    assert out["provenance"] is None
    assert out["layers"]["base_model.model.model.layers.1.self_attn.v_proj"]["params"] == {
        "lora_A": [4, 16], "lora_B": [16, 4]
    }
    latest = as_json(filled("show", "team/llama", "--json"))
    assert latest["version"] == 2 and latest["rank"] == 8
    by_digest = as_json(filled("show", f"sha256:{latest['digest'][:10]}", "--json"))
    assert (by_digest["name"], by_digest["version"]) == ("team/llama", 2)


def test_show_human(filled):
    details = as_json(filled("show", "team/llama@2", "--json"))
    out = ok(filled("show", "team/llama@2"))
    assert "team/llama@2" in out
    assert f"sha256:{details['digest']}" in out
    assert "LORA" in out


def test_show_human_of_a_catalog_only_type(run_pem, ad):
    """LoHa has a rank in its config but no lora_alpha: `pem show` must still print it."""
    ok(run_pem("add", ad.loha, "--name", "team/loha"))
    out = ok(run_pem("show", "team/loha"))
    assert "team/loha@1" in out
    assert "LOHA" in out
    assert "not composable" in out


# --- export and rm ------------------------------------------------------------------------------


def test_export(filled, ad, tmp_path):
    target = tmp_path / "out"
    out = ok(filled("export", "team/llama@1", target))
    assert "team/llama@1" in out
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS]
    assert json.loads((target / CONFIG).read_text()) == json.loads((ad.llama / CONFIG).read_text())
    exported, original = load_file(str(target / WEIGHTS)), tensors(ad.llama)
    assert set(exported) == set(original)
    for name in original:
        assert torch.equal(exported[name], original[name]), name


def test_export_into_a_folder_keeps_its_files_and_refuses_to_overwrite_an_adapter(filled, registry, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    ok(filled("export", "team/llama@1", target))
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    exported = sha256_file(target / "adapter_model.safetensors")
    assert exported == registry.get("team/llama@1").digest
    before = snapshot(registry)
    assert_clean_error(filled("export", "team/llama@2", target), "--force")
    assert sha256_file(target / "adapter_model.safetensors") == exported
    assert snapshot(registry) == before


def test_rm(filled, registry, home):
    digest = registry.get("team/llama@1").digest
    assert ok(filled("rm", "team/llama@1")).strip() == "removed team/llama@1"
    assert refs(as_json(filled("list", "--json"))) == ["other/ia3@1", "team/llama@2"]
    assert not blob_path(home, digest).exists()
    assert_clean_error(filled("show", "team/llama@1"), "team/llama")


def test_rm_refuses_a_module_others_were_derived_from(filled, registry):
    from registry.db.models import Derivation, DerivationInput, Module

    with Session(registry.engine) as session, session.begin():
        rows = {m.ref: m for m in session.scalars(select(Module))}
        source, derived = rows["team/llama@1"], rows["other/ia3@1"]
        session.add(Derivation(module_id=derived.id, expression="team/llama@1", canonical="team/llama@1",
                               method="linear", method_version=1, parameters={}, results={}, environment={},
                               identity="1" * 64))
        session.flush()
        session.add(DerivationInput(module_id=derived.id, position=0, input_id=source.id,
                                    input_digest=source.digest, a=1.0, b=1.0))
    before = snapshot(registry)
    assert_clean_error(filled("rm", "team/llama@1"), "other/ia3@1")
    assert snapshot(registry) == before


# --- init, db current, --home --------------------------------------------------------------------


@pytest.mark.parametrize("fresh_database_url", ["sqlite", "postgresql"], indirect=True)
def test_init_and_db_current_on_a_fresh_home(fresh_database_url, tmp_path, monkeypatch):
    new_home = tmp_path / "new-home"
    monkeypatch.setenv("PEM_HOME", str(new_home))
    monkeypatch.setenv("PEM_DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("PEM_USER", "tester")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(pem, [str(a) for a in args], catch_exceptions=False)

    head = alembic_head()
    before = ok(run("db", "current")).splitlines()
    assert before == ["current: none (run `pem init`)", f"expected: {head}"]
    assert_clean_error(run("list"), "pem init")

    assert "registry ready" in ok(run("init"))
    assert (new_home / "blobs").is_dir()
    assert ok(run("db", "current")).splitlines() == [f"current: {head}", f"expected: {head}"]
    assert as_json(run("list", "--json")) == []
    ok(run("init"))  # again: nothing to do, still fine
    assert "up to date" in ok(run("db", "upgrade"))
    assert ok(run("db", "current")).splitlines()[0] == f"current: {head}"


def test_home_option(ad, tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "h", tmp_path / "elsewhere"
    monkeypatch.delenv("PEM_DATABASE_URL", raising=False)
    monkeypatch.delenv("PEM_STORE", raising=False)
    monkeypatch.setenv("PEM_HOME", str(elsewhere))  # --home wins over the environment
    monkeypatch.setenv("PEM_USER", "tester")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(pem, [str(a) for a in args], catch_exceptions=False)

    ok(run("init", "--home", home))
    assert (home / "registry.db").is_file()
    added = as_json(run("add", ad.ia3, "--name", "team/x", "--json", "--home", home))
    assert blob_path(home, added["digest"]).is_file()
    assert refs(as_json(run("list", "--json", "--home", home))) == ["team/x@1"]
    assert as_json(run("show", "team/x", "--json", "--home", home))["digest"] == added["digest"]
    assert ok(run("db", "current", "--home", home)).splitlines()[0] == f"current: {alembic_head()}"
    ok(run("export", "team/x", tmp_path / "exported", "--home", home))
    assert (tmp_path / "exported" / WEIGHTS).is_file()
    assert_clean_error(run("list"), "pem init")  # PEM_HOME (elsewhere) has no registry
    ok(run("rm", "team/x@1", "--home", home))
    assert as_json(run("list", "--json", "--home", home)) == []
    assert not blob_path(home, added["digest"]).exists()


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture
def seeded(run_pem, registry, ad, home):
    """team/base and team/copy share one blob; other/ia3 has its own."""
    ok(run_pem("add", ad.llama, "--name", "team/base"))
    ok(run_pem("add", ad.llama, "--name", "team/copy"))
    ok(run_pem("add", ad.ia3, "--name", "other/ia3"))
    state = snapshot(registry)
    assert len(state[0]) == 3 and len(state[1]) == 2
    return state


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 100])


def _garbage(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(b"\x93\x00garbage\xff\xfe" * 64)


def _garbage_json_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    garbage = (b"{\xffnot json at all " * header_len)[:header_len]  # the right length, not JSON
    (folder / WEIGHTS).write_bytes(data[:8] + garbage + data[8 + header_len:])


def _offsets_outside(folder: Path) -> None:
    a = torch.ones(4, 16).numpy().tobytes()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 256]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [16, 4], "data_offsets": [256, 512]},
    }
    raw = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + a)  # only the first tensor's bytes


def _offsets_far_outside(folder: Path) -> None:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    header = {
        f"{prefix}.lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [10**9, 10**9 + 256]},
        f"{prefix}.lora_B.weight": {"dtype": "F32", "shape": [16, 4], "data_offsets": [0, 256]},
    }
    raw = json.dumps(header).encode()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + torch.ones(16, 4).numpy().tobytes())


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


BAD_FOLDERS = {
    "missing-config": (lambda f: (f / CONFIG).unlink(), [CONFIG]),
    "malformed-json": (lambda f: (f / CONFIG).write_text('{"peft_type": "LORA", "r": '), ["json"]),
    "config-without-peft-type": (lambda f: _edit_config(f, lambda c: c.pop("peft_type")), ["peft_type"]),
    "config-not-an-object": (lambda f: (f / CONFIG).write_text('["LORA"]'), ["peft_type"]),
    "no-weights": (lambda f: (f / WEIGHTS).unlink(), [WEIGHTS]),
    "truncated-weights": (_truncate, [WEIGHTS]),
    "garbage-weights": (_garbage, [WEIGHTS]),
    "garbage-json-header": (_garbage_json_header, [WEIGHTS]),
    "offsets-outside-the-file": (_offsets_outside, [WEIGHTS]),
    "offsets-far-outside-the-file": (_offsets_far_outside, [WEIGHTS]),
    "pickle-only": (_pickle_only, ["pickle", "safetensors"]),
    "rank-mismatch": (lambda f: _edit_config(f, lambda c: c.update(r=8)), ["rank"]),
    "no-base-model": (lambda f: _edit_config(f, lambda c: c.update(base_model_name_or_path=None)), ["base-model"]),
}


def test_add_bad_folder(seeded, run_pem, registry, ad, home, tmp_path):
    for case, (spoil, needles) in sorted(BAD_FOLDERS.items()):
        folder = tmp_path / case
        shutil.copytree(ad.llama, folder)  # rank 4
        spoil(folder)
        try:
            line = assert_clean_error(run_pem("add", folder, "--name", "team/new"), *needles)
            # with --json, the same error as a JSON object on stdout, nothing on stderr
            result = run_pem("add", folder, "--name", "team/new", "--json")
            assert result.exit_code == 1 and result.stderr == "", result.output
            error = json.loads(result.stdout)["error"]
            assert error["message"] == line.removeprefix("error: ")
            assert error["type"] in {"InvalidAdapterError", "UnsafeFormatError"}, error
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {exc}") from None
        assert snapshot(registry) == seeded, case
        assert tmp_files(home) == [], case
    # not a folder at all
    assert_clean_error(run_pem("add", tmp_path / "nowhere", "--name", "team/new"), "folder")
    assert_clean_error(run_pem("add", ad.llama / WEIGHTS, "--name", "team/new"), "folder")
    assert snapshot(registry) == seeded


INVALID_NAMES = ["noslash", "a/b@2", "a//b", "a/b/c", "-a/b", "a/b-", "a..b/c", "a/" + "x" * 97]


def test_add_invalid_name(seeded, run_pem, registry, ad, home):
    for name in INVALID_NAMES:
        assert_clean_error(run_pem("add", ad.llama8, "--name", name), "name")
        assert snapshot(registry) == seeded, name
        assert tmp_files(home) == [], name


def test_invalid_tag(seeded, run_pem, registry, ad, home):
    for tag in ["novalue", "=v", "bad key=v"]:
        assert_clean_error(run_pem("add", ad.llama8, "--name", "team/new", "--tag", tag), "tag")
        assert snapshot(registry) == seeded, tag
        assert tmp_files(home) == [], tag
        assert_clean_error(run_pem("list", "--tag", tag), "tag")


def test_add_overlong_value_is_registered_whole_or_refused_cleanly(seeded, run_pem, registry, ad, home):
    """task (128), tag value (512), base model (255): stored whole, or refused with one error line
    and nothing left behind (no orphan blob); never a database traceback."""
    for option, value in (("--task", "t" * 200), ("--tag", "note=" + "v" * 600), ("--base-model", "org/" + "m" * 300)):
        name = "team/long" + option
        before = snapshot(registry)
        result = run_pem("add", ad.llama8, "--name", name, option, value)
        if result.exit_code == 0:
            details = registry.get(name)
            stored = {"--task": details.task, "--tag": f"note={details.tags.get('note')}",
                      "--base-model": details.base_model}
            assert stored[option] == value
        else:
            assert_clean_error(result)
            assert snapshot(registry) == before, option
            assert tmp_files(home) == [], option


BAD_REFERENCES = ["team/nothing", "team/base@7", "team/bsae", "a//b", "noslash", "sha256:abc", "team/base@0"]


def test_bad_references(seeded, run_pem, registry, tmp_path):
    digests = {m["digest"] for m in seeded[0]}
    unknown_digest = next(p for p in ("00000000", "ffffffff") if not any(d.startswith(p) for d in digests))
    for command in ("show", "rm", "export"):
        for ref in BAD_REFERENCES + [f"sha256:{unknown_digest}"]:
            args = [command, ref] + ([tmp_path / "out"] if command == "export" else [])
            line = assert_clean_error(run_pem(*args))
            if ref == "team/bsae":
                assert "did you mean team/base" in line
            if ref == "team/base@7":
                assert "versions 1" in line
            assert snapshot(registry) == seeded, (command, ref)
            assert not (tmp_path / "out").exists(), (command, ref)


def test_ambiguous_digest_reference(seeded, run_pem, registry, tmp_path):
    digest = registry.get("team/base").digest
    for command in ("show", "rm", "export"):
        args = [command, f"sha256:{digest[:8]}"] + ([tmp_path / "out"] if command == "export" else [])
        line = assert_clean_error(run_pem(*args))
        assert "team/base@1" in line and "team/copy@1" in line, command
        assert snapshot(registry) == seeded, command
        assert not (tmp_path / "out").exists()


def test_commands_on_a_home_without_registry(ad, tmp_path, monkeypatch):
    empty = tmp_path / "empty-home"
    empty.mkdir()
    monkeypatch.setenv("PEM_HOME", str(empty))
    monkeypatch.delenv("PEM_DATABASE_URL", raising=False)
    monkeypatch.delenv("PEM_STORE", raising=False)
    out = tmp_path / "out"
    for args in (["list"], ["show", "team/x"], ["rm", "team/x"], ["export", "team/x", out],
                 ["add", ad.ia3, "--name", "team/x"]):
        result = CliRunner().invoke(pem, [str(a) for a in args], catch_exceptions=False)
        assert_clean_error(result, "pem init")
        assert not out.exists()
        assert not (empty / "blobs").exists()
    result = CliRunner().invoke(pem, ["list", "--json"], catch_exceptions=False)
    assert result.exit_code == 1 and result.stderr == ""
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "RegistryNotInitializedError" and "pem init" in error["message"]


@pytest.mark.parametrize("fresh_database_url", ["postgresql"], indirect=True)
def test_command_on_an_empty_postgresql_database(fresh_database_url, tmp_path, monkeypatch):
    monkeypatch.setenv("PEM_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PEM_DATABASE_URL", fresh_database_url)
    assert_clean_error(CliRunner().invoke(pem, ["list"], catch_exceptions=False), "pem init")
