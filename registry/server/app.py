"""The HTTP API of ``pem serve``: FastAPI routes, each one call into :mod:`registry.api`.

What the server adds is only what a service needs: who is calling (a token, a FastAPI
dependency), whether they may (:func:`registry.server.permissions.require`, called by every
route with its right and namespace), the translation of errors to status codes
(:mod:`registry.server.errors`), limits on what a client may send, idempotency keys, a request
id and an access log. Identity comes from the token: the per-request Registry records the
token's user as owner and author, whatever the client's ``PEM_USER`` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry import __version__, faults
from registry.api.common import WRITE_RECEIPT, WriteReceipt
from registry.config import (
    DEFAULT_SERVER_MAX_BODY,
    DEFAULT_SERVER_MAX_UPLOAD,
    ENV_SERVER_MAX_BODY,
    ENV_SERVER_MAX_UPLOAD,
    server_limit,
    server_public_read,
    server_trust_proxy,
)
from registry.db.models import IdempotencyKey
from registry.errors import (
    AuthenticationError,
    DatabaseError,
    InvalidRequestError,
    NameConflictError,
    NotFoundError,
    PemError,
    RequestTooLargeError,
    ServerError,
)
from registry.refs import parse_module_name
from registry.schemas import SCHEMA_VERSION
from registry.server import API_VERSION
from registry.server.errors import status_for
from registry.server.permissions import Right, require
from registry.server.tokens import Identity, authenticate
from registry.store.checked import check_blob

log = logging.getLogger("pem.server")
access_log = logging.getLogger("pem.server.access")

API = "/api/v1"
UPLOAD_ROUTES = (f"{API}/adapters", f"{API}/pulls")  # streamed bodies: not buffered by RequestContext
UPLOAD_CHUNK = 1024 * 1024
MAX_KEY_LENGTH = 128


@dataclass(frozen=True)
class ServerOptions:
    public_read: bool = False
    max_body: int = 1_000_000  # bytes of a JSON request body
    max_upload: int = 10_000_000_000  # bytes of an uploaded weights file
    trust_proxy: bool = False  # honour X-Forwarded-Proto (the web view's Secure cookies behind a TLS proxy)

    @classmethod
    def from_environment(cls) -> "ServerOptions":
        return cls(
            public_read=server_public_read(),
            max_body=server_limit(ENV_SERVER_MAX_BODY, DEFAULT_SERVER_MAX_BODY),
            max_upload=server_limit(ENV_SERVER_MAX_UPLOAD, DEFAULT_SERVER_MAX_UPLOAD),
            trust_proxy=server_trust_proxy(),
        )


# --- request bodies: unknown fields are refused -----------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UploadMetadata(Body):
    """The first line of an upload (``POST /api/v1/adapters``, ``/api/v1/pulls``); the weights
    file follows."""

    name: str
    config: dict[str, Any]
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_size: int = Field(ge=0)
    task: str | None = None
    tags: dict[str, str] = {}


class PullMetadata(UploadMetadata):
    """An adapter the client downloaded from the Hub at ``commit`` with its own Hub token."""

    endpoint: str = Field(max_length=255)
    repo_id: str = Field(max_length=255)
    revision: str | None = Field(default=None, max_length=255)
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    card: dict[str, Any] = {}
    sidecar: dict[str, Any] | None = None


class AddMetadata(UploadMetadata):
    base_model: str | None = None
    base_revision: str | None = None
    description: str | None = None
    allow_nonfinite: bool = False
    source_path: str | None = Field(default=None, max_length=4096)


class PushRecord(Body):
    ref: str
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")  # what the client downloaded and pushed
    endpoint: str = Field(max_length=255)
    repo_id: str = Field(max_length=255)
    branch: str | None = Field(default=None, max_length=255)
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    weights_oid: str = Field(pattern=r"^[0-9a-f]{40}$")
    changed: bool = True  # False: the branch already held this content, no commit was made


class MergeParameters(Body):
    """The composition method and its parameters, as ``Registry.check`` and ``compose`` take them."""

    method: str = "module"
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    majority_sign: str | None = None
    space: str | None = None


class ComposeRequest(MergeParameters):
    expression: str = Field(max_length=100_000)
    name: str
    dtype: str | None = None
    union: bool = False
    description: str | None = None
    new_version: bool = False


class CheckRequest(MergeParameters):
    expression: str = Field(max_length=100_000)
    dtype: str | None = None
    union: bool = False
    deviation: bool = False


class PortRequest(Body):
    ref: str
    to: str
    name: str


class AliasSetRequest(Body):
    name: str
    alias: str
    version: int = Field(ge=1)


class AliasRemoveRequest(Body):
    name: str
    alias: str


class TagRequest(Body):
    ref: str
    set: dict[str, str] = {}
    remove: list[str] = []


class DescribeRequest(Body):
    ref: str
    description: str | None = Field(default=None, max_length=100_000)


class RemoveRequest(Body):
    ref: str
    dry_run: bool = False


class BaseAddRequest(Body):
    base_model: str
    config: dict[str, Any]


class GcRequest(Body):
    dry_run: bool = False
    grace_seconds: float = Field(default=3600.0, ge=0)


class VerifyRequest(Body):
    ref: str | None = None


# --- answers ----------------------------------------------------------------------------------


def answer(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    """A pydantic result (or a list of them) as JSON, exactly as ``--json`` prints it."""
    return JSONResponse(answer_content(value), status_code=status, headers=headers)


def answer_content(value: Any) -> Any:
    if isinstance(value, list):
        return [item.model_dump(mode="json", by_alias=True) if isinstance(item, BaseModel) else item for item in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return value


def created_answer(info: Any) -> JSONResponse:
    """add, compose, port: the module, with whether this call created it (``X-Pem-Created``)."""
    return answer(info, headers={"X-Pem-Created": "true" if info.created else "false"})


def error_answer(request_id: str, exc: PemError) -> JSONResponse:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return JSONResponse(
        {"error": {"type": type(exc).__name__, "message": message, "request_id": request_id}},
        status_code=status_for(exc),
        headers={"X-Request-ID": request_id},
    )


def _one_line(errors: list[dict[str, Any]]) -> str:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON"
    if where == "body" and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)"
    if kind == "extra_forbidden":
        return f"unknown field {where!r} in the request"
    if kind == "missing":
        return f"missing field {where!r} in the request"
    return f"{where}: {first.get('msg', 'invalid value')}"


# --- the application --------------------------------------------------------------------------


def create_app(registry: Any = None, options: ServerOptions | None = None) -> FastAPI:
    """The ASGI application serving ``registry`` (default: the one the environment names,
    as ``pem serve`` configures it for its workers)."""
    if registry is None:
        from registry import Registry

        registry = Registry.open()
    options = options or ServerOptions.from_environment()
    app = FastAPI(title="pem-registry", version=__version__, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.options = options

    @app.exception_handler(PemError)
    async def pem_error(request: Request, exc: PemError) -> JSONResponse:
        return error_answer(request.state.request_id, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers with this, then re-raises: RequestContext logs it with the request id.
        request_id = request.state.request_id
        return error_answer(request_id, ServerError(f"the server failed (request id {request_id}); its log has the details"))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_answer(request.state.request_id, InvalidRequestError(_one_line(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: PemError = NotFoundError(f"no such route: {request.method} {request.url.path}")
        else:
            error = InvalidRequestError(f"{request.method} {request.url.path}: {exc.detail}")
        response = error_answer(request.state.request_id, error)
        response.status_code = exc.status_code
        return response

    def identity(request: Request) -> Identity | None:
        """The caller, from ``Authorization: Bearer TOKEN``; None without a token."""
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be `Bearer TOKEN`")
        who = authenticate(registry, token.strip())
        request.state.user = who.user
        return who

    def reader(request: Request, who: Identity | None = Depends(identity)) -> Identity | None:
        require(who, Right.READ, None, f"{request.method} {request.url.path}", options.public_read)
        return who

    def caller(who: Identity | None = Depends(identity)) -> Identity:
        if who is None:
            raise AuthenticationError("writes need a token: run `pem login URL` or set PEM_TOKEN")
        return who

    def acting(who: Identity) -> Any:
        """The registry acting as the token's user: it records them as owner and author."""
        return type(registry)(replace(registry.settings, user=who.user), registry.engine, registry.store)

    def namespace_of(ref: str) -> str:
        return parse_module_name(registry.resolve(ref).name).namespace

    # --- open routes ------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/version")
    def version() -> dict[str, Any]:
        return {"api": API_VERSION, "schema": SCHEMA_VERSION, "pem_registry": __version__}

    @app.get(f"{API}/whoami", response_model=Identity)
    def whoami(who: Identity = Depends(caller)) -> Any:
        return answer(who)

    # --- reads ------------------------------------------------------------------------------

    @app.get(f"{API}/modules", dependencies=[Depends(reader)])
    def list_modules(
        base_model: str | None = None, peft_type: str | None = None, task: str | None = None,
        rank: int | None = None, tag: list[str] = Query(default=[]),
        kind: Literal["trained", "derived", "ported", "pulled"] | None = None,
        derived_from: str | None = None, latest: bool = False, search: str | None = None, sort: str = "name",
        descending: bool = False, offset: int = Query(default=0, ge=0), limit: int | None = Query(default=None, ge=1),
    ) -> Any:
        from registry.api import parse_tag

        tags = dict(parse_tag(t) for t in tag)
        return answer(registry.list(base_model=base_model, peft_type=peft_type, task=task, rank=rank, tags=tags,
                                    kind=kind, derived_from=derived_from, latest=latest, search=search, sort=sort,
                                    descending=descending, offset=offset, limit=limit))

    def read_route(path: str, method: Callable[[str], Any]) -> None:
        def route(ref: str) -> Any:
            return answer(method(ref))

        route.__name__ = path.strip("/").replace("-", "_")
        app.get(f"{API}/{path}", dependencies=[Depends(reader)])(route)

    read_route("module", registry.get)
    read_route("resolve", registry.resolve)
    read_route("lineage", registry.lineage)
    read_route("descendants", registry.descendants)
    read_route("contents", registry.contents)
    read_route("history", registry.history)

    @app.get(f"{API}/aliases", dependencies=[Depends(reader)])
    def list_aliases(name: str | None = None) -> Any:
        return answer(registry.list_aliases(name))

    @app.get(f"{API}/complete", dependencies=[Depends(reader)])
    def complete_reference(prefix: str, limit: int = Query(default=100, ge=1, le=1000)) -> Any:
        return answer(registry.complete_reference(prefix, limit))

    @app.get(f"{API}/alias-log", dependencies=[Depends(reader)])
    def alias_log(name: str) -> Any:
        return answer(registry.alias_log(name))

    @app.get(f"{API}/bases", dependencies=[Depends(reader)])
    def list_bases() -> Any:
        return answer(registry.list_bases())

    @app.get(f"{API}/base", dependencies=[Depends(reader)])
    def get_base(id: str) -> Any:
        return answer(registry.get_base(id))

    @app.get(f"{API}/port-check", dependencies=[Depends(reader)])
    def check_port(ref: str, to: str) -> Any:
        return answer(registry.check_port(ref, to))

    @app.post(f"{API}/check", dependencies=[Depends(reader)])
    def check(body: CheckRequest) -> Any:
        return answer(registry.check(**body.model_dump()))

    @app.get(f"{API}/blobs/{{digest}}", dependencies=[Depends(reader)])
    def blob(digest: str) -> Any:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not registry.store.exists(digest):
            raise NotFoundError(f"no blob sha256:{digest[:64]}")
        # Checked before it is sent (the client checks again): a damaged copy is a clear 503
        # naming the blob, not a download that fails its check on the client.
        check_blob(registry.store, f"sha256:{digest[:12]}", digest, None)
        return FileResponse(registry.store.local_path(digest), media_type="application/octet-stream",
                            headers={"X-Pem-Digest": digest})

    # --- writes -----------------------------------------------------------------------------

    async def receive_upload(request: Request, who: Identity, kind: type[UploadMetadata], operation: str,
                             register: Callable[[Any, Path, Any], Any]) -> JSONResponse:
        """One streamed body, a JSON line of metadata then the weights file, staged in a
        temporary folder (removed whatever happens) and registered by ``register``."""
        metadata = await _read_metadata_line(request, options.max_body, kind)
        require(who, Right.WRITE, parse_module_name(metadata.name).namespace, operation)
        folder = Path(tempfile.mkdtemp(prefix="pem-upload-"))
        try:
            await _receive_weights(request, folder, metadata, options.max_upload)
            (folder / "adapter_config.json").write_text(json.dumps(metadata.config), encoding="utf-8")
            info = await run_in_threadpool(register, acting(who), folder, metadata)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return created_answer(info)

    @app.post(UPLOAD_ROUTES[0])
    async def add(request: Request, who: Identity = Depends(caller)) -> Any:
        """``pem add``."""
        def register(reg: Any, folder: Path, m: AddMetadata) -> Any:
            return reg.add(folder, m.name, task=m.task, tags=m.tags, base_model=m.base_model,
                           base_revision=m.base_revision, description=m.description,
                           allow_nonfinite=m.allow_nonfinite, source_path=m.source_path)

        return await receive_upload(request, who, AddMetadata, "add modules", register)

    @app.post(UPLOAD_ROUTES[1])
    async def pull(request: Request, who: Identity = Depends(caller)) -> Any:
        """``pem pull`` through the server: the client downloaded from the Hub; the server
        records the repo, commit and file digests, and the token's user as owner."""
        from registry.schemas import ProvenanceSidecar

        def register(reg: Any, folder: Path, m: PullMetadata) -> Any:
            try:
                sidecar = ProvenanceSidecar.model_validate(m.sidecar) if m.sidecar is not None else None
            except ValueError:
                raise InvalidRequestError("the pulled provenance sidecar does not match its schema") from None
            return reg.register_pulled(folder, m.name, endpoint=m.endpoint, repo_id=m.repo_id, revision=m.revision,
                                       commit=m.commit, card=m.card, sidecar=sidecar, task=m.task, tags=m.tags)

        return await receive_upload(request, who, PullMetadata, "pull modules", register)

    @app.get(f"{API}/hub-links", dependencies=[Depends(reader)])
    def hub_links() -> Any:
        return answer(registry.hub_links())

    @app.get(f"{API}/push-bundle", dependencies=[Depends(reader)])
    def push_bundle(ref: str) -> Any:
        return answer(registry.push_bundle(ref))

    @app.post(f"{API}/pushes")
    def record_push(body: PushRecord, who: Identity = Depends(caller)) -> Any:
        require(who, Right.WRITE, namespace_of(body.ref), "push modules")
        return answer(acting(who).record_push(body.ref, digest=body.digest, endpoint=body.endpoint, repo_id=body.repo_id,
                                              branch=body.branch, commit=body.commit, weights_oid=body.weights_oid,
                                              changed=body.changed))

    @app.post(f"{API}/compose")
    def compose(body: ComposeRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.WRITE, parse_module_name(body.name).namespace, "compose modules")
        fields = body.model_dump()
        return created_answer(acting(who).compose(fields.pop("expression"), fields.pop("name"), **fields))

    @app.post(f"{API}/port")
    def port(body: PortRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.WRITE, parse_module_name(body.name).namespace, "port modules")
        return created_answer(acting(who).port(body.ref, body.to, body.name))

    @app.post(f"{API}/bases")
    def add_base(body: BaseAddRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.BASE, None, "record base models")
        with tempfile.TemporaryDirectory(prefix="pem-base-") as tmp:
            config_path = Path(tmp) / "config.json"
            config_path.write_text(json.dumps(body.config), encoding="utf-8")
            return answer(acting(who).add_base(body.base_model, config_path=config_path))

    @app.post(f"{API}/aliases/set")
    def set_alias(request: Request, body: AliasSetRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.WRITE, parse_module_name(body.name).namespace, "set aliases")
        return idempotent(request, who, body, lambda: acting(who).set_alias(body.name, body.alias, body.version))

    @app.post(f"{API}/aliases/remove")
    def remove_alias(request: Request, body: AliasRemoveRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.WRITE, parse_module_name(body.name).namespace, "remove aliases")
        return idempotent(request, who, body, lambda: acting(who).remove_alias(body.name, body.alias))

    @app.post(f"{API}/tag")
    def tag(request: Request, body: TagRequest, who: Identity = Depends(caller)) -> Any:
        def apply() -> Any:
            require(who, Right.WRITE, namespace_of(body.ref), "tag modules")
            return acting(who).tag(body.ref, body.set, body.remove)

        return idempotent(request, who, body, apply)

    @app.post(f"{API}/describe")
    def describe(request: Request, body: DescribeRequest, who: Identity = Depends(caller)) -> Any:
        def apply() -> Any:
            require(who, Right.WRITE, namespace_of(body.ref), "describe modules")
            return acting(who).describe(body.ref, body.description)

        return idempotent(request, who, body, apply)

    @app.post(f"{API}/remove")
    def remove(request: Request, body: RemoveRequest, who: Identity = Depends(caller)) -> Any:
        def apply() -> Any:
            require(who, Right.ADMIN, namespace_of(body.ref), "remove modules")
            return acting(who).remove(body.ref, dry_run=body.dry_run)

        return idempotent(request, who, body, apply)

    @app.post(f"{API}/gc")
    def gc(body: GcRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.ADMIN, None, "collect garbage")
        return answer(acting(who).gc(dry_run=body.dry_run, grace_seconds=body.grace_seconds))

    @app.post(f"{API}/verify")
    def verify(body: VerifyRequest, who: Identity = Depends(caller)) -> Any:
        require(who, Right.ADMIN, None, "verify modules")
        return answer(acting(who).verify(body.ref))

    def idempotent(request: Request, who: Identity, body: Body, apply: Callable[[], Any]) -> JSONResponse:
        """Run a write once per ``Idempotency-Key`` (per user). The key and the write's answer
        are committed in the write's own transaction (a :class:`WriteReceipt`), so they are
        stored exactly when the write happened: a retry with the same key and request gets the
        stored answer, whatever crashed in between; the same key with another request is refused."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return answer(apply())
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidRequestError(f"an Idempotency-Key is 1 to {MAX_KEY_LENGTH} characters")
        fingerprint = hashlib.sha256(f"{request.url.path}\n{body.model_dump_json()}".encode()).hexdigest()
        stored = _stored_answer(registry, who.user, key)
        if stored is None:
            record = IdempotencyKey(user=who.user, key=key, request_sha256=fingerprint, status=0, response={})

            def add_rows(session: Any, value: Any) -> None:
                if value is not None:
                    record.status, record.response = 200, answer_content(value)
                session.add(record)

            receipt = WriteReceipt(add_rows)
            pending = WRITE_RECEIPT.set(receipt)
            try:
                content = answer_content(apply())
            except (IntegrityError, DatabaseError):  # a concurrent retry with the same key committed first
                stored = _stored_answer(registry, who.user, key)
                if stored is None:
                    raise
            finally:
                WRITE_RECEIPT.reset(pending)
            if stored is None:
                faults.point("idempotent-applied")
                return JSONResponse(content)
        if stored.request_sha256 != fingerprint:
            raise InvalidRequestError(f"Idempotency-Key {key!r} was already used for another request: use a new key")
        if stored.status == 0:  # a write that does not name its answer (a bug): say it was applied
            raise NameConflictError(f"the request with Idempotency-Key {key!r} was applied, but its answer was not "
                                    "stored: check the result instead of retrying")
        return JSONResponse(stored.response, status_code=stored.status, headers={"X-Pem-Replayed": "true"})

    from registry.server.web.pages import install as install_web

    install_web(app, registry, options)
    return RequestContext(app, options)


def _stored_answer(registry: Any, user: str, key: str) -> Any:
    with registry._session() as session:
        return session.scalars(select(IdempotencyKey).where(IdempotencyKey.user == user, IdempotencyKey.key == key)).first()


async def _read_metadata_line(request: Request, limit: int, kind: type[UploadMetadata]) -> Any:
    """The upload's first line (JSON metadata, at most ``limit`` bytes); the stream's remaining
    bytes are kept on the request for :func:`_receive_weights`."""
    buffered = b""
    stream = request.stream()
    async for chunk in stream:
        buffered += chunk
        if b"\n" in buffered:
            break
        if len(buffered) > limit:
            raise RequestTooLargeError(f"the upload's metadata line is over {limit} bytes")
    line, newline, rest = buffered.partition(b"\n")
    if not newline:
        raise InvalidRequestError("an upload starts with a line of JSON metadata, then the weights file")
    if len(line) > limit:
        raise RequestTooLargeError(f"the upload's metadata line is over {limit} bytes")
    request.state.upload_stream = (rest, stream)
    try:
        return kind.model_validate_json(line)
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else []
        raise InvalidRequestError(_one_line(list(errors))) from None


async def _receive_weights(request: Request, folder: Path, metadata: UploadMetadata, limit: int) -> None:
    """Stream the weights into ``folder`` (never held in memory), refusing more than ``limit``
    bytes, and check their size and sha256 against the declared ones."""
    if metadata.weights_size > limit:
        raise RequestTooLargeError(f"the weights are {metadata.weights_size} bytes; this server accepts at most {limit}")
    rest, stream = request.state.upload_stream
    digest = hashlib.sha256()
    received = 0
    with open(folder / "adapter_model.safetensors", "wb") as f:
        async for chunk in _chain(rest, stream):
            received += len(chunk)
            if received > limit:
                raise RequestTooLargeError(f"the upload is over this server's limit of {limit} bytes")
            digest.update(chunk)
            f.write(chunk)
    if received != metadata.weights_size:
        raise InvalidRequestError(f"the upload stopped after {received} of {metadata.weights_size} bytes: nothing was registered")
    if digest.hexdigest() != metadata.weights_sha256:
        raise InvalidRequestError(
            f"the uploaded weights hash to sha256:{digest.hexdigest()[:12]}, not the declared "
            f"sha256:{metadata.weights_sha256[:12]}: nothing was registered; upload again"
        )


async def _chain(first: bytes, stream: Any) -> Any:
    if first:
        yield first
    async for chunk in stream:
        if chunk:
            yield chunk


class RequestContext:
    """The outermost layer: a request id for every request (``X-Request-ID``), the JSON body
    limit, unexpected errors answered as JSON and logged with the id, and one access-log line
    per request (user, method, route, status, milliseconds; never a header, so never a token)."""

    def __init__(self, app: FastAPI, options: ServerOptions):
        self.app = app
        self.options = options

    def __getattr__(self, name: str) -> Any:  # app.state, app.openapi(), ... for tests and tools
        return getattr(self.app, name)

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if scope["path"] not in UPLOAD_ROUTES and scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffered_body(scope, receive)
            await self.app(scope, receive, send_with_id)
        except RequestTooLargeError as exc:
            await _send_json(send_with_id, error_answer(request_id, exc))
        except Exception:
            log.exception("request %s failed: %s %s", request_id, scope["method"], scope["path"])
            if not status["sent"]:
                await _send_json(send_with_id, error_answer(
                    request_id, ServerError(f"the server failed (request id {request_id}); its log has the details")))
        finally:
            access_log.info(
                "user=%s method=%s route=%s status=%s ms=%.1f request_id=%s",
                state.get("user", "-"), scope["method"], scope["path"], status["code"],
                (time.perf_counter() - started) * 1000, request_id,
            )

    async def _buffered_body(self, scope: dict[str, Any], receive: Callable[..., Any]) -> Callable[..., Any]:
        """Read a JSON body up to the limit (refusing it at once when Content-Length is over),
        then hand it to the application."""
        limit = self.options.max_body
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise RequestTooLargeError(f"the request body is {int(value)} bytes; this server accepts at most {limit}")
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise RequestTooLargeError(f"the request body is over this server's limit of {limit} bytes")
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_json(send: Callable[..., Any], response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def configure_logging() -> None:
    """Access and error lines on stderr, one per event, with a timestamp."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("pem.server")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def environment_app() -> Any:
    """The factory ``pem serve`` gives uvicorn (``--workers`` needs an import string)."""
    configure_logging()
    return create_app()
