"""Team features: aliases, metadata edits, and maintenance (cache, doctor, gc)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from registry.api.common import (
    GC_GRACE_SECONDS,
    VERSION_RETRIES,
    aliases_of,
    answered,
    check_lengths,
    module_info,
    parse_tags,
    unknown_alias_error,
)
from registry.config import Settings
from registry.db.engine import SCHEMA_HEAD, current_revision, make_engine, make_sessionmaker, sqlite_file_missing
from registry.db.models import Alias as AliasRow
from registry.db.models import (
    AliasEvent,
    Blob,
    MetadataEvent,
    Module,
    Tag,
    utcnow,
)
from registry.errors import (
    ConfigurationError,
    DatabaseError,
    PemError,
    UnknownModuleError,
)
from registry.refs import (
    ModuleName,
    number_segment,
    parse_alias,
    parse_module_name,
)
from registry.schemas import (
    AliasInfo,
    AliasMove,
    GcReport,
    HealthCheck,
    MetadataChange,
    ModuleInfo,
)
from registry.store import BlobStore, open_store

if TYPE_CHECKING:
    from registry.store.cache import CacheInfo


class Team:
    """Part of :class:`registry.Registry` (see registry/api/__init__.py)."""


    def set_alias(self, name: str, alias: str, version: int) -> AliasInfo:
        """Point ``NAME@ALIAS`` at version ``version`` (creating or moving it); the move is logged."""
        module_name, label = parse_module_name(name), parse_alias(alias)
        for attempt in range(VERSION_RETRIES):
            try:
                with self._write_session() as session:
                    target = self._resolve(session, f"{module_name}@{version}", lock=True)
                    row = session.scalars(
                        select(AliasRow).where(
                            AliasRow.namespace == module_name.namespace, AliasRow.name == module_name.name,
                            AliasRow.alias == label,
                        ).with_for_update()  # concurrent moves queue up: none is lost from the log
                    ).first()
                    previous = session.get(Module, row.module_id).version if row is not None else None
                    if previous == target.version:  # already there: nothing moved, nothing to log
                        return answered(AliasInfo(alias=f"{module_name}@{label}", ref=target.ref, version=target.version))
                    if row is None:
                        row = AliasRow(namespace=module_name.namespace, name=module_name.name, alias=label,
                                       module_id=target.id)
                        session.add(row)
                    row.module_id, row.updated_at = target.id, utcnow()
                    session.add(AliasEvent(namespace=module_name.namespace, name=module_name.name, alias=label,
                                           from_version=previous, to_version=target.version, by=self.settings.user))
                    return answered(AliasInfo(alias=f"{module_name}@{label}", ref=target.ref, version=target.version))
            except IntegrityError:  # two writers created the same alias at once: retry as a move
                if attempt == VERSION_RETRIES - 1:
                    raise DatabaseError(f"could not set {module_name}@{label}: too many concurrent changes; try again") from None
        raise AssertionError("unreachable")

    def remove_alias(self, name: str, alias: str) -> AliasInfo:
        module_name, label = parse_module_name(name), parse_alias(alias)
        with self._write_session() as session:
            row = session.scalars(
                select(AliasRow).where(
                    AliasRow.namespace == module_name.namespace, AliasRow.name == module_name.name, AliasRow.alias == label
                ).with_for_update()
            ).first()
            if row is None:
                raise unknown_alias_error(session, module_name, label)
            version = session.get(Module, row.module_id).version
            session.delete(row)
            session.add(AliasEvent(namespace=module_name.namespace, name=module_name.name, alias=label,
                                   from_version=version, to_version=None, by=self.settings.user))
            return answered(AliasInfo(alias=f"{module_name}@{label}", ref=f"{module_name}@{version}", version=version))

    def list_aliases(self, name: str | None = None) -> list[AliasInfo]:
        """The aliases of ``name`` (``NS/NAME``), or of every name, by name then label."""
        query = select(AliasRow.namespace, AliasRow.name, AliasRow.alias, Module.version).join(
            Module, Module.id == AliasRow.module_id
        )
        with self._session() as session:
            if name is not None:
                module_name = parse_module_name(name)
                self._resolve(session, str(module_name))  # an unknown name is an error, with suggestions
                query = query.where(AliasRow.namespace == module_name.namespace, AliasRow.name == module_name.name)
            rows = session.execute(query.order_by(AliasRow.namespace, AliasRow.name, AliasRow.alias)).all()
        return [
            AliasInfo(alias=f"{ns}/{n}@{label}", ref=f"{ns}/{n}@{version}", version=version)
            for ns, n, label, version in rows
        ]

    def alias_log(self, name: str) -> list[AliasMove]:
        """Every move of every alias of ``name``, oldest first."""
        module_name = parse_module_name(name)
        with self._session() as session:
            events = session.scalars(
                select(AliasEvent).where(AliasEvent.namespace == module_name.namespace, AliasEvent.name == module_name.name)
                .order_by(AliasEvent.id)
            )
            return [
                AliasMove(alias=e.alias, from_version=e.from_version, to_version=e.to_version, at=e.at, by=e.by)
                for e in events
            ]

    def tag(self, ref: str, set_tags: dict[str, str] | None = None, remove: list[str] | None = None) -> ModuleInfo:
        """Set and remove tags of one version; each change is recorded with time and author."""
        pairs = parse_tags(set_tags)
        with self._write_session() as session:
            module = self._resolve(session, ref, lock=True)
            current = {t.key: t for t in module.tags}
            for key in remove or []:
                if key not in current:
                    raise UnknownModuleError(f"{module.ref} has no tag {key!r}")
                session.add(MetadataEvent(module_id=module.id, field=f"tag:{key}", old=current[key].value, new=None,
                                          by=self.settings.user))
                module.tags.remove(current.pop(key))
            for key, value in pairs:
                old = current[key].value if key in current else None
                if old == value:
                    continue
                if key in current:
                    current[key].value = value
                else:
                    module.tags.append(Tag(key=key, value=value))
                session.add(MetadataEvent(module_id=module.id, field=f"tag:{key}", old=old, new=value, by=self.settings.user))
            session.flush()
            return answered(module_info(module, aliases=aliases_of(session, [module.id]).get(module.id, [])))

    def describe(self, ref: str, description: str | None) -> ModuleInfo:
        """Replace a version's description (None clears it); recorded with time and author."""
        check_lengths(description=description)
        with self._write_session() as session:
            module = self._resolve(session, ref, lock=True)
            if module.description != description:
                session.add(MetadataEvent(module_id=module.id, field="description", old=module.description,
                                          new=description, by=self.settings.user))
                module.description = description
            session.flush()
            return answered(module_info(module, aliases=aliases_of(session, [module.id]).get(module.id, [])))

    def history(self, ref: str) -> list[MetadataChange]:
        """The metadata edits of one version, oldest first."""
        with self._session() as session:
            module = self._resolve(session, ref)
            events = session.scalars(select(MetadataEvent).where(MetadataEvent.module_id == module.id).order_by(MetadataEvent.id))
            return [MetadataChange(field=e.field, old=e.old, new=e.new, at=e.at, by=e.by) for e in events]


    def cache_info(self) -> CacheInfo | None:
        """The local read cache of a remote blob store (``s3://``): files, bytes, limit in
        bytes, folder. None when the blobs are local (there is no cache)."""
        store: Any = self.store
        return store.cache_info() if hasattr(store, "cache_info") else None

    def cache_clear(self) -> CacheInfo | None:
        """Delete every cached blob (each is downloaded again when next used); returns what
        was removed, or None without a cache. Processes reading a cached file keep reading it."""
        store: Any = self.store
        return store.cache_clear() if hasattr(store, "cache_clear") else None

    @classmethod
    def doctor(cls, home: str | os.PathLike[str] | None = None, *, endpoint: str | None = None) -> list[HealthCheck]:
        """Whether the database is reachable and migrated, the store readable and writable,
        the cache healthy and the Hub endpoint reachable, each with the fix when not."""
        settings = Settings.resolve(home, hub_endpoint=endpoint)
        checks = [check_database(settings)]
        if checks[0].ok:
            checks.append(check_provenance(settings))
            checks += check_names(settings)
        store = open_store(settings.store, home=settings.home)
        checks.append(check_store(store))
        if hasattr(store, "cache_info"):
            checks.append(check_cache(store))
        checks.append(check_hub(settings.hub_endpoint))
        return checks


    def gc(self, *, dry_run: bool = False, grace_seconds: float = GC_GRACE_SECONDS) -> GcReport:
        """Delete blobs no module references, and partial writes of crashed writers, older than
        ``grace_seconds`` (a writer stores its blob before committing its row: a recent
        unreferenced blob may be about to be registered). ``dry_run`` only lists them. The
        report counts the bytes freed (or, dry, that would be) and the partial writes kept
        because they are younger than the grace period."""
        if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float)) or not (
            math.isfinite(grace_seconds) and grace_seconds >= 0
        ):
            raise ConfigurationError(
                f"the grace period must be a finite number of seconds, 0 or more (got {grace_seconds!r}): "
                "a shorter one would delete the files of writers in flight"
            )
        now = time.time()
        with self._blob_lock() as session:  # writers wait while blobs are collected
            referenced = set(session.scalars(select(Module.digest).distinct()))
            blobs = [d for d in self.store.digests() if d not in referenced and now - self.store.modified_at(d) >= grace_seconds]
            stale_rows = list(session.scalars(select(Blob.digest).where(Blob.digest.not_in(select(Module.digest)))))
            old, young = [], []  # partial writes, with their sizes
            for path, mtime in self.store.temporary_files():
                size = _size_or_none(path)
                if size is not None:
                    (old if now - mtime >= grace_seconds else young).append((path, size))
            freed = sum(self.store.size(d) for d in blobs)  # a remote store answers without downloading
            if dry_run:
                freed += sum(size for _, size in old)
            else:
                for digest in stale_rows:
                    session.delete(session.get(Blob, digest))
                for digest in blobs:
                    self.store.delete(digest)
                for path, size in old:
                    try:
                        path.unlink()
                        freed += size
                    except FileNotFoundError:  # gone meanwhile: not freed by this gc
                        pass
        return GcReport(dry_run=dry_run, blobs=blobs, temporary_files=[str(p) for p, _ in old], bytes_freed=freed,
                        kept_temporary_files=len(young), kept_temporary_bytes=sum(size for _, size in young))


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # a writer committed it meanwhile
        return None


