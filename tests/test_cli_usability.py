"""Commands a new user reaches for (issue 14): export into a folder they already have, `pem
alias list`, shell completion of module names, a capped description, a readable `pem base
show`, and a bad PEM_CACHE_SIZE that only matters to a bucket store. On SQLite and PostgreSQL.

Expected values come from the files written here (modes from the umask set here, digests with
hashlib), never from the registry's own answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import make_ia3, make_lora
from registry.errors import InvalidNameError, PemError, UnknownModuleError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORKTREE = Path(__file__).resolve().parent.parent
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def ad(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("usability-adapters")
    return SimpleNamespace(a=make_lora(root / "a", seed=61), b=make_lora(root / "b", seed=62), ia3=make_ia3(root / "ia3", seed=63))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def clean_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# --- export into an existing folder --------------------------------------------------------------


def test_export_into_an_existing_folder_keeps_it_its_mode_and_its_files(registry, ad, tmp_path, umask_027):
    registry.add(ad.a, "team/x")
    registry.add(ad.b, "team/x")
    target = tmp_path / "deploy"
    target.mkdir()
    target.chmod(0o711)
    (target / "run.sh").write_text("#!/bin/sh\n")
    inode = target.stat().st_ino

    registry.export("team/x@1", target)
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS, "run.sh"]
    assert target.stat().st_ino == inode and mode(target) == 0o711  # the same folder, its mode kept
    assert mode(target / WEIGHTS) == 0o640 and mode(target / CONFIG) == 0o640  # 0o666 under umask 027
    first = file_digest(target / WEIGHTS)
    assert first == registry.get("team/x@1").digest

    # adapter files there are not overwritten without force, and nothing changes
    with pytest.raises(PemError, match=r"already holds adapter_config.json and adapter_model.safetensors.*--force"):
        registry.export("team/x@2", target)
    assert file_digest(target / WEIGHTS) == first
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS, "run.sh"]  # no temporary left

    registry.export("team/x@2", target, force=True)
    assert file_digest(target / WEIGHTS) == registry.get("team/x@2").digest != first
    assert json.loads((target / CONFIG).read_text())["r"] == json.loads((ad.b / CONFIG).read_text())["r"]
    assert (target / "run.sh").read_text() == "#!/bin/sh\n" and mode(target) == 0o711


def test_export_creates_a_missing_folder_following_the_umask(registry, ad, tmp_path, umask_027, run_pem):
    registry.add(ad.ia3, "team/x")
    target = tmp_path / "new" / "deep"
    result = run_pem("export", "team/x", target)
    assert result.exit_code == 0, result.output
    assert mode(target) == 0o750 and mode(target.parent) == 0o750  # not mkdtemp's 0o700
    assert mode(target / WEIGHTS) == 0o640
    clean_error(run_pem("export", "team/x", target), "--force")
    assert run_pem("export", "team/x", target, "--force").exit_code == 0


def test_export_refuses_one_adapter_file_alone_too(registry, ad, tmp_path):
    registry.add(ad.ia3, "team/x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / WEIGHTS).write_bytes(b"mine")
    with pytest.raises(PemError, match="already holds adapter_model.safetensors"):
        registry.export("team/x", tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == b"mine" and not (tmp_path / "out" / CONFIG).exists()


# --- pem alias list --------------------------------------------------------------------------------


def test_alias_list_per_name_and_for_all(registry, ad, run_pem):
    registry.add(ad.a, "team/x")
    registry.add(ad.b, "team/x")
    registry.add(ad.ia3, "lab/y")
    registry.set_alias("team/x", "prod", 1)
    registry.set_alias("team/x", "canary", 2)
    registry.set_alias("lab/y", "prod", 1)

    assert run_pem("alias", "list").stdout.splitlines() == [
        "lab/y@prod -> lab/y@1", "team/x@canary -> team/x@2", "team/x@prod -> team/x@1",
    ]
    assert run_pem("alias", "list", "team/x").stdout.splitlines() == ["team/x@canary -> team/x@2", "team/x@prod -> team/x@1"]
    assert json.loads(run_pem("alias", "list", "lab/y", "--json").stdout) == [
        {"alias": "lab/y@prod", "ref": "lab/y@1", "version": 1}
    ]
    registry.remove_alias("lab/y", "prod")
    assert "lab/y has no aliases" in run_pem("alias", "list", "lab/y").stdout
    clean_error(run_pem("alias", "list", "team/xx"), "no module named team/xx", "did you mean team/x")
    with pytest.raises(UnknownModuleError):
        registry.list_aliases("nobody/here")


# --- shell completion ------------------------------------------------------------------------------


def complete(env: dict[str, str], words: str) -> subprocess.CompletedProcess:
    """What bash completion asks the pem program, the way click's `_PEM_COMPLETE` does it."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from cli.main import main; main()"],
        cwd=WORKTREE, capture_output=True, text=True,
        env={**os.environ, **env, "_PEM_COMPLETE": "bash_complete", "COMP_WORDS": words,
             "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))},
    )


