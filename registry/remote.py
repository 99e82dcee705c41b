"""The client of a registry server (``pem serve``): the same methods and results as
:class:`registry.Registry`, over HTTP.

>>> from registry import Registry
>>> reg = Registry.open("http://registry.internal:8080", token="pem_...")
>>> reg.compose("0.5*team/a + 0.5*team/b", "team/ab").ref
'team/ab@1'

There is no local database: every call is one request, and the server computes compositions,
ports and verification next to the data. Blobs read by ``export`` and ``push`` stream into
the local read cache (``$PEM_HOME/cache``, the one an ``s3://`` store uses), checked against
their digest.
Uploads (``add``) stream the weights file; the server checks it against the declared sha256
before registering it. Writes that are not idempotent by content (alias set and remove, tag,
describe, remove) carry an ``Idempotency-Key``, so the one retry after a lost answer is safe.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlencode, urlsplit

from pydantic import BaseModel

from registry import schemas
from registry.config import (
    CACHE_DIRNAME,
    CREDENTIALS_FILENAME,
    DEFAULT_HOME,
    ENV_HOME,
    ENV_HUB_ENDPOINT,
    ENV_TOKEN,
    DEFAULT_HUB_ENDPOINT,
    cache_size_limit,
)
from registry.errors import (
    PemError,
    ServerUnavailableError,
)
from registry.server import API_VERSION

M = TypeVar("M", bound=BaseModel)

API = "/api/v1"
CHUNK = 1024 * 1024
TIMEOUT_S = 600.0  # a composition or verification of large modules takes a while
RETRIED_ERRORS = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, TimeoutError)


def client_home(home: str | os.PathLike[str] | None = None) -> Path:
    return Path(home or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser().absolute()


def credentials_file(home: str | os.PathLike[str] | None = None) -> Path:
    return client_home(home) / CREDENTIALS_FILENAME


def stored_token(url: str, home: str | os.PathLike[str] | None = None) -> str | None:
    """The token ``pem login`` stored for ``url``, if any."""
    path = credentials_file(home)
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = tokens.get(url.rstrip("/")) if isinstance(tokens, dict) else None
    return value if isinstance(value, str) else None


def store_token(url: str, token: str, home: str | os.PathLike[str] | None = None) -> Path:
    """Save ``token`` for ``url`` in the credentials file, readable by its owner only (0600)."""
    path = credentials_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
        tokens = tokens if isinstance(tokens, dict) else {}
    except (OSError, ValueError):
        tokens = {}
    tokens[url.rstrip("/")] = token
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(tokens, f, indent=2)
    os.replace(tmp, path)
    return path


class RemoteRegistry:
    """A registry server, used like :class:`registry.Registry` (same methods, same results)."""

    def __init__(self, url: str, *, token: str | None = None, home: str | os.PathLike[str] | None = None,
                 check_version: bool = True):
        urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()]
        self.replicas = [urlsplit(u) for u in urls]
        if not self.replicas or any(p.scheme not in ("http", "https") or not p.hostname for p in self.replicas):
            raise ServerUnavailableError(f"{url!r} is not a registry URL: use http://HOST:PORT (or several, comma-separated)")
        self.url = urls[0]
        self._parts = self.replicas[0]
        self._current = 0  # the replica requests go to; the next one after a connection failure
        self.home = client_home(home)
        self.token = token or os.environ.get(ENV_TOKEN) or stored_token(self.url, self.home)
        self._cache: Any = None
        if check_version:
            self.check_version()

    # --- plumbing -------------------------------------------------------------------------

    def _connection(self, replica: Any) -> http.client.HTTPConnection:
        if replica.scheme == "https":
            return http.client.HTTPSConnection(replica.hostname, replica.port, timeout=TIMEOUT_S)
        return http.client.HTTPConnection(replica.hostname, replica.port, timeout=TIMEOUT_S)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "pem-registry-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _send(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None,
              headers: dict[str, str] | None = None, upload: tuple[bytes, Path, int] | None = None,
              retries: int = 0) -> http.client.HTTPResponse:
        """One request; the open response when its status is 2xx, else its error raised.
        ``retries``: how many times to resend after the connection failed (only for requests
        that are safe to repeat: reads, writes idempotent by content, writes with an
        idempotency key). With several replicas, each failure moves to the next one."""
        query = "?" + urlencode([(k, v) for k, v in (params or {}).items() if v is not None], doseq=True) if params else ""
        all_headers = self._headers(headers)
        attempts = retries + len(self.replicas)
        for attempt in range(attempts):
            replica = self.replicas[self._current]
            target = replica.path.rstrip("/") + path + query
            connection = self._connection(replica)
            try:
                if upload is not None:
                    response = self._stream_upload(connection, target, all_headers, *upload)
                else:
                    data = None
                    if body is not None:
                        data = json.dumps(body).encode()
                        all_headers["Content-Type"] = "application/json"
                    connection.request(method, target, body=data, headers=all_headers)
                    response = connection.getresponse()
            except RETRIED_ERRORS + (OSError,) as exc:
                connection.close()
                self._current = (self._current + 1) % len(self.replicas)
                refused = isinstance(exc, ConnectionRefusedError)  # never reached the server: always safe to resend
                if attempt < attempts - 1 and (refused or (retries and isinstance(exc, RETRIED_ERRORS))):
                    continue
                reason = getattr(exc, "strerror", None) or exc.__class__.__name__
                raise ServerUnavailableError(
                    f"cannot reach the registry server at {replica.scheme}://{replica.netloc} ({reason}): "
                    "is `pem serve` running there?"
                ) from None
            if response.status >= 400:
                raise self._error(response)
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _stream_upload(connection: http.client.HTTPConnection, target: str, headers: dict[str, str],
                       first_line: bytes, weights: Path, size: int) -> http.client.HTTPResponse:
        connection.putrequest("POST", target)
        for key, value in {**headers, "Content-Type": "application/x-pem-upload",
                           "Content-Length": str(len(first_line) + size)}.items():
            connection.putheader(key, value)
        connection.endheaders()
        try:
            connection.send(first_line)
            with open(weights, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    connection.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early (a 4xx): its answer is still there to read
        return connection.getresponse()

    def _error(self, response: http.client.HTTPResponse) -> PemError:
        from registry.server.errors import error_from_json

        raw = response.read()
        response.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        return error_from_json(payload, response.status)

    def _json(self, method: str, path: str, **kwargs: Any) -> tuple[Any, http.client.HTTPResponse]:
        if method == "GET":
            kwargs.setdefault("retries", 1)
        response = self._send(method, path, **kwargs)
        try:
            return json.loads(response.read()), response
        finally:
            response.close()

    def _get(self, model: type[M], path: str, **params: Any) -> M:
        return model.model_validate(self._json("GET", path, params=params)[0])

    def _get_list(self, model: type[M], path: str, **params: Any) -> list[M]:
        return [model.model_validate(item) for item in self._json("GET", path, params=params)[0]]

    def _post(self, model: type[M], path: str, body: dict[str, Any], idempotent: bool = False) -> M:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent else None
        data, _ = self._json("POST", path, body=body, headers=headers, retries=1 if idempotent else 0)
        return model.model_validate(data)

    def _created(self, data: Any, response: http.client.HTTPResponse) -> schemas.ModuleInfo:
        info = schemas.ModuleInfo.model_validate(data)
        return info.model_copy(update={"created": response.getheader("X-Pem-Created") == "true"})

    def check_version(self) -> dict[str, Any]:
        """The server's versions; ServerUnavailableError when its API is not this client's."""
        info, _ = self._json("GET", f"{API}/version")
        if info.get("api") != API_VERSION:
            older = "this client" if info.get("api", 0) > API_VERSION else "the server"
            raise ServerUnavailableError(
                f"the registry server at {self.url} speaks API v{info.get('api')} (pem-registry "
                f"{info.get('pem_registry')}), this client v{API_VERSION}: upgrade pem-registry on {older}"
            )
        return info

    def whoami(self) -> dict[str, Any]:
        return self._json("GET", f"{API}/whoami")[0]

    def close(self) -> None:
        pass

    def __enter__(self) -> "RemoteRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the catalog ----------------------------------------------------------------------

    def add(self, path: str | os.PathLike[str], name: str, *, task: str | None = None,
            tags: dict[str, str] | None = None, base_model: str | None = None, base_revision: str | None = None,
            description: str | None = None, allow_nonfinite: bool = False) -> schemas.ModuleInfo:
        folder = Path(path)
        return self._upload("adapters", folder, name, task=task, tags=tags or {}, base_model=base_model,
                            base_revision=base_revision, description=description, allow_nonfinite=allow_nonfinite,
                            source_path=str(folder.absolute()))

    def _upload(self, route: str, folder: Path, name: str, **fields: Any) -> schemas.ModuleInfo:
        """Stream an adapter folder to the server: a JSON line (the config, the weights' size
        and sha256, ``fields``), then the weights file, never read whole into memory."""
        from registry.api.common import WEIGHTS_FILE, file_sha256, read_adapter_folder

        config, _ = read_adapter_folder(folder)  # the same checks and messages as a local add
        weights = folder / WEIGHTS_FILE
        size = weights.stat().st_size
        metadata = {"name": name, "config": config, "weights_sha256": file_sha256(weights), "weights_size": size,
                    **fields}
        line = json.dumps(metadata).encode() + b"\n"
        # The same content under the same name is one version: a retry is safe.
        data, response = self._json("POST", f"{API}/{route}", upload=(line, weights, size), retries=1)
        return self._created(data, response)

    def list(self, *, base_model: str | None = None, peft_type: str | None = None, task: str | None = None,
             rank: int | None = None, tags: dict[str, str] | None = None, kind: str | None = None,
             derived_from: str | None = None, latest: bool = False, search: str | None = None, sort: str = "name",
             descending: bool = False, offset: int = 0, limit: int | None = None) -> list[schemas.ModuleInfo]:
        return self._get_list(
            schemas.ModuleInfo, f"{API}/modules", base_model=base_model, peft_type=peft_type, task=task, rank=rank,
            tag=[f"{k}={v}" for k, v in (tags or {}).items()], kind=kind, derived_from=derived_from,
            latest="true" if latest else None, search=search, sort=None if sort == "name" else sort,
            descending="true" if descending else None, offset=offset or None, limit=limit,
        )

    def get(self, ref: str) -> schemas.ModuleDetails:
        return self._get(schemas.ModuleDetails, f"{API}/module", ref=ref)

    def resolve(self, ref: str) -> schemas.ModuleInfo:
        return self._get(schemas.ModuleInfo, f"{API}/resolve", ref=ref)

    def export(self, ref: str, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
        from registry.api.catalog import check_export_target, write_adapter_folder

        target = check_export_target(directory, force)
        details = self.get(ref)
        return write_adapter_folder(target, details.config, self.blob(details.digest))

    def remove(self, ref: str, *, dry_run: bool = False) -> schemas.Removal:
        return self._post(schemas.Removal, f"{API}/remove", {"ref": ref, "dry_run": dry_run}, idempotent=True)

    def complete_reference(self, prefix: str, limit: int = 100) -> list[str]:
        return self._json("GET", f"{API}/complete", params={"prefix": prefix, "limit": limit})[0]

    def blob(self, digest: str) -> Path:
        """The blob ``digest`` as a local file: from the read cache, else downloaded (streamed)
        and checked against its digest before it enters the cache."""
        cached = self.cache.lookup(digest)
        if cached is not None:
            return cached

        def download(sink: Any) -> None:
            response = self._send("GET", f"{API}/blobs/{digest}", retries=1)
            try:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    sink.write(chunk)
            finally:
                response.close()

        return self.cache.fetch(digest, download, self.url)

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from registry.store.cache import BlobCache

            # Content-addressed and checked by digest: one cache serves every server and bucket.
            self._cache = BlobCache(self.home / CACHE_DIRNAME, cache_size_limit())
        return self._cache

    def cache_info(self) -> Any:
        return self.cache.info()

    def cache_clear(self) -> Any:
        return self.cache.clear()

    # --- composition, provenance, porting --------------------------------------------------

    def check(self, expression: str, *, method: str = "module", rank: int | None = None, density: float | None = None,
              seed: int | None = None, majority_sign: str | None = None, space: str | None = None,
              dtype: str | None = None, union: bool = False, deviation: bool = False) -> schemas.CheckReport:
        body = {"expression": expression, "method": method, "rank": rank, "density": density, "seed": seed,
                "majority_sign": majority_sign, "space": space, "dtype": dtype, "union": union, "deviation": deviation}
        return schemas.CheckReport.model_validate(self._json("POST", f"{API}/check", body=body, retries=1)[0])

    def compose(self, expression: str, name: str, *, method: str = "module", rank: int | None = None,
                density: float | None = None, seed: int | None = None, majority_sign: str | None = None,
                space: str | None = None, dtype: str | None = None, union: bool = False,
                description: str | None = None, new_version: bool = False,
                progress: Callable[[int, int], None] | None = None) -> schemas.ModuleInfo:
        body = {"expression": expression, "name": name, "method": method, "rank": rank, "density": density,
                "seed": seed, "majority_sign": majority_sign, "space": space, "dtype": dtype, "union": union,
                "description": description, "new_version": new_version}
        # The same derivation asked again returns the module it made: a retry is safe.
        return self._created(*self._json("POST", f"{API}/compose", body=body, retries=1))

    def lineage(self, ref: str) -> schemas.Lineage:
        return self._get(schemas.Lineage, f"{API}/lineage", ref=ref)

    def descendants(self, ref: str) -> list[schemas.Descendant]:
        return self._get_list(schemas.Descendant, f"{API}/descendants", ref=ref)

    def contents(self, ref: str) -> schemas.Contents:
        return self._get(schemas.Contents, f"{API}/contents", ref=ref)

    def verify(self, ref: str | None = None, *, progress: Callable[[int, int], None] | None = None) -> schemas.VerifyReport:
        return self._post(schemas.VerifyReport, f"{API}/verify", {"ref": ref})

    def add_base(self, base: str, *, config_path: str | os.PathLike[str] | None = None,
                 endpoint: str | None = None) -> schemas.BaseModelInfo:
        """Record a base model; its config.json is read here (or downloaded here from the Hub,
        with this machine's Hub access) and sent to the server."""
        if config_path is None:
            from registry.hub import download_config
            from registry.refs import parse_base_reference

            reference = parse_base_reference(base)
            hub = (endpoint or os.environ.get(ENV_HUB_ENDPOINT) or DEFAULT_HUB_ENDPOINT).rstrip("/")
            config_path = download_config(reference.model_id, reference.revision, hub)
        from registry import hosts

        config = hosts.read_config(Path(config_path))
        return self._post(schemas.BaseModelInfo, f"{API}/bases", {"base_model": base, "config": config})

    def list_bases(self) -> list[schemas.BaseModelInfo]:
        return self._get_list(schemas.BaseModelInfo, f"{API}/bases")

    def get_base(self, base: str) -> schemas.BaseModelInfo:
        return self._get(schemas.BaseModelInfo, f"{API}/base", id=base)

    def check_port(self, ref: str, to: str) -> schemas.PortReport:
        return self._get(schemas.PortReport, f"{API}/port-check", ref=ref, to=to)

    def port(self, ref: str, to: str, name: str) -> schemas.ModuleInfo:
        return self._created(*self._json("POST", f"{API}/port", body={"ref": ref, "to": to, "name": name}, retries=1))

    # --- team -------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> schemas.AliasInfo:
        return self._post(schemas.AliasInfo, f"{API}/aliases/set", {"name": name, "alias": alias, "version": version},
                          idempotent=True)

    def remove_alias(self, name: str, alias: str) -> schemas.AliasInfo:
        return self._post(schemas.AliasInfo, f"{API}/aliases/remove", {"name": name, "alias": alias}, idempotent=True)

    def list_aliases(self, name: str | None = None) -> list[schemas.AliasInfo]:
        return self._get_list(schemas.AliasInfo, f"{API}/aliases", name=name)

    def alias_log(self, name: str) -> list[schemas.AliasMove]:
        return self._get_list(schemas.AliasMove, f"{API}/alias-log", name=name)

    def tag(self, ref: str, set_tags: dict[str, str] | None = None, remove: list[str] | None = None) -> schemas.ModuleInfo:
        return self._post(schemas.ModuleInfo, f"{API}/tag", {"ref": ref, "set": set_tags or {}, "remove": remove or []},
                          idempotent=True)

    def describe(self, ref: str, description: str | None) -> schemas.ModuleInfo:
        return self._post(schemas.ModuleInfo, f"{API}/describe", {"ref": ref, "description": description},
                          idempotent=True)

    def history(self, ref: str) -> list[schemas.MetadataChange]:
        return self._get_list(schemas.MetadataChange, f"{API}/history", ref=ref)

    def gc(self, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> schemas.GcReport:
        return self._post(schemas.GcReport, f"{API}/gc", {"dry_run": dry_run, "grace_seconds": grace_seconds})

    def pull(self, repo: str, *, name: str | None = None, task: str | None = None,
             tags: dict[str, str] | None = None, endpoint: str | None = None) -> schemas.ModuleInfo:
        """Download the adapter at ``REPO_ID[@REVISION]`` here, pinned to the commit the
        revision resolves to (with this machine's Hub token, which never reaches the server),
        and upload it; the server records the repo, commit, file digests and who pulled."""
        import tempfile

        from registry import hub

        repo_id, revision = hub.parse_repo_reference(repo)
        endpoint = self._hub_endpoint(endpoint)
        commit, names = hub.resolve(repo_id, revision, endpoint)
        with tempfile.TemporaryDirectory(prefix="pem-pull-") as tmp:
            files = hub.download(repo_id, commit, names, endpoint, Path(tmp))
            sidecar = files.sidecar.model_dump(mode="json", by_alias=True) if files.sidecar is not None else None
            return self._upload("pulls", Path(tmp), name or hub.default_name(repo_id), task=task, tags=tags or {},
                                endpoint=endpoint, repo_id=repo_id, revision=revision, commit=commit,
                                card=files.card, sidecar=sidecar)

    def push(self, ref: str, repo: str, *, private: bool = False, branch: str | None = None,
             message: str | None = None, endpoint: str | None = None) -> schemas.PushResult:
        """Download the module from the server (checked by digest), push it to the Hub from
        here with this machine's Hub token, and record the link on the server."""
        import tempfile

        from registry import hub
        from registry.errors import InvalidNameError

        repo_id, revision = hub.parse_repo_reference(repo)
        if revision:
            raise InvalidNameError(f"push takes a repo id without @revision: use --branch {revision}")
        endpoint = self._hub_endpoint(endpoint)
        bundle = self._get(schemas.PushBundle, f"{API}/push-bundle", ref=ref)
        weights = self.blob(bundle.digest)
        with tempfile.TemporaryDirectory(prefix="pem-push-") as tmp:
            hub.stage_push(Path(tmp), bundle.config, weights, bundle.card, bundle.sidecar)
            commit, changed = hub.upload(endpoint, repo_id, Path(tmp), private=private, branch=branch,
                                         message=message or f"pem-registry: push {bundle.ref}")
            weights_oid = hub.git_blob_oid(Path(tmp) / "adapter_model.safetensors")
        record = {"ref": bundle.ref, "digest": bundle.digest, "endpoint": endpoint, "repo_id": repo_id,
                  "branch": branch, "commit": commit, "weights_oid": weights_oid, "changed": changed}
        return self._post(schemas.PushResult, f"{API}/pushes", record, idempotent=True)

    @staticmethod
    def _hub_endpoint(endpoint: str | None) -> str:
        return (endpoint or os.environ.get(ENV_HUB_ENDPOINT) or DEFAULT_HUB_ENDPOINT).rstrip("/")

    def sync(self, *, pull: bool = False, endpoint: str | None = None) -> list[schemas.SyncStatus]:
        """Compare the server's Hub links with the Hub, asked from here (this machine's Hub
        access); ``pull`` pulls new commits through :meth:`pull`."""
        from registry.api.hub_sync import sync_link

        links = self._get_list(schemas.HubLinkInfo, f"{API}/hub-links")
        return [sync_link(self, link, pull, (endpoint or link.endpoint).rstrip("/")) for link in links]

    def doctor(self, *, endpoint: str | None = None) -> list[schemas.HealthCheck]:
        """The server reachable and speaking this client's API, the token accepted, the local
        read cache healthy and the Hub endpoint reachable (for pull and push)."""
        from registry.api.team import check_hub

        checks = []
        try:
            info = self.check_version()
            checks.append(schemas.HealthCheck(name="server", ok=True, fix=None,
                                              detail=f"{self.url} reachable, API v{info['api']}, pem-registry {info['pem_registry']}"))
        except PemError as exc:
            checks.append(schemas.HealthCheck(name="server", ok=False, detail=str(exc),
                                              fix="check PEM_REGISTRY_URL and that `pem serve` runs there"))
            return checks
        try:
            who = self.whoami()
            namespaces = f" for {', '.join(who['namespaces'])}" if who.get("namespaces") else ""
            checks.append(schemas.HealthCheck(name="token", ok=True, fix=None, detail=f"{who['user']}: {who['role']}{namespaces}"))
        except PemError as exc:
            checks.append(schemas.HealthCheck(name="token", ok=False, detail=str(exc), fix="run `pem login URL` or set PEM_TOKEN"))
        try:
            checks.append(schemas.HealthCheck(name="cache", ok=True, detail=str(self.cache_info()), fix=None))
        except Exception as exc:  # any failure here is the finding
            checks.append(schemas.HealthCheck(name="cache", ok=False, detail=f"{exc.__class__.__name__}: {exc}",
                                              fix="run `pem cache clear`"))
        checks.append(check_hub((endpoint or os.environ.get(ENV_HUB_ENDPOINT) or DEFAULT_HUB_ENDPOINT).rstrip("/")))
        return checks
