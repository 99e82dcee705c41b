"""Helpers shared by the parts of the Registry class: validation of names and tags,
reading adapter folders, and turning catalog rows into results."""


from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import exists, func, select, text, update
from sqlalchemy.orm import Session

from registry import lazy_module
from registry.db.models import Alias as AliasRow
from registry.db.models import (
    Module,
    NameCounter,
)
from registry.errors import (
    InvalidAdapterError,
    InvalidNameError,
    NameConflictError,
    UnknownModuleError,
    UnsafeFormatError,
)
from registry.refs import (
    ModuleName,
    number_segment,
    too_long,
)
from registry.schemas import (
    ModuleDetails,
    ModuleInfo,
    Provenance,
    ProvenanceInput,
)


class WriteReceipt:
    """Rows a caller commits in the next write's own transaction, given that write's answer.

    A registry server stores a request's ``Idempotency-Key`` this way: the key and the answer
    are stored if and only if the write committed, whatever crashes in between, so a retry
    gets the answer and never applies the write twice. A write names its answer with
    :func:`answered` before its transaction ends."""

    def __init__(self, add_rows: Callable[[Session, Any], None]):
        self.add_rows = add_rows
        self.answer: Any = None
        self.committed = False


WRITE_RECEIPT: ContextVar[WriteReceipt | None] = ContextVar("pem_write_receipt", default=None)


def answered(value: Any) -> Any:
    """``value``, the answer of the write in progress, handed to a pending :class:`WriteReceipt`."""
    receipt = WRITE_RECEIPT.get()
    if receipt is not None:
        receipt.answer = value
    return value


if TYPE_CHECKING:
    from registry.safetensors_io import SafetensorsHeader

