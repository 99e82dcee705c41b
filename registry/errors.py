"""Every error the registry raises, in one place.

All of them derive from :class:`PemError`, so callers can catch broadly or narrowly. Each
message is one line that names the thing at fault and, where there is one, the fix. The CLI
prints ``error: <message>`` and exits with :attr:`PemError.exit_code`, never a traceback.
"""

from __future__ import annotations


class PemError(Exception):
    """Base class of every error the registry raises on purpose."""

    exit_code = 1


# --- configuration and database -------------------------------------------------------------


class ConfigurationError(PemError):
    """An environment variable or option has a value the registry cannot use."""


class RegistryNotInitializedError(PemError):
    """The database has no registry schema yet (run ``pem init``)."""


class SchemaOutdatedError(PemError):
    """The database schema is older (or newer) than this version of pem-registry expects."""


class DatabaseError(PemError):
    """The database could not be reached or refused an operation."""


# --- names and references ---------------------------------------------------------------------


class InvalidNameError(PemError):
    """A module name or reference is not of the form ``NS/NAME``, ``NS/NAME@N`` or ``sha256:HEX``."""


class NotFoundError(PemError):
    """Something that was asked for by name does not exist."""


class UnknownModuleError(NotFoundError):
    """No registered module matches a reference."""


class UnknownBaseModelError(NotFoundError):
    """No recorded base model matches ``ID[@REV]`` (record it with ``pem base add``)."""


class AmbiguousReferenceError(PemError):
    """A digest prefix matches more than one module."""


class ModuleInUseError(PemError):
    """A module cannot be removed because other modules were derived from it."""


class ModuleRemovedError(NotFoundError):
    """A module a command had resolved was removed by another process (``pem rm``) before the
    command wrote what refers to it; nothing was written."""


class NameConflictError(PemError):
    """An output name already holds a different module."""


# --- adapter files ----------------------------------------------------------------------------


class InvalidAdapterError(PemError):
    """An adapter folder or file is missing, malformed, unsafe or inconsistent."""


class UnsafeFormatError(InvalidAdapterError):
    """Only a pickle-based weights file was found; the registry never unpickles."""


# --- composition ------------------------------------------------------------------------------


class ExpressionError(PemError):
    """A composition expression is malformed or ill-typed. Messages show the expression with a caret."""


class ExpressionSyntaxError(ExpressionError):
    """The expression does not parse."""


class ExpressionTypeError(ExpressionError):
    """The expression parses but multiplies modules, adds scalars to modules, or divides by zero."""


class IncompatibleModulesError(PemError):
    """The inputs of a composition cannot be combined; ``violations`` lists every reason."""

    def __init__(self, violations: list[str]):
        self.violations = list(violations)
        super().__init__("; ".join(self.violations))


class UnsupportedMethodError(PemError):
    """A composition method is unknown, or does not apply to the inputs' PEFT type."""


# --- the Hub ----------------------------------------------------------------------------------


class HubError(PemError):
    """The Hub refused a request or could not be reached."""


# --- integrity --------------------------------------------------------------------------------


class BlobStoreError(PemError):
    """The blob store is missing a blob, or a blob does not match its digest."""


class CorruptProvenanceError(PemError):
    """The lineage graph has a cycle (a module made, transitively, from itself), which only a
    corrupted catalog can hold; graph queries stop and name it (``pem verify --all`` lists all)."""


# --- the registry server and its clients (``pem serve``) ----------------------------------------


class AuthenticationError(PemError):
    """No token, or a token that is unknown, revoked or expired (HTTP 401)."""


class PermissionDeniedError(PemError):
    """A valid token without the right an operation needs; the message names the right and the namespace (HTTP 403)."""


class InvalidRequestError(PemError):
    """A request the server cannot accept: junk or unknown JSON fields, a body over the limit,
    an upload whose bytes do not match its declared digest, a reused idempotency key (HTTP 4xx)."""


class RequestTooLargeError(InvalidRequestError):
    """A JSON body or a blob upload over the server's configured limit (HTTP 413)."""


class ServerError(PemError):
    """The server failed unexpectedly; the message carries the request id it logged the error under."""


class ServerUnavailableError(PemError):
    """The registry server cannot be reached, or speaks another API version than this client."""


class CorruptBlobError(BlobStoreError):
    """A blob's bytes do not match its digest (a flipped byte, a truncated file): nothing was
    written or registered from it."""


# --- how errors are shown as JSON --------------------------------------------------------------


def error_document(type_name: str, message: str) -> dict[str, dict[str, str]]:
    """The JSON form of an error (``pem ... --json``): ``{"error": {"type", "message"}}``.

    ``type`` is the PemError subclass name (``UsageError`` for a command-line mistake);
    ``message`` is the first line of the message. A multi-line message (an expression error
    with its caret lines) keeps the other lines in ``detail``.
    """
    first, _, rest = message.strip().partition("\n")
    error = {"type": type_name, "message": first}
    if rest:
        error["detail"] = rest
    return {"error": error}