# --- pem doctor checks --------------------------------------------------------------------


def check_database(settings: Settings) -> HealthCheck:
    where = make_url_safe(settings.database_url)
    missing = sqlite_file_missing(settings.database_url)
    if missing:
        return HealthCheck(name="database", ok=False, detail=f"no registry at {missing}", fix="run `pem init`")
    try:
        engine = make_engine(settings.database_url)
        revision = current_revision(engine)
        engine.dispose()
    except PemError as exc:
        return HealthCheck(name="database", ok=False, detail=str(exc), fix="check PEM_DATABASE_URL and that the server runs")
    if revision is None:
        return HealthCheck(name="database", ok=False, detail=f"{where} has no registry schema", fix="run `pem init`")
    if revision != SCHEMA_HEAD:
        return HealthCheck(name="database", ok=False, detail=f"{where} is at schema {revision}, this pem needs {SCHEMA_HEAD}",
                           fix="run `pem db upgrade`")
    return HealthCheck(name="database", ok=True, detail=f"{where} reachable, schema {revision}", fix=None)


def check_names(settings: Settings) -> list[HealthCheck]:
    """A warning listing the names registered before the naming rules (a part that reads as a
    number, names equal ignoring case), if any: they keep working, but `NS/NAME` in an
    expression may not mean them."""
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            names = [
                ModuleName(ns, n) for ns, n in connection.execute(
                    select(Module.namespace, Module.name).distinct().order_by(Module.namespace, Module.name)
                )
            ]
    finally:
        engine.dispose()
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(str(name).lower(), []).append(str(name))
    numeric = [str(name) for name in names if number_segment(name) is not None]
    same_but_case = [" = ".join(group) for group in spellings.values() if len(group) > 1]
    if not numeric and not same_but_case:
        return []  # nothing to say
    found = [f"a part reads as a number: {', '.join(numeric)}"] if numeric else []
    found += [f"equal ignoring case: {'; '.join(same_but_case)}"] if same_but_case else []
    return [HealthCheck(
        name="names", ok=False, status="warn", detail="registered before the naming rules: " + "; ".join(found),
        fix="they keep working; refer to them as NS/NAME@VERSION or sha256:, and give new modules other names",
    )]