lineage_queries = lazy_module("registry.lineage")  # for provenance only: loaded on first use

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
MAX_TAG_KEY = 128
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
VERSION_RETRIES = 10
GC_GRACE_SECONDS = 3600.0  # unreferenced blobs younger than this may belong to a writer in flight  # concurrent registrations of one name race for the next version


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value)."""
    key, sep, value = text.partition("=")
    _check_tag_key_length(key)
    if not sep or not TAG_KEY_RE.fullmatch(key):
        raise InvalidNameError(f"invalid tag {text!r}: use KEY=VALUE, KEY of letters, digits, '_', '.', ':', '-'")
    return key, value


# Column sizes of the catalog, checked before anything is written.
MAX_LENGTHS = {
    "description": 4096, "task": 128, "base_model": 255, "base_revision": 255, "task_type": 64, "peft_type": 32,
}
MAX_TAG_VALUE = 512


def check_lengths(**values: str | None) -> None:
    for field, value in values.items():
        limit = MAX_LENGTHS[field]
        if value is not None and len(value) > limit:
            raise InvalidNameError(f"{field.replace('_', ' ')} is {len(value)} characters long; the limit is {limit}")


def _check_tag_key_length(key: str) -> None:
    if len(key) > MAX_TAG_KEY and re.fullmatch(r"[A-Za-z0-9_.:-]+", key):
        raise too_long("tag key", key, MAX_TAG_KEY)


def parse_tags(tags: dict[str, str] | None) -> list[tuple[str, str]]:
    """Validate tags given as a mapping; sorted pairs."""
    pairs = []
    for key, value in (tags or {}).items():
        _check_tag_key_length(key)
        if not TAG_KEY_RE.fullmatch(key):
            raise InvalidNameError(f"invalid tag key {key!r}: use letters, digits, '_', '.', ':', '-'")
        if len(str(value)) > MAX_TAG_VALUE:
            raise InvalidNameError(f"tag {key} has a value of {len(str(value))} characters; the limit is {MAX_TAG_VALUE}")
        pairs.append((key, str(value)))
    return sorted(pairs)


def canonical_json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_adapter_folder(folder: Path) -> tuple[dict[str, Any], SafetensorsHeader]:
    """Validate a PEFT adapter folder and read its config and weights header (no tensor data)."""
    from registry.safetensors_io import read_header

    if not folder.is_dir():
        raise InvalidAdapterError(f"{folder} is not a folder: pass a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        _require_regular_file(config_path)
        raise InvalidAdapterError(f"{folder} has no {CONFIG_FILE}: is it a PEFT adapter folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge integers, hostile nesting
        raise InvalidAdapterError(f"{config_path} is not valid JSON ({exc.__class__.__name__}): fix or re-save it") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise InvalidAdapterError(f"{config_path} has no peft_type: is it a PEFT adapter config?")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        _require_regular_file(weights)
        pickles = [p for p in PICKLE_FILES if (folder / p).is_file()]
        if pickles:
            raise UnsafeFormatError(
                f"{folder / pickles[0]} is a pickle, which the registry never loads: convert it to safetensors "
                "(load it in PEFT and save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidAdapterError(f"{folder} has no {WEIGHTS_FILE}")
    return config, read_header(weights)


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular_file(path: Path) -> None:
    """Refuse, by what it is, a path that exists but is not a regular file (a FIFO, a device,
    a folder, a dangling symlink); return when there is nothing at all. Nothing is opened: a
    FIFO would block and a device such as /dev/zero never ends."""
    if not os.path.lexists(path):
        return
    target = f" (a symlink to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode
    except OSError as exc:  # a dangling symlink, or a loop of them
        raise InvalidAdapterError(f"{path}{target} cannot be read: {exc.strerror}; it must be a regular file") from None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise InvalidAdapterError(f"{path}{target} is {kind}, not a regular file: replace it with the file itself")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- rows to results --------------------------------------------------------------------------


def environment(arrays: str = "torch") -> dict[str, Any]:
    """The stack a derivation was computed with (bit-for-bit re-derivation depends on it):
    the array library that did the arithmetic (registry/compose/arrays.py) and its version.
    Only what computed is imported: a numpy composition never imports torch."""
    import platform

    from registry import __version__

    stack: dict[str, Any] = {"pem_registry": __version__, "python": platform.python_version(), "arrays": arrays}
    if arrays == "numpy":
        import numpy

        return {**stack, "numpy": numpy.__version__}
    import safetensors
    import torch

    return {**stack, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "torch_threads": torch.get_num_threads()}


# Columns of a ModuleInfo, selected directly by list(): no ORM objects, no large JSON.
INFO_COLUMNS = (
    Module.id, Module.namespace, Module.name, Module.version, Module.digest, Module.kind, Module.peft_type,
    Module.composable, Module.base_model, Module.base_revision, Module.task, Module.task_type, Module.rank,
    Module.lora_alpha, Module.use_rslora, Module.use_dora, Module.target_modules, Module.dtype,
    Module.num_parameters, Module.size_bytes, Module.owner, Module.description, Module.created_at,
)


def info_fields(module: Any, tags: dict[str, str], aliases: list[str]) -> dict[str, Any]:
    """ModuleInfo fields from a Module row or a row of INFO_COLUMNS."""
    return dict(
        name=f"{module.namespace}/{module.name}",
        version=module.version,
        ref=f"{module.namespace}/{module.name}@{module.version}",
        digest=module.digest,
        kind=module.kind,
        peft_type=module.peft_type,
        composable=module.composable,
        base_model=module.base_model,
        base_revision=module.base_revision,
        task=module.task,
        task_type=module.task_type,
        rank=module.rank,
        lora_alpha=module.lora_alpha,
        use_rslora=module.use_rslora,
        use_dora=module.use_dora,
        target_modules=module.target_modules,
        dtype=module.dtype,
        num_parameters=module.num_parameters,
        size_bytes=module.size_bytes,
        tags=tags,
        aliases=aliases,
        owner=module.owner,
        description=module.description,
        created_at=module.created_at,
    )


def unknown_alias_error(session: Session, name: ModuleName, label: str) -> UnknownModuleError:
    known = session.scalars(
        select(AliasRow.alias).where(AliasRow.namespace == name.namespace, AliasRow.name == name.name)
    ).all()
    listed = f"; it has {', '.join(sorted(known))}" if known else "; set one with `pem alias set`"
    return UnknownModuleError(f"{name} has no alias {label!r}{listed}")


def next_version(session: Session, name: ModuleName) -> int:
    """Take the next version of ``name``: one atomic UPDATE ... RETURNING, so concurrent
    writers queue on the counter's row lock and each gets its own number. The first
    registration of a name inserts the counter (two racing inserts: one retries)."""
    taken = session.execute(
        update(NameCounter)
        .where(NameCounter.namespace == name.namespace, NameCounter.name == name.name)
        .values(last_version=NameCounter.last_version + 1)
        .returning(NameCounter.last_version)
    ).scalar()
    if taken is None:
        session.add(NameCounter(namespace=name.namespace, name=name.name, last_version=1))
        session.flush()
        taken = 1
    return taken


def lock_name(session: Session, name: ModuleName) -> None:
    """Serialize the registrations of names that are equal ignoring case, until the end of the
    transaction. PostgreSQL: an advisory lock on the case-folded name (two spellings have two
    counter rows, so the counter's row lock does not cover them); SQLite: BEGIN IMMEDIATE
    already serializes every writer."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(str(name).lower().encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def check_new_name(session: Session, name: ModuleName) -> None:
    """Refuse a name no module holds yet when a segment reads as a number, or when a name
    equal ignoring case is registered (as on the Hub). Names that break these rules and were
    registered before keep working."""
    segment = number_segment(name)
    if segment is not None:
        raise InvalidNameError(
            f"invalid module name {str(name)!r}: {segment!r} reads as a number, and an expression must "
            "tell numbers from modules: choose a part that is not a number (e.g. 'v2' rather than '2')"
        )
    live = exists().where(Module.namespace == NameCounter.namespace, Module.name == NameCounter.name)
    spellings = session.execute(
        select(NameCounter.namespace, NameCounter.name).where(
            func.lower(NameCounter.namespace) == name.namespace.lower(),
            func.lower(NameCounter.name) == name.name.lower(),
            live,
        ).order_by(NameCounter.namespace, NameCounter.name)
    ).all()
    taken = [f"{ns}/{n}" for ns, n in spellings if (ns, n) != (name.namespace, name.name)]
    if taken:
        raise NameConflictError(
            f"{name} differs from {', '.join(taken)} only in case, and names are unique ignoring case "
            f"(as on the Hub): register it as {taken[0]}"
        )


def inherited_metadata(
    previous: Module | None, task: str | None, tags: list[tuple[str, str]]
) -> tuple[str | None, list[tuple[str, str]]]:
    """A new version keeps the task and the tags of the newest version of its name, unless
    given: a task given replaces the task, tags given replace all the tags."""
    if previous is None:
        return task, tags
    kept_tags = tags or [(t.key, t.value) for t in previous.tags]
    return (task if task is not None else previous.task), kept_tags


def module_info(module: Module, created: bool = True, aliases: list[str] | None = None) -> ModuleInfo:
    return ModuleInfo(**info_fields(module, {t.key: t.value for t in module.tags}, aliases or []), created=created)


def aliases_of(session: Session, module_ids: Any) -> dict[int, list[str]]:
    """Alias labels per module id (``module_ids``: a list or a select of ids)."""
    found: dict[int, list[str]] = {}
    for row in session.execute(
        select(AliasRow.module_id, AliasRow.alias).where(AliasRow.module_id.in_(module_ids)).order_by(AliasRow.alias)
    ):
        found.setdefault(row.module_id, []).append(row.alias)
    return found


def module_details(module: Module, aliases: list[str]) -> ModuleDetails:
    derivation = module.derivation
    provenance = None
    if derivation is not None:
        provenance = Provenance(
            expression=derivation.expression,
            canonical=derivation.canonical,
            method=derivation.method,
            method_version=derivation.method_version,
            parameters=derivation.parameters,
            results=derivation.results,
            environment=derivation.environment,
            inputs=[
                ProvenanceInput(
                    ref=i.input.ref if i.input is not None else lineage_queries.external_label(i.external, i.input_digest),
                    digest=i.input_digest, a=i.a, b=i.b,
                )
                for i in derivation.inputs
            ],
            created_at=derivation.created_at,
        )
    return ModuleDetails(
        **info_fields(module, {t.key: t.value for t in module.tags}, aliases),
        unsupported=module.unsupported,
        layers=module.layers,
        config=module.config,
        source=module.source,
        provenance=provenance,
    )

