"""Pinning a reference to a digest and exporting it once per digest, for a serving engine.

Nothing here imports vLLM (or torch): :mod:`registry.serving.vllm_plugin` is the thin layer
that vLLM loads, and this module does the registry side, so it is tested without vLLM.

A served folder is ``<cache>/<digest>/<config digest>``: its name is its content, so two
names (or two moves of an alias) that reach one module share it, and a folder is never
rewritten with other weights or another config. Folders are never deleted here: vLLM reloads an adapter from its path after
evicting it from memory, so any folder handed out may be read again while vLLM runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from registry.api.common import CONFIG_FILE, WEIGHTS_FILE, canonical_json_digest, file_sha256
from registry import errors
from registry.config import ServingSettings
from registry.errors import (
    AmbiguousReferenceError,
    DatabaseError,
    InvalidNameError,
    PemError,
    RegistryNotInitializedError,
    SchemaOutdatedError,
    UnknownModuleError,
)
from registry.refs import parse_reference


# Errors that mean "cannot ask the registry now" (the next call opens it again), including the
# remote client's when a `pem serve` server is used (PEM_REGISTRY_URL).
UNREACHABLE = tuple(
    cls for cls in (DatabaseError, RegistryNotInitializedError, SchemaOutdatedError,
                    getattr(errors, "ServerUnavailableError", None))
    if cls is not None
)


class Refusal(Exception):
    """A reference the engine must not serve; the message is the one-line reason logged."""


@dataclass(frozen=True)
class Pinned:
    requested: str  # the reference as the client sent it
    ref: str  # NS/NAME@VERSION it resolved to
    digest: str
    folder: Path

    @property
    def movable(self) -> bool:
        """An alias or a bare name (the latest version) may point elsewhere later; a version
        or a digest never does."""
        parsed = parse_reference(self.requested)
        return parsed.digest_prefix is None and parsed.version is None

    def log_line(self) -> str:
        return f"pem: {self.requested} -> {self.ref} sha256:{self.digest} ({self.folder})"


class Pinner:
    """Resolves references through ``registry.api`` (opened lazily, reopened after a failure)
    and keeps the per-digest export cache."""

    def __init__(self, settings: ServingSettings, open_registry: Callable[[], Any]):
        self.settings = settings
        self._open_registry = open_registry
        self._registry: Any = None
        self._lock = threading.Lock()  # one call at a time: resolutions are rare (once per name)

    def pin(self, requested: str, base_model: str) -> Pinned:
        """The served folder of ``requested``; raises :class:`Refusal` with the reason."""
        with self._lock:
            details = self._lookup(requested, details=True)
            self._check(requested, details, base_model)
            try:
                folder = self._cached_folder(details.ref, details.digest, details.config)
            except OSError as exc:
                raise Refusal(f"cannot write the export cache {self.settings.cache}: {exc.strerror or exc}") from exc
            return Pinned(requested, details.ref, details.digest, folder)

    def current_digest(self, requested: str) -> str | None:
        """What ``requested`` points at now; None when it no longer resolves. Raises
        :class:`Refusal` when the registry cannot answer (the caller then keeps what it has)."""
        try:
            with self._lock:  # the watcher's thread and resolutions share one registry handle
                return self._lookup(requested, details=False).digest
        except Refusal as refusal:
            if isinstance(refusal.__cause__, (UnknownModuleError, AmbiguousReferenceError)):
                return None
            raise

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    # --- the registry -------------------------------------------------------------------------

    def _lookup(self, requested: str, *, details: bool) -> Any:
        try:
            parsed = parse_reference(requested)
        except InvalidNameError:
            raise Refusal(f"{requested!r} is not a registry reference (NS/NAME, NS/NAME@N, NS/NAME@ALIAS, sha256:HEX)")
        if parsed.module is not None:
            self._check_namespace(requested, parsed.module.namespace)
        try:
            if self._registry is None:
                self._registry = self._open_registry()
            return self._registry.get(requested) if details else self._registry.resolve(requested)
        except UnknownModuleError as exc:
            raise Refusal(f"unknown in the registry: {exc}") from exc
        except AmbiguousReferenceError as exc:
            raise Refusal(f"ambiguous: {exc}") from exc
        except UNREACHABLE as exc:
            self.close()
            raise Refusal(f"registry unreachable: {exc}") from exc
        except PemError as exc:
            raise Refusal(f"registry error: {exc}") from exc
        except Exception as exc:  # a remote registry's transport errors, a driver's surprise
            self.close()
            raise Refusal(f"registry unreachable: {exc.__class__.__name__}: {first_line(exc)}") from exc

    # --- what may be served -------------------------------------------------------------------

    def _check_namespace(self, requested: str, namespace: str) -> None:
        allowed = self.settings.namespaces
        if allowed is not None and namespace not in allowed:
            raise Refusal(
                f"namespace {namespace!r} of {requested} is not in PEM_VLLM_NAMESPACES ({','.join(sorted(allowed))})"
            )

    def _check(self, requested: str, details: Any, base_model: str) -> None:
        self._check_namespace(requested, details.name.split("/", 1)[0])
        if details.peft_type != "LORA":
            raise Refusal(f"{details.ref} is of type {details.peft_type}; vLLM serves LoRA only")
        if details.use_dora:
            raise Refusal(f"{details.ref} is a DoRA module; vLLM does not serve DoRA")
        wanted = self.settings.base_model or base_model
        if details.base_model != wanted:
            raise Refusal(
                f"{details.ref} is for base model {details.base_model!r}, this server serves {wanted!r} "
                "(set PEM_VLLM_BASE_MODEL to the registry's name of the served model)"
            )

    # --- the export cache ---------------------------------------------------------------------

    def _cached_folder(self, ref: str, digest: str, config: dict[str, Any]) -> Path:
        """``<cache>/<digest>/<config digest>``, exported on first use and checked against both
        on every use. The digest covers the tensors only: two modules with the same tensors and
        another ``lora_alpha`` are different adapters, so the config is part of the path. A
        damaged file is replaced in place (same content, atomically), never by deleting the
        folder, which vLLM may read at any time."""
        folder = self.settings.cache / digest / canonical_json_digest(config)[:16]
        if folder.is_dir() and self._intact(folder, digest, config):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=self.settings.cache))
        try:
            exported = self._export(ref, digest, staging / "module")
            if file_sha256(exported / WEIGHTS_FILE) != digest:
                raise Refusal(f"the export of sha256:{digest} does not match its digest: run `pem verify --all`")
            if json.loads((exported / CONFIG_FILE).read_text()) != config:
                raise Refusal(f"the export of {ref} does not carry its registered config: run `pem verify {ref}`")
            if not folder.is_dir():
                try:
                    os.rename(exported, folder)  # atomic: the folder appears complete or not at all
                    return folder
                except OSError:
                    if not folder.is_dir():
                        raise
            for name in (CONFIG_FILE, WEIGHTS_FILE):  # repair: same content, so a reader sees either
                os.replace(exported / name, folder / name)
            return folder
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _export(self, ref: str, digest: str, target: Path) -> Path:
        """Export by NS/NAME@VERSION (immutable; a digest can name several modules with the same
        tensors); the caller checks the result against the digest."""
        try:
            return Path(self._registry.export(ref, target))
        except PemError as exc:
            raise Refusal(f"registry error while exporting sha256:{digest}: {exc}") from exc
        except Exception as exc:
            self.close()
            raise Refusal(f"registry unreachable while exporting sha256:{digest}: {first_line(exc)}") from exc

    @staticmethod
    def _intact(folder: Path, digest: str, config: dict[str, Any]) -> bool:
        try:
            on_disk = json.loads((folder / CONFIG_FILE).read_text())
            return on_disk == config and file_sha256(folder / WEIGHTS_FILE) == digest
        except (OSError, ValueError):
            return False


def first_line(exc: BaseException) -> str:
    """A foreign exception's message as one log line (drivers add SQL and links below it)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
