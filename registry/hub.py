"""Hugging Face Hub sync, through the real ``huggingface_hub`` client: pull, push, sync.

The endpoint comes from configuration (``HF_ENDPOINT`` or ``--endpoint``), never from a
constant, so a team's mirror or self-hosted Hub works; tokens come from huggingface_hub's
usual sources (``HF_TOKEN``, the token file) and are never stored by the registry. Every
client error becomes a one-line :class:`registry.errors.HubError`, raised before anything is
registered.

A pushed repository holds ``adapter_config.json``, ``adapter_model.safetensors``, a model card
``README.md`` and ``pem-provenance.json`` (schema: :class:`registry.schemas.ProvenanceSidecar`).
Pulling a repository that has such a sidecar imports its provenance: the inputs appear in the
lineage as external nodes until modules with their digests are registered here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from registry.errors import HubError, InvalidAdapterError, InvalidNameError, UnsafeFormatError
from registry.schemas import SIDECAR_FILENAME, ProvenanceSidecar

if TYPE_CHECKING:
    from registry.db.models import Module

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into one-line HubErrors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.HFValidationError as exc:
        raise InvalidNameError(f"{what}: {str(exc).splitlines()[0]}") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found on the Hub") from None
    except hf_errors.EntryNotFoundError:
        raise HubError(f"{what}: file not found in the repository") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{what}: the repository is gated: accept its terms on the Hub first") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found (or not visible with your token)") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"{what}: unauthorized: check HF_TOKEN or run `hf auth login`") from None
        raise HubError(f"{what}: the Hub answered {status or 'an error'}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # connection refused, DNS, timeouts: httpx and OS errors alike
        if isinstance(exc, (HubError, InvalidAdapterError, InvalidNameError)):
            raise
        name = exc.__class__.__name__
        if isinstance(exc, OSError) or "Connect" in name or "Timeout" in name or "Network" in name:
            raise HubError(f"{what}: cannot reach the Hub ({name}): check HF_ENDPOINT and the network") from None
        raise


def api(endpoint: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


_REPO_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?")


def parse_repo_reference(text: str) -> tuple[str, str | None]:
    """``REPO_ID[@REVISION]``; a repo id is ``NAME`` or ``NS/NAME`` by the Hub's rules
    (letters, digits, '_', '.', '-'; no '--' or '..'; at most 96 characters a part)."""
    repo_id, _, revision = text.strip().partition("@")
    parts = repo_id.split("/")
    valid = 1 <= len(parts) <= 2 and all(
        _REPO_SEGMENT.fullmatch(p) and "--" not in p and ".." not in p for p in parts
    )
    if not valid or ("@" in text and not revision):
        raise InvalidNameError(f"invalid Hub repo {text!r}: use NS/NAME or NS/NAME@REVISION")
    return repo_id, revision or None


def download_config(repo_id: str, revision: str | None, endpoint: str) -> Path:
    """Download a model's config.json alone (no weights)."""
    from huggingface_hub import hf_hub_download

    with hub_errors(f"config.json of {repo_id}"):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, endpoint=endpoint))


