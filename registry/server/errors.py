"""The one table from registry errors to HTTP status codes (the server uses it to answer, the
client to nothing: it rebuilds the error from its type name)."""

from __future__ import annotations

from registry import errors

# Looked up along the error's class hierarchy, nearest class first: UnknownModuleError is a
# NotFoundError (404); RequestTooLargeError is an InvalidRequestError but answers 413.
STATUS = {
    errors.AuthenticationError: 401,
    errors.PermissionDeniedError: 403,
    errors.NotFoundError: 404,
    errors.RequestTooLargeError: 413,
    errors.InvalidRequestError: 422,
    errors.InvalidNameError: 400,
    errors.ExpressionError: 400,
    errors.ConfigurationError: 400,
    errors.AmbiguousReferenceError: 409,
    errors.NameConflictError: 409,
    errors.ModuleInUseError: 409,
    errors.InvalidAdapterError: 422,
    errors.IncompatibleModulesError: 422,
    errors.UnsupportedMethodError: 422,
    errors.HubError: 502,
    errors.BlobStoreError: 503,
    errors.DatabaseError: 503,
    errors.RegistryNotInitializedError: 503,
    errors.SchemaOutdatedError: 503,
    errors.ServerError: 500,
    errors.PemError: 400,
}


def status_for(exc: errors.PemError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_from_json(payload: object, status: int) -> errors.PemError:
    """The PemError an error answer describes: its class by name (a PemError subclass, else
    PemError itself), with the server's one-line message."""
    body = payload.get("error") if isinstance(payload, dict) else None
    name = body.get("type") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, errors.PemError)):
        cls = errors.ServerError if status >= 500 else errors.PemError
    text = message if isinstance(message, str) else f"the server answered HTTP {status}"
    exc = cls.__new__(cls)
    errors.PemError.__init__(exc, text)
    if cls is errors.IncompatibleModulesError or issubclass(cls, errors.IncompatibleModulesError):
        exc.violations = text.split("; ")  # type: ignore[attr-defined]
    return exc
