"""Errors and exit codes (issue 14, items 4-7, 9, 10, 12): what a user sees when something
is wrong, on the command line.

* Every adapter_config.json field the registry reads is type-checked: a wrong type is one
  `error:` line naming the field (never a traceback, never a value read wrongly).
* Expressions may begin with a minus (`pem check "-team/x"`); real options still parse, and
  an unknown option is still an error.
* `--home` is accepted before the command as well as after it.
* With `--json`, an error is a JSON object `{"error": {"type", "message"}}` on stdout, with
  the same non-zero exit code as without it.
* `gc` refuses a negative or non-finite grace, counts the partial writes it frees, and says
  which younger ones it keeps; `doctor` warns (exit 0) about an unreachable Hub.
* Accurate messages: why a base model's structure is unknown, a bad file in a pulled repo by
  `REPO@COMMIT:FILE`, what a weights path is when it is not a regular file, length limits.

Expected values are written by hand (sizes of files the test writes, coefficients of the
expression as typed), never taken from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from independent import CONFIG, make_numpy_lora
from safetensors.numpy import save_file

from cli.main import pem
from registry.errors import ConfigurationError

WEIGHTS = "adapter_model.safetensors"
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def invoke(*args: object):
    """The CLI in-process; an unexpected exception is captured (a real `pem` would print a
    traceback), so that the assertion can name it."""
    return CliRunner().invoke(pem, [str(a) for a in args])


def one_error_line(result, exit_code: int = 1) -> str:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"pem crashed with {type(result.exception).__name__}: {str(result.exception)[:300]}")
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def json_error(result, exit_code: int = 1) -> dict[str, str]:
    """The JSON error object on stdout; nothing on stderr."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert result.stderr == "", result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"error"} and {"type", "message"} <= set(document["error"]), document
    assert "\n" not in document["error"]["message"]
    return document["error"]


def store_files(home: Path) -> set[str]:
    blobs = home / "blobs"
    return {str(p.relative_to(blobs)) for p in blobs.rglob("*") if p.is_file()} if blobs.exists() else set()