def git_blob_oid(path: Path) -> str:
    """The git object id the Hub reports for a (non-LFS) file."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- pulling ----------------------------------------------------------------------------------


class PulledFiles:
    """What a pull downloaded, pinned to one commit, in a temporary folder."""

    def __init__(self, folder: Path, card: dict[str, Any], sidecar: ProvenanceSidecar | None):
        self.folder, self.card, self.sidecar = folder, card, sidecar


def resolve(repo_id: str, revision: str | None, endpoint: str) -> tuple[str, set[str]]:
    """The commit a revision points at, and the repository's file names (nothing downloaded)."""
    what = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(what):
        info = api(endpoint).model_info(repo_id, revision=revision)
    names = {s.rfilename for s in (info.siblings or [])}
    if CONFIG_FILE not in names:
        raise InvalidAdapterError(f"{what} has no {CONFIG_FILE}: is it a PEFT adapter repository?")
    if WEIGHTS_FILE not in names:
        if any(p in names for p in PICKLE_FILES):
            raise UnsafeFormatError(
                f"{what} has only pickle weights, which the registry never loads: "
                "ask for a safetensors upload (save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidAdapterError(f"{what} has no {WEIGHTS_FILE}")
    return info.sha, names


def download(repo_id: str, commit: str, names: set[str], endpoint: str, into: Path) -> PulledFiles:
    """Download config, weights, and card and sidecar where present, at ``commit``. Only these
    fixed names are fetched: never a pickle, never a path chosen by the server."""
    from huggingface_hub import hf_hub_download

    wanted = (CONFIG_FILE, WEIGHTS_FILE) + tuple(n for n in (CARD_FILE, SIDECAR_FILENAME) if n in names)
    with hub_errors(f"{repo_id}@{commit[:12]}"):
        for name in wanted:
            shutil.copyfile(hf_hub_download(repo_id, name, revision=commit, endpoint=endpoint), into / name)
    return PulledFiles(into, _card_metadata(into / CARD_FILE), _read_sidecar(into / SIDECAR_FILENAME, repo_id))


def _card_metadata(path: Path) -> dict[str, Any]:
    """license, tags and base_model from the card's YAML, where present."""
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception:  # a card we cannot parse is not a reason to refuse the adapter
        return {}
    return {k: data[k] for k in ("license", "tags", "base_model", "base_model_relation") if data.get(k) is not None}


def _read_sidecar(path: Path, what: str) -> ProvenanceSidecar | None:
    if not path.is_file():
        return None
    try:
        return ProvenanceSidecar.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except Exception as exc:
        raise InvalidAdapterError(f"{what}: {SIDECAR_FILENAME} does not match its schema ({exc.__class__.__name__})") from None


def default_name(repo_id: str) -> str:
    return repo_id if "/" in repo_id else f"hub/{repo_id}"


# --- pushing ----------------------------------------------------------------------------------


def sidecar_for(module: "Module", input_links: dict[int, dict[str, str]]) -> ProvenanceSidecar:
    from registry import __version__

    derivation = module.derivation
    return ProvenanceSidecar.model_validate({
        "schema": "pem-registry/provenance",
        "schema_version": 1,
        "generator": f"pem-registry {__version__}",
        "module": {
            "name": module.full_name, "version": module.version, "digest": module.digest, "kind": module.kind,
            "peft_type": module.peft_type, "base_model": module.base_model, "base_revision": module.base_revision,
        },
        "derivation": None if derivation is None else {
            "expression": derivation.expression, "canonical": derivation.canonical, "method": derivation.method,
            "method_version": derivation.method_version, "parameters": derivation.parameters,
            "results": derivation.results, "environment": derivation.environment,
            "inputs": [
                {
                    "ref": i.input.ref if i.input is not None else (i.external or {}).get("ref", "external"),
                    "digest": i.input_digest, "a": i.a, "b": i.b,
                    "hub": input_links.get(i.input_id) if i.input_id is not None else _external_hub(i.external),
                }
                for i in derivation.inputs
            ],
        },
    })


def _external_hub(external: dict[str, Any] | None) -> dict[str, str] | None:
    if external and external.get("repo_id"):
        return {"repo_id": external["repo_id"], "commit": external.get("commit", "")}
    return None


def model_card(module: "Module", sidecar: ProvenanceSidecar) -> str:
    """README.md: YAML the Hub understands, then what the module is, in prose and a table.
    Deterministic (no timestamps of the push), so pushing unchanged content changes nothing."""
    from huggingface_hub import ModelCardData

    derivation = sidecar.derivation
    parents = [i.hub["repo_id"] for i in derivation.inputs if i.hub] if derivation else []
    relation = "merge" if module.kind == "derived" else "adapter"
    tags = sorted({"peft", "pem-registry", module.peft_type.lower(), *[f"{k}:{v}" for k, v in sorted(
        (t.key, t.value) for t in module.tags)]})
    data = ModelCardData(
        library_name="peft",
        base_model=parents if parents and relation == "merge" else module.base_model,
        base_model_relation=relation,
        tags=tags,
    )
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {module.full_name} (version {module.version})", "",
        f"A {module.peft_type} adapter for `{module.base_model}`"
        + (f" at revision `{module.base_revision}`" if module.base_revision else "")
        + (f", {module.description}" if module.description else "") + ".",
        "",
    ]
    if derivation:
        lines += [
            f"It was composed by [pem-registry](https://pypi.org/project/pem-registry/) from {len(derivation.inputs)} "
            f"module(s) with the expression `{derivation.canonical}` and the method `{derivation.method}`.",
            "",
            "| input | coefficient | digest | on the Hub |",
            "|---|---|---|---|",
        ]
        for item in derivation.inputs:
            hub = f"`{item.hub['repo_id']}` @ `{item.hub['commit'][:12]}`" if item.hub else "-"
            lines.append(f"| `{item.ref}` | {item.b:+g} | `sha256:{item.digest[:12]}` | {hub} |")
        lines.append("")
    lines += [
        "| property | value |", "|---|---|",
        f"| PEFT type | {module.peft_type} |",
        f"| rank | {module.rank if module.rank is not None else '-'} |",
        f"| dtype | {module.dtype} |",
        f"| parameters | {module.num_parameters:,} |",
        f"| content digest | `sha256:{module.digest}` |",
        "",
        f"Machine-readable provenance is in `{SIDECAR_FILENAME}`. Load with PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this repo>\")",
        "```",
        "",
    ]
    return "\n".join(lines)


