"""Sessions of the web view: an opaque id in a cookie, stored server-side as its sha256.

A session is opened with a token (the login form) and acts as that token: each request looks
the session up in the database (so every replica knows it, and logout, which deletes the row,
ends it everywhere) and checks the token again (revoking or expiring the token ends its
sessions). The cookie holds only the random session id, never the token.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from registry.db.models import ApiToken, WebSession, utcnow
from registry.server.tokens import Identity, authenticate, token_sha256

SESSION_COOKIE = "pem_session"
CSRF_COOKIE = "pem_csrf"
SESSION_LIFETIME = timedelta(hours=12)


def open_session(registry, token: str) -> tuple[str, datetime, Identity]:
    """Check ``token`` and open a session acting as it: (session id, expiry, identity). The
    session never outlives its token. Expired sessions are deleted on the way."""
    identity = authenticate(registry, token)  # AuthenticationError for unknown, revoked, expired
    session_id = secrets.token_urlsafe(32)  # 256 random bits
    now = utcnow()
    with registry._write_session() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == token_sha256(token))).one()
        expires = min(now + SESSION_LIFETIME, row.expires_at or now + SESSION_LIFETIME)
        session.execute(delete(WebSession).where(WebSession.expires_at <= now))
        session.add(WebSession(session_sha256=token_sha256(session_id), token_id=row.id, created_at=now,
                               expires_at=expires))
    return session_id, expires, identity


def session_identity(registry, session_id: str | None) -> Identity | None:
    """Who a session cookie belongs to; None when there is no such open session or its token
    was revoked or expired."""
    if not session_id or len(session_id) > 128:
        return None
    presented = token_sha256(session_id)
    now = utcnow()
    with registry._read_connection() as connection:  # on every page: one round trip
        found = connection.execute(
            select(WebSession.session_sha256, WebSession.expires_at, ApiToken.user, ApiToken.role,
                   ApiToken.namespaces, ApiToken.revoked_at, ApiToken.expires_at.label("token_expires_at"))
            .join(ApiToken, ApiToken.id == WebSession.token_id)
            .where(WebSession.session_sha256 == presented)
        ).first()
    if found is None or not hmac.compare_digest(found.session_sha256, presented) or found.expires_at <= now:
        return None
    if found.revoked_at is not None or (found.token_expires_at is not None and found.token_expires_at <= now):
        return None
    return Identity(user=found.user, role=found.role, namespaces=list(found.namespaces))


def end_session(registry, session_id: str | None) -> None:
    """Logout: delete the session, wherever it was opened."""
    if session_id:
        with registry._write_session() as session:
            session.execute(delete(WebSession).where(WebSession.session_sha256 == token_sha256(session_id)))


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(cookie: str | None, submitted: str | None) -> bool:
    """The double-submit check: the form's hidden field equals the cookie set with the form.
    Another site can make a browser send the cookie, but cannot read it to fill the field."""
    return bool(cookie) and bool(submitted) and hmac.compare_digest(cookie.encode(), submitted.encode())


def logout_token(session_id: str | None) -> str:
    """The logout form's CSRF field: derived from the session id, which another site cannot
    read (HttpOnly cookie), so it cannot forge the form."""
    return token_sha256("logout:" + session_id) if session_id else ""
