"""Tokens of the registry server: created and revoked on the server's host (``pem token``),
stored only as their sha256, looked up in constant time per request."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import select

from registry.db.models import ApiToken, utcnow
from registry.errors import AuthenticationError, InvalidNameError, NotFoundError
from registry.refs import _SEGMENT

ROLES = ("reader", "writer", "admin")
TOKEN_PREFIX = "pem_"  # recognisable in a leaked file, so that secret scanners can find it
NAMESPACE_RE = re.compile(_SEGMENT)


class Identity(BaseModel):
    """Who a request comes from: the token's user, role and the namespaces a writer may write
    (empty: every namespace)."""

    user: str
    role: str
    namespaces: list[str] = []


class TokenInfo(BaseModel):
    """A token as ``pem token list`` shows it: never the token, never its hash."""

    id: int
    user: str
    role: str
    namespaces: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class CreatedToken(TokenInfo):
    token: str  # shown once


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(id=row.id, user=row.user, role=row.role, namespaces=list(row.namespaces),
                     created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at)


def create_token(registry, user: str, role: str, namespaces: list[str] | None = None,
                 expires_days: float | None = None) -> CreatedToken:
    if role not in ROLES:
        raise InvalidNameError(f"unknown role {role!r}: use reader, writer or admin")
    if not user or len(user) > 128:
        raise InvalidNameError("a token's user is 1 to 128 characters")
    for namespace in namespaces or []:
        if not NAMESPACE_RE.fullmatch(namespace):
            raise InvalidNameError(f"invalid namespace {namespace!r}: letters, digits, '.', '_', '-'")
    if expires_days is not None and not 0 < expires_days <= 36500:
        raise InvalidNameError("--expires is a number of days between 0 and 36500")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    expires = utcnow() + timedelta(days=expires_days) if expires_days is not None else None
    with registry._write_session() as session:
        row = ApiToken(token_sha256=token_sha256(token), user=user, role=role,
                       namespaces=sorted(set(namespaces or [])), expires_at=expires)
        session.add(row)
        session.flush()
        return CreatedToken(**_info(row).model_dump(), token=token)


def list_tokens(registry) -> list[TokenInfo]:
    with registry._session() as session:
        return [_info(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(registry, token_id: int) -> TokenInfo:
    with registry._write_session() as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"no token with id {token_id}: see `pem token list`")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        session.flush()
        return _info(row)


def authenticate(registry, token: str) -> Identity:
    """The identity of a presented token; AuthenticationError when it is unknown, revoked or
    expired. The lookup is by the token's sha256 (an index lookup reveals nothing about the
    token itself), and the stored hash is compared in constant time."""
    presented = token_sha256(token)
    with registry._read_connection() as connection:  # on every request: one round trip
        row = connection.execute(select(ApiToken).where(ApiToken.token_sha256 == presented)).first()
        if row is None or not hmac.compare_digest(row.token_sha256, presented):
            raise AuthenticationError("unknown token: ask the registry's admin for one (`pem token create`)")
        if row.revoked_at is not None:
            raise AuthenticationError(f"token {row.id} of {row.user} was revoked: ask the registry's admin for a new one")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise AuthenticationError(f"token {row.id} of {row.user} expired on "
                                      f"{row.expires_at.isoformat(timespec='seconds')}: ask for a new one")
        return Identity(user=row.user, role=row.role, namespaces=list(row.namespaces))