def stage_push(folder: Path, config: dict[str, Any], weights: Path | None, card: str, sidecar: ProvenanceSidecar) -> None:
    """The files of a push; ``weights`` None: the caller writes them (a copy with its digest checked)."""
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if weights is not None:
        shutil.copyfile(weights, folder / WEIGHTS_FILE)
    (folder / CARD_FILE).write_text(card)
    (folder / SIDECAR_FILENAME).write_text(sidecar.model_dump_json(by_alias=True, indent=2) + "\n")


def upload(
    endpoint: str, repo_id: str, folder: Path, *, private: bool, branch: str | None, message: str
) -> tuple[str, bool]:
    """Create the repo (and branch) if needed and commit the folder; returns the commit id and
    whether a commit was made (the client makes none when nothing changed: the id is then the
    existing head)."""
    client = api(endpoint)
    with hub_errors(repo_id):
        client.create_repo(repo_id, private=private, exist_ok=True)
        if branch:
            client.create_branch(repo_id, branch=branch, exist_ok=True)
        head = client.repo_info(repo_id, revision=branch).sha
        with _quiet_unchanged_upload():
            info = client.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch, commit_message=message)
        return info.oid, info.oid != head


class _DropUnchangedWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No files have been modified since last commit" not in record.getMessage()


@contextmanager
def _quiet_unchanged_upload() -> Iterator[None]:
    """Keep huggingface_hub's "Skipping to prevent empty commit" warning off stderr: pem says
    itself that nothing changed. Only that message is dropped, from the two loggers that emit it."""
    loggers = [logging.getLogger(f"huggingface_hub.{name}") for name in ("hf_api", "_upload_pipeline")]
    drop = _DropUnchangedWarning()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def remote_head(endpoint: str, repo_id: str, revision: str) -> str:
    with hub_errors(f"{repo_id}@{revision}"):
        return api(endpoint).model_info(repo_id, revision=revision).sha


def remote_weights_oid(endpoint: str, repo_id: str, revision: str) -> str | None:
    with hub_errors(f"{repo_id}@{revision}"):
        for entry in api(endpoint).list_repo_tree(repo_id, revision=revision):
            if entry.path == WEIGHTS_FILE:
                return entry.blob_id
    return None