def with_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def make_numpy_ia3(folder: Path, **config: object) -> Path:
    """A small (IA)^3 folder: k_proj and v_proj scale outputs ([16, 1]), down_proj its input."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    layer = "base_model.model.model.layers.0"
    tensors = {
        f"{layer}.self_attn.k_proj.ia3_l": 1 + 0.1 * rng.standard_normal((16, 1)),
        f"{layer}.self_attn.v_proj.ia3_l": 1 + 0.1 * rng.standard_normal((16, 1)),
        f"{layer}.mlp.down_proj.ia3_l": 1 + 0.1 * rng.standard_normal((1, 32)),
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({
        "peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
        "base_model_name_or_path": "tiny-org/tiny-llama", "task_type": "CAUSAL_LM", **config,
    }))
    return folder


# --- item 4: every config field that is read is type-checked ----------------------------------

# (field, value, what the message quotes)
LORA_FIELDS = [
    ("alpha_pattern", [1], "got [1]"),
    ("alpha_pattern", {"q_proj": "8"}, "gives '8' for 'q_proj'"),
    ("rank_pattern", [1], "got [1]"),
    ("rank_pattern", {"v_proj": 4.0}, "gives 4.0 for 'v_proj'"),
    ("use_rslora", "false", "must be true or false, got 'false'"),
    ("use_dora", "false", "must be true or false, got 'false'"),
    ("fan_in_fan_out", 0, "must be true or false, got 0"),
    ("lora_bias", "no", "must be true or false, got 'no'"),
    ("modules_to_save", "lm_head", "must be a list of strings, got 'lm_head'"),
    ("modules_to_save", [1], "must be a list of strings, got [1]"),
    ("trainable_token_indices", "0,1", "got '0,1'"),
    ("layer_replication", {"0": 1}, "must be a list, got {'0': 1}"),
]
IA3_FIELDS = [
    ("feedforward_modules", 5, "must be a regex string or a list of strings, got 5"),
    ("feedforward_modules", ["down_proj", 1], "got ['down_proj', 1]"),
    ("fan_in_fan_out", "false", "must be true or false, got 'false'"),
    ("modules_to_save", {"lm_head": True}, "got {'lm_head': True}"),
]


@pytest.mark.parametrize("peft_type, field, value, quoted", [("LORA", *case) for case in LORA_FIELDS]
                         + [("IA3", *case) for case in IA3_FIELDS])
def test_a_config_field_of_the_wrong_type_is_one_line_naming_it(peft_type, field, value, quoted, registry, home,
                                                                pem_env, tmp_path):
    make = make_numpy_lora if peft_type == "LORA" else make_numpy_ia3
    good = make(tmp_path / "good", seed=1) if peft_type == "LORA" else make(tmp_path / "good")
    assert registry.add(good, "team/good").created  # the folder is valid until the field is spoiled
    bad = with_config(make(tmp_path / "bad", seed=2) if peft_type == "LORA" else make(tmp_path / "bad"),
                      **{field: value})
    before = store_files(home)

    line = one_error_line(invoke("add", bad, "--name", "team/bad"))
    assert line.startswith(f"error: adapter_config.json: {field} ") and quoted in line, line
    assert [m.ref for m in registry.list()] == ["team/good@1"]
    assert store_files(home) == before


@pytest.mark.parametrize("peft_type", ["LORA", "IA3"])
def test_null_and_well_typed_optional_fields_are_accepted(peft_type, registry, pem_env, tmp_path):
    """PEFT writes null for unset fields; they read as absent."""
    if peft_type == "LORA":
        folder = with_config(make_numpy_lora(tmp_path / "a", seed=1), use_rslora=None, use_dora=False, lora_bias=None,
                             fan_in_fan_out=False, rank_pattern=None, alpha_pattern={"q_proj": 16},
                             modules_to_save=None, trainable_token_indices=None, layer_replication=None)
    else:
        folder = make_numpy_ia3(tmp_path / "a", fan_in_fan_out=None, modules_to_save=None)
    result = invoke("add", folder, "--name", "team/a", "--json")
    assert result.exit_code == 0, result.output
    info = registry.get("team/a")
    assert info.composable and not info.use_rslora and not info.use_dora
    if peft_type == "LORA":  # alpha 16 on q_proj (alpha_pattern), 8 elsewhere; r = 4
        scalings = {layer.rsplit(".", 1)[-1]: spec["scaling"] for layer, spec in info.layers.items()}
        assert scalings == {"q_proj": 16 / 4, "v_proj": 8 / 4}


# --- item 5: expressions that begin with a minus -----------------------------------------------


@pytest.fixture
def toxic(registry, pem_env, tmp_path):
    return registry.add(make_numpy_lora(tmp_path / "toxic", seed=1), "team/toxic")


def test_check_an_expression_that_begins_with_a_minus(toxic, run_pem):
    for expression, b in (("-0.5*team/toxic", "-0.5"), ("-team/toxic", "-1")):
        result = run_pem("check", expression)
        assert result.exit_code == 0, result.output
        assert f"  {b}  team/toxic@1  (a=" in result.stdout and result.stdout.rstrip().endswith("composable")

    # options after and before the expression still parse
    report = json.loads(run_pem("check", "-team/toxic", "--method", "exact", "--json").stdout)
    assert report["method"] == "exact" and [(t["ref"], t["b"]) for t in report["terms"]] == [("team/toxic@1", -1.0)]
    report = json.loads(run_pem("check", "--method", "exact", "--json", "-0.5*team/toxic").stdout)
    assert report["method"] == "exact" and [t["b"] for t in report["terms"]] == [-0.5]
    assert run_pem("check", "--", "-team/toxic").exit_code == 0  # the explicit form keeps working


def test_compose_an_expression_that_begins_with_a_minus(toxic, registry, run_pem):
    result = run_pem("compose", "-team/toxic", "--name", "team/nontoxic", "--method", "exact")
    assert result.exit_code == 0, result.output
    provenance = registry.get("team/nontoxic").provenance
    assert provenance.expression == "-team/toxic" and provenance.method == "exact"
    assert [(i.ref, i.b, i.a) for i in provenance.inputs] == [("team/toxic@1", -1.0, 1.0)]


def test_unknown_options_next_to_a_negative_expression_are_still_errors(toxic, run_pem):
    for args in (["check", "-team/toxic", "--nope"], ["check", "--nope", "-team/toxic"],
                 ["compose", "-team/toxic", "--name", "team/x", "--frobnicate"]):
        result = run_pem(*args)
        assert result.exit_code == 2 and "No such option" in result.stderr, (args, result.output)
    missing = run_pem("compose", "-team/toxic")
    assert missing.exit_code == 2 and "Missing option '--name'" in missing.stderr
    dangling = run_pem("compose", "-team/toxic", "--name")
    assert dangling.exit_code == 2 and "Option '--name' requires an argument" in dangling.stderr
    assert json_error(run_pem("compose", "-team/toxic", "--json", "--name"), 2)["type"] == "UsageError"


# --- item 6: --home before the command -------------------------------------------------------


def test_home_is_accepted_before_and_after_the_command(registry, pem_env, tmp_path, monkeypatch):
    other = tmp_path / "other"
    monkeypatch.setenv("PEM_HOME", str(tmp_path / "elsewhere"))  # --home must win over the environment
    assert invoke("--home", other, "init").exit_code == 0
    added = invoke("--home", other, "add", make_numpy_lora(tmp_path / "a", seed=1), "--name", "team/a")
    assert added.exit_code == 0, added.output
    digest = registry.get("team/a").digest
    assert store_files(other) == {f"sha256/{digest[:2]}/{digest[2:]}"}  # the blob went to --home's store
    assert not (tmp_path / "elsewhere").exists()

    for args in (["--home", other, "list", "--json"], ["list", "--home", other, "--json"],
                 ["--home", tmp_path / "nowhere", "list", "--home", other, "--json"]):  # after the command wins
        result = invoke(*args)
        assert result.exit_code == 0, (args, result.output)
        assert [m["ref"] for m in json.loads(result.stdout)] == ["team/a@1"]
    shown = invoke("--home", other, "show", "team/a")
    assert shown.exit_code == 0 and f"sha256:{digest}" in shown.stdout
    base = invoke("--home", other, "base", "list")
    assert base.exit_code == 0 and "no base models recorded" in base.stdout


# --- item 7: --json errors ---------------------------------------------------------------------


def commands_with_json(group: click.Group = pem, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands_with_json(command, (*path, name))
        elif any(p.name == "as_json" for p in command.params):
            yield (*path, name)


JSON_COMMANDS = list(commands_with_json())


def test_the_json_commands_are_found():
    assert {("list",), ("show",), ("add",), ("check",), ("compose",), ("gc",), ("doctor",), ("base", "add"),
            ("alias", "set"), ("lineage",), ("verify",), ("pull",), ("push",)} <= set(JSON_COMMANDS)


@SQLITE_ONLY
@pytest.mark.parametrize("command", JSON_COMMANDS, ids=" ".join)
def test_a_usage_error_with_json_is_a_json_object(command, pem_env):
    error = json_error(invoke(*command, "--json", "--no-such-option"), exit_code=2)
    assert error["type"] == "UsageError" and "--no-such-option" in error["message"]


@SQLITE_ONLY
@pytest.mark.parametrize("args, needle", [
    (["shwo", "team/x", "--json"], "No such command 'shwo'"),
    (["token", "nope", "--json"], "No such command 'nope'"),
    (["--json", "list"], "No such option '--json'"),
])
def test_a_mistyped_command_with_json_is_a_json_object(args, needle, pem_env):
    error = json_error(invoke(*args), exit_code=2)
    assert error["type"] == "UsageError" and needle in error["message"]


def test_registry_errors_with_json_are_json_objects_with_the_exit_code(toxic, registry, home, run_pem, tmp_path):
    cases = [
        (["show", "team/nope", "--json"], "UnknownModuleError", "no module named team/nope"),
        (["check", "team/toxic + team/nope", "--json"], "UnknownModuleError", "no module named team/nope"),
        (["add", tmp_path / "missing", "--name", "team/x", "--json"], "InvalidAdapterError", "is not a folder"),
        (["compose", "team/toxic", "--name", "bad name", "--json"], "InvalidNameError", "invalid module name"),
        (["gc", "--grace", "-5", "--json"], "ConfigurationError", "grace period"),
        (["verify", "--json"], "UsageError", "give a REF or --all"),
        (["alias", "set", "team/toxic", "prod", "7", "--json"], "UnknownModuleError", "no version 7 of team/toxic"),
    ]
    for args, type_name, needle in cases:
        usage = type_name == "UsageError"
        error = json_error(run_pem(*args), 2 if usage else 1)
        assert error["type"] == type_name and needle in error["message"], (args, error)
        if not usage:  # the same message as without --json (a usage error prints click's usage there)
            plain = run_pem(*[a for a in args if a != "--json"])
            assert plain.exit_code == 1 and plain.stdout == ""
            assert plain.stderr.splitlines()[0] == f"error: {error['message']}", (plain.stderr, error)
    # an expression error keeps its caret lines apart from the one-line message
    error = json_error(run_pem("check", "2*(team/toxic", "--json"))
    assert error["type"] == "ExpressionSyntaxError" and error["message"].startswith("invalid expression")
    assert error["detail"].splitlines()[0] == "  2*(team/toxic" and error["detail"].splitlines()[1].strip() == "^"
    assert [m.ref for m in registry.list()] == ["team/toxic@1"]


@SQLITE_ONLY
def test_errors_without_json_and_commands_without_json_stay_plain(pem_env):
    result = invoke("describe", "team/x", "text", "--json")  # describe takes no --json: a plain usage error
    assert result.exit_code == 2 and result.stdout == "" and "Error: No such option '--json'" in result.stderr
    assert one_error_line(invoke("show", "team/nope")).startswith("error: no ")


# --- item 9: gc --------------------------------------------------------------------------------


def partial_write(registry, name: str, size: int, age_seconds: float) -> Path:
    tmp = registry.store.tmp_dir
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / name
    path.write_bytes(b"\0" * size)
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def unreferenced_blob(home: Path, data: bytes, age_seconds: float) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    path = home / "blobs" / "sha256" / digest[:2] / digest[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


@pytest.mark.parametrize("grace", ["-5", "nan", "inf", "-inf"])
def test_gc_refuses_a_negative_or_non_finite_grace_and_deletes_nothing(grace, registry, home, run_pem, tmp_path):
    registry.add(make_numpy_lora(tmp_path / "a", seed=1), "team/a")
    blob = unreferenced_blob(home, b"left by a crashed writer", age_seconds=7200)
    stale = partial_write(registry, "incoming-old", 100, age_seconds=7200)
    young = partial_write(registry, "incoming-new", 100, age_seconds=0)
    before = store_files(home)

    line = one_error_line(run_pem("gc", "--grace", grace))
    assert "grace period must be a finite number of seconds, 0 or more" in line
    with pytest.raises(ConfigurationError):
        registry.gc(grace_seconds=float(grace))
    assert store_files(home) == before and blob.exists() and stale.exists() and young.exists()
    # a valid grace collects the old ones (the test's files are really collectable)
    assert run_pem("gc", "--grace", "60").exit_code == 0
    assert not blob.exists() and not stale.exists() and young.exists()


def test_gc_reports_the_bytes_of_the_partial_writes_it_deletes(registry, home, run_pem):
    old = [partial_write(registry, "incoming-a", 3000, 7200), partial_write(registry, "incoming-b", 5000, 7200)]
    young = partial_write(registry, "incoming-c", 700, 0)

    dry = json.loads(run_pem("gc", "--dry-run", "--json").stdout)
    assert dry["bytes_freed"] == 8000 and sorted(dry["temporary_files"]) == sorted(map(str, old))
    assert all(p.exists() for p in old)

    result = run_pem("gc")
    assert result.exit_code == 0, result.output
    assert "0 blobs, 2 partial writes, 8.0 KB" in result.stdout
    assert not any(p.exists() for p in old) and young.exists()


def test_gc_dry_run_inside_the_grace_period_mentions_the_younger_partial_writes(registry, run_pem):
    young = [partial_write(registry, "incoming-a", 1234, 10), partial_write(registry, "incoming-b", 766, 0)]
    result = run_pem("gc", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "0 blobs, 0 partial writes, 0 B"
    assert lines[1].startswith("kept 2 partial writes (2.0 KB) younger than the grace period (3600 s)")
    report = json.loads(run_pem("gc", "--dry-run", "--json").stdout)
    assert (report["kept_temporary_files"], report["kept_temporary_bytes"]) == (2, 2000)
    assert all(p.exists() for p in young)


# --- item 10: doctor ---------------------------------------------------------------------------


def test_doctor_warns_about_an_unreachable_hub_and_fails_on_a_fail(registry, home, run_pem):
    assert run_pem("init").exit_code == 0  # the store folder too
    result = run_pem("doctor", "--endpoint", "http://127.0.0.1:9")
    assert result.exit_code == 0, result.output
    hub_line = next(line for line in result.stdout.splitlines() if line.split()[1] == "hub")
    assert hub_line.startswith("WARN ") and "only pull, push and sync need it" in hub_line
    assert "FAIL" not in result.stdout

    (home / "blobs").rename(home / "moved")  # a real problem: the store is gone
    result = run_pem("doctor", "--endpoint", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert [line.split()[:2] for line in result.stdout.splitlines() if not line.startswith("ok")] == [
        ["FAIL", "store"], ["WARN", "hub"]]


# --- item 12: messages -------------------------------------------------------------------------

LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.mark.parametrize("hidden_size", [-32, 2**40])
def test_base_add_says_why_the_structure_is_unknown(hidden_size, registry, run_pem, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": hidden_size}))
    result = run_pem("base", "add", "org/broken", "--config", config)
    assert result.exit_code == 0, result.output
    assert f"structure unknown: its config.json says hidden_size is {hidden_size}, which no model can have" in result.stdout
    assert f"from 1 to {2**31 - 1}" in result.stdout
    info = json.loads(run_pem("base", "add", "org/broken", "--config", config, "--json").stdout)
    assert not info["structure_known"] and f"hidden_size is {hidden_size}" in info["structure_unknown_reason"]

    # a config transformers refuses for another reason: what it said is in the reason
    config.write_text(json.dumps({**LLAMA_CONFIG, "num_attention_heads": 3}))
    result = run_pem("base", "add", "org/odd", "--config", config)
    assert "structure unknown: transformers" in result.stdout and "attention heads (3)" in result.stdout


def test_a_truncated_file_in_a_pulled_repo_is_named_by_repo_and_commit(registry, home, run_pem, hub, tmp_path):
    folder = make_numpy_lora(tmp_path / "a", seed=1)
    repo = f"pull-{uuid.uuid4().hex[:8]}/truncated"
    weights = (folder / WEIGHTS).read_bytes()
    commit = hub.add_commit(repo, {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: weights[:-100]})

    line = one_error_line(run_pem("pull", repo))
    assert f"{repo}@{commit[:12]}:{WEIGHTS} is not a valid safetensors file" in line, line
    assert "pem-pull-" not in line and "/tmp" not in line
    assert registry.list() == [] and store_files(home) == set()


@SQLITE_ONLY
@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-zero", "dangling-symlink", "folder"])
@pytest.mark.parametrize("file", [WEIGHTS, CONFIG])
def test_a_weights_or_config_path_that_is_not_a_regular_file_is_named(kind, file, registry, home, pem_env, tmp_path):
    folder = make_numpy_lora(tmp_path / "a", seed=1)
    path = folder / file
    path.unlink()
    expected = {"fifo": "is a FIFO (named pipe), not a regular file",
                "symlink-to-dev-zero": "(a symlink to /dev/zero) is a character device, not a regular file",
                "dangling-symlink": f"(a symlink to {tmp_path / 'gone'}) cannot be read",
                "folder": "is a folder, not a regular file"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "gone")
    else:
        path.mkdir()
    line = one_error_line(invoke("add", folder, "--name", "team/a"))
    assert line == f"error: {path} {expected}" + line.split(expected, 1)[1], line
    assert "has no" not in line
    assert registry.list() == [] and store_files(home) == set()


def test_names_over_the_length_limit_say_the_limit(toxic, registry, run_pem, tmp_path):
    long_name = "team/" + "n" * 97
    folder = make_numpy_lora(tmp_path / "b", seed=2)
    for args in (["add", folder, "--name", long_name], ["show", long_name], ["show", long_name + "@2"],
                 ["compose", "team/toxic", "--name", long_name], ["add", folder, "--name", "s" * 100 + "/x"]):
        line = one_error_line(run_pem(*args))
        assert "characters long; the limit is 96" in line and len(line) < 200, (args, line)
    assert "its name is 97 characters" in one_error_line(run_pem("show", long_name))
    assert "its namespace is 100 characters" in one_error_line(run_pem("show", "s" * 100 + "/x"))
    line = one_error_line(run_pem("alias", "set", "team/toxic", "p" * 65, "1"))
    assert "it is 65 characters long; the limit is 64" in line
    line = one_error_line(run_pem("tag", "team/toxic", "k" * 129 + "=v"))
    assert "it is 129 characters long; the limit is 128" in line

    # at the limit, the names work
    assert run_pem("add", folder, "--name", "team/" + "n" * 96).exit_code == 0
    assert run_pem("alias", "set", "team/toxic", "p" * 64, "1").exit_code == 0
    assert [m.ref for m in registry.list()] == ["team/" + "n" * 96 + "@1", "team/toxic@1"]