def test_shell_completion_offers_names_then_versions_and_aliases_without_torch(registry, ad, pem_env):
    registry.add(ad.a, "team/yelp")
    registry.add(ad.b, "team/yelp")
    registry.add(ad.ia3, "team/amazon")
    registry.add(ad.ia3, "lab/yelp")
    registry.set_alias("team/yelp", "prod", 1)

    names = complete(pem_env, "pem show team/")
    assert names.returncode == 0, names.stderr[-2000:]
    assert names.stdout.splitlines() == ["plain,team/amazon", "plain,team/yelp"]
    assert complete(pem_env, "pem lineage t").stdout.splitlines() == ["plain,team/amazon", "plain,team/yelp"]
    assert complete(pem_env, "pem rm team/yelp@").stdout.splitlines() == [
        "plain,team/yelp@2", "plain,team/yelp@1", "plain,team/yelp@prod",
    ]
    assert complete(pem_env, "pem export team/yelp@p").stdout.splitlines() == ["plain,team/yelp@prod"]
    imported = {line.split("|")[-1].strip() for line in names.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "peft"} & imported


def test_shell_completion_without_a_registry_offers_nothing(tmp_path):
    result = complete({"PEM_HOME": str(tmp_path / "none")}, "pem show team/")
    assert result.returncode == 0 and result.stdout.strip() == ""
    assert not (tmp_path / "none").exists()


# --- descriptions are capped like tags ---------------------------------------------------------------


def test_description_length_is_capped(registry, ad, run_pem, tmp_path):
    registry.add(ad.ia3, "team/x")
    clean_error(run_pem("describe", "team/x", "d" * 4097), "4097 characters", "limit is 4096")
    assert registry.history("team/x") == [] and registry.get("team/x").description is None
    with pytest.raises(InvalidNameError, match="limit is 4096"):
        registry.add(ad.a, "team/y", description="d" * 4097)
    with pytest.raises(InvalidNameError, match="limit is 4096"):
        registry.compose("team/x", "team/z", description="d" * 5000)
    assert [m.ref for m in registry.list()] == ["team/x@1"]
    assert run_pem("describe", "team/x", "d" * 4096).exit_code == 0
    assert registry.get("team/x").description == "d" * 4096


# --- base show -----------------------------------------------------------------------------------


def test_base_show_aligns_its_labels_and_never_prints_none(registry, run_pem, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": None, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": None}))
    registry.add_base("org/bare", config_path=config)
    result = run_pem("base", "show", "org/bare")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "None" not in result.stdout
    label = {line.split("  ")[0]: line for line in lines}
    assert set(label) == {"base model", "architecture", "model type", "hidden_size", "num_attention_heads",
                          "num_key_value_heads", "structure", "adapters"}
    value_column = {len(line) - len(line[len(key):].lstrip()) for key, line in label.items()}
    assert value_column == {len("num_attention_heads") + 2}  # every value starts in one column
    assert label["hidden_size"].split() == ["hidden_size", "64"]
    assert label["num_key_value_heads"].split() == ["num_key_value_heads", "unknown"]
    assert label["architecture"].split()[1] == "unknown" and label["model type"].split()[2] == "unknown"


# --- PEM_CACHE_SIZE only matters to a bucket store --------------------------------------------------


@pytest.mark.parametrize("value", ["lots", "-5GB", "nan", "1e999"])
def test_an_invalid_cache_size_does_not_break_a_local_store(registry, ad, run_pem, monkeypatch, value, tmp_path):
    monkeypatch.setenv("PEM_CACHE_SIZE", value)
    for args in (["add", ad.ia3, "--name", "team/x"], ["list"], ["show", "team/x"], ["cache", "info"],
                 ["export", "team/x", tmp_path / "out"], ["gc", "--dry-run"]):
        result = run_pem(*args)
        assert result.exit_code == 0, (args, result.output)
