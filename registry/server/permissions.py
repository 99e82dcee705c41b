"""Who may do what: the one permission function of the server.

reader: reads everything. writer: a reader who may also write (add, compose, port, pull, tag,
describe, set and remove aliases, push) in the namespaces named on its token, or in every
namespace when none is named; and record base models (global, append-only). admin: everything,
including rm, gc and verify.
"""

from __future__ import annotations

from enum import Enum

from registry.errors import AuthenticationError, PermissionDeniedError
from registry.server.tokens import Identity


class Right(str, Enum):
    READ = "read"  # any reader
    WRITE = "write"  # writer in the namespace (or admin)
    BASE = "base"  # any writer: base models are global and append-only
    ADMIN = "admin"  # rm, gc, verify


def allowed(identity: Identity | None, right: Right, namespace: str | None = None) -> bool:
    if identity is None:
        return False
    if identity.role == "admin" or right is Right.READ:
        return True
    if identity.role != "writer":
        return False
    if right is Right.BASE:
        return True
    if right is Right.WRITE:
        return not identity.namespaces or namespace in identity.namespaces
    return False


def require(identity: Identity | None, right: Right, namespace: str | None, operation: str,
            public_read: bool = False) -> None:
    """Raise unless ``identity`` may do ``operation``: AuthenticationError (401) without a
    token (reads are open with ``public_read``), PermissionDeniedError (403) naming the missing
    right and the namespace."""
    if identity is None:
        if right is Right.READ and public_read:
            return
        raise AuthenticationError(f"{operation} needs a token: run `pem login URL` or set PEM_TOKEN")
    if allowed(identity, right, namespace):
        return
    where = f" in namespace {namespace}" if namespace else ""
    needed = {
        Right.WRITE: f"the writer role for namespace {namespace}",
        Right.BASE: "the writer role",
        Right.ADMIN: "the admin role",
        Right.READ: "the reader role",
    }[right]
    held = identity.role + (f" for {', '.join(identity.namespaces)}" if identity.namespaces and identity.role == "writer" else "")
    raise PermissionDeniedError(f"{identity.user} may not {operation}{where}: it needs {needed} (token: {held})")