def check_provenance(settings: Settings) -> HealthCheck:
    """The lineage graph holds no self-references, re-used input rows or cycles (what a
    compose racing `pem rm` left in catalogs before schema 0005)."""
    from registry import lineage

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            problems = lineage.graph_problems(session)
    finally:
        engine.dispose()
    if not problems:
        return HealthCheck(name="lineage", ok=True, detail="no self-references or cycles in the lineage graph",
                           fix=None)
    listed = "; ".join(f"{ref} {'; '.join(found)}" for ref, found in sorted(problems.items())[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return HealthCheck(name="lineage", ok=False, detail=f"{len(problems)} corrupt: {listed}{more}",
                       fix="run `pem verify --all` for the full list")


def make_url_safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_store(store: BlobStore) -> HealthCheck:
    root = getattr(store, "root", None)
    if root is not None and not Path(root).is_dir():  # never create it just by looking
        if Path(root).exists():
            return HealthCheck(name="store", ok=False, detail=f"{root} exists but is not a folder",
                               fix="move it away, or set PEM_STORE to a folder")
        return HealthCheck(name="store", ok=False, detail=f"{root} does not exist", fix="run `pem init`")
    try:
        next(iter(store.digests()), None)  # readable
        with store.writer() as writer:  # writable: a temporary write, then discarded
            writer.write(b"pem doctor")
    except Exception as exc:  # any failure here is the finding
        return HealthCheck(name="store", ok=False, detail=f"{store.location}: {exc.__class__.__name__}: {exc}",
                           fix="check PEM_STORE, its permissions or credentials")
    return HealthCheck(name="store", ok=True, detail=f"{store.location} readable and writable", fix=None)


def check_cache(store: Any) -> HealthCheck:
    try:
        info = store.cache_info()
    except Exception as exc:
        return HealthCheck(name="cache", ok=False, detail=f"{exc.__class__.__name__}: {exc}", fix="run `pem cache clear`")
    return HealthCheck(name="cache", ok=True, detail=str(info), fix=None)


def check_hub(endpoint: str) -> HealthCheck:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=5)
    except urllib.error.HTTPError:
        pass  # any HTTP answer (401 without a token) means the endpoint is there
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return HealthCheck(name="hub", ok=False, status="warn",
                           detail=f"{endpoint} unreachable ({reason}); only pull, push and sync need it",
                           fix="check HF_ENDPOINT and the network")
    return HealthCheck(name="hub", ok=True, detail=f"{endpoint} reachable", fix=None)
