"""Module names and references: the one place where their syntax is defined.

A module is named ``NS/NAME`` and every registration of it gets a version ``1, 2, ...``.
A *reference* picks one registered module:

* ``NS/NAME``           the latest version;
* ``NS/NAME@N``         version ``N``;
* ``NS/NAME@LABEL``     a named alias (reserved for aliases; resolved by the catalog);
* ``sha256:HEX``        the module whose content digest starts with ``HEX`` (8 to 64 hex digits).

The composition language reuses :data:`REFERENCE_PATTERN`, so an expression accepts exactly
the references that the command line does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidNameError

# A name segment: letters, digits, '_', '.', '-', starting and ending with a letter or digit
# (so that `a/b - c/d` never glues a trailing '-' onto a name), no '..' or '--' (the Hub
# forbids them), at most MAX_SEGMENT (96) characters.
MAX_SEGMENT = 96
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_UNBOUNDED_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_SELECTOR = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_DIGEST = r"sha256:[0-9a-fA-F]+"

NAME_PATTERN = rf"{_SEGMENT}/{_SEGMENT}"
REFERENCE_PATTERN = rf"(?:{_DIGEST}|{NAME_PATTERN}(?:@{_SELECTOR})?)"

_NAME_RE = re.compile(rf"({_SEGMENT})/({_SEGMENT})")
_REFERENCE_RE = re.compile(rf"(?:sha256:(?P<digest>[0-9a-fA-F]+)|(?P<ns>{_SEGMENT})/(?P<name>{_SEGMENT})(?:@(?P<sel>{_SELECTOR}))?)")

MIN_DIGEST_PREFIX = 8
MAX_VERSION = 2**31 - 1  # the catalog's version column is a 32-bit integer
NAME_HINT = "names look like 'team/sentiment' (letters, digits, '.', '_', '-')"


@dataclass(frozen=True)
class ModuleName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Reference:
    """A parsed reference. Exactly one of ``module`` and ``digest_prefix`` is set."""

    text: str
    module: ModuleName | None = None
    version: int | None = None
    alias: str | None = None
    digest_prefix: str | None = None

    def __str__(self) -> str:
        return self.text


def shorten(text: str, limit: int = 40) -> str:
    """``text`` cut for a message (a hostile name can be megabytes long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def too_long(kind: str, text: str, limit: int) -> InvalidNameError:
    return InvalidNameError(f"invalid {kind} {shorten(text)!r}: it is {len(text)} characters long; the limit is {limit}")


def _check_length(text: str) -> None:
    """When a name fails to parse only because a part is too long, say so (and the limit)."""
    name = text.strip().partition("@")[0]
    for segment in name.split("/"):
        if len(segment) > MAX_SEGMENT and _UNBOUNDED_SEGMENT.fullmatch(segment):
            kind = "namespace" if "/" in name and segment == name.split("/")[0] else "name"
            raise InvalidNameError(f"invalid module name {shorten(name)!r}: its {kind} is {len(segment)} characters "
                                   f"long; the limit is {MAX_SEGMENT}")


def _check_segments(text: str, *segments: str) -> None:
    for segment in segments:
        if ".." in segment or "--" in segment:
            raise InvalidNameError(f"invalid name {text!r}: '..' and '--' are not allowed; {NAME_HINT}")


def parse_module_name(text: str) -> ModuleName:
    """Parse ``NS/NAME`` (no version): the form an output or a new registration takes."""
    match = _NAME_RE.fullmatch(text.strip())
    if not match:
        _check_length(text)
        raise InvalidNameError(f"invalid module name {text!r}: {NAME_HINT}, without '@version'")
    _check_segments(text, match.group(1), match.group(2))
    return ModuleName(match.group(1), match.group(2))


def number_segment(name: ModuleName) -> str | None:
    """The segment of ``name`` that reads as a number (``2``, ``1e5``, ``nan``, ``inf``), if
    any. New names may not have one, so that ``2*1/2`` can never mean a module."""
    for segment in (name.namespace, name.name):
        try:
            float(segment)
        except ValueError:
            continue
        return segment
    return None


def parse_reference(text: str) -> Reference:
    """Parse a reference to a registered module (see the module docstring for the forms)."""
    stripped = text.strip()
    match = _REFERENCE_RE.fullmatch(stripped)
    if not match:
        _check_length(stripped)
        raise InvalidNameError(
            f"invalid reference {text!r}: use NS/NAME, NS/NAME@VERSION or sha256:HEXPREFIX"
        )
    if match.group("digest") is not None:
        prefix = match.group("digest").lower()
        if len(prefix) < MIN_DIGEST_PREFIX or len(prefix) > 64:
            raise InvalidNameError(
                f"invalid reference {text!r}: a digest prefix needs {MIN_DIGEST_PREFIX} to 64 hex digits"
            )
        return Reference(text=stripped, digest_prefix=prefix)
    _check_segments(text, match.group("ns"), match.group("name"))
    module = ModuleName(match.group("ns"), match.group("name"))
    selector = match.group("sel")
    if selector is None:
        return Reference(text=stripped, module=module)
    if selector.isdigit():
        version = int(selector) if len(selector) <= 10 else MAX_VERSION + 1
        if not 1 <= version <= MAX_VERSION:
            raise InvalidNameError(f"invalid reference {text!r}: versions run from 1 to {MAX_VERSION}")
        return Reference(text=stripped, module=module, version=version)
    return Reference(text=stripped, module=module, alias=selector)


@dataclass(frozen=True)
class BaseReference:
    """A base model as ``ID[@REVISION]`` (``ID`` as on the Hub, e.g. ``meta-llama/Llama-2-7b-hf``)."""

    model_id: str
    revision: str | None

    def __str__(self) -> str:
        return self.model_id + (f"@{self.revision}" if self.revision else "")


_BASE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def parse_base_reference(text: str) -> BaseReference:
    model_id, _, revision = text.strip().partition("@")
    if not _BASE_ID_RE.fullmatch(model_id) or (revision == "" and "@" in text):
        raise InvalidNameError(f"invalid base model {text!r}: use ID or ID@REVISION, e.g. org/model@main")
    return BaseReference(model_id, revision or None)


MAX_ALIAS = 64
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def parse_alias(text: str) -> str:
    """An alias label: starts with a letter (so it is never read as a version number)."""
    if len(text) > MAX_ALIAS and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", text):
        raise too_long("alias", text, MAX_ALIAS)
    if not _ALIAS_RE.fullmatch(text) or ".." in text or "--" in text:
        raise InvalidNameError(f"invalid alias {text!r}: use a letter then letters, digits, '_', '.', '-' (e.g. prod)")
    return text
