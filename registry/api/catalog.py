"""The catalog core of the Registry: opening, registering, finding, exporting, removing."""

from __future__ import annotations

import copy
import difflib
import json
import os
import random
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from sqlalchemy import Connection, Engine, func, or_, select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from registry import faults, lazy_module
from registry.api.common import (
    CONFIG_FILE,
    INFO_COLUMNS,
    VERSION_RETRIES,
    WEIGHTS_FILE,
    WRITE_RECEIPT,
    answered,
    aliases_of,
    canonical_json_digest,
    check_lengths,
    check_new_name,
    file_sha256,
    info_fields,
    inherited_metadata,
    lock_name,
    module_details,
    module_info,
    next_version,
    parse_tags,
    read_adapter_folder,
    unknown_alias_error,
)
from registry.config import Settings, is_registry_url, registry_url
from registry.db.engine import (
    WRITE,
    current_revision,
    first_line,
    make_engine,
    make_sessionmaker,
    require_current_schema,
    sqlite_file_missing,
)
from registry.db.models import Alias as AliasRow
from registry.db.models import (
    Blob,
    DerivationInput,
    HubLink,
    Module,
    Tag,
)
from registry.errors import (
    AmbiguousReferenceError,
    BlobStoreError,
    DatabaseError,
    InvalidAdapterError,
    InvalidNameError,
    ModuleInUseError,
    ModuleRemovedError,
    PemError,
    RegistryNotInitializedError,
    UnknownModuleError,
)
from registry.refs import (
    ModuleName,
    Reference,
    parse_module_name,
    parse_reference,
)
from registry.schemas import (
    ModuleDetails,
    ModuleInfo,
    Removal,
)
from registry.store import BlobStore, open_store
from registry.store.checked import copy_blob

if TYPE_CHECKING:
    from registry.adapters import AdapterMetadata
    from registry.api import Registry

# Needed by some commands only: loaded on first use (start-up of `pem list`, `pem show`).
lineage_queries = lazy_module("registry.lineage")
migrate = lazy_module("registry.db.migrate")


@contextmanager
def database_errors() -> Iterator[None]:
    """A driver's operational or data error (connection lost, bad value) as a one-line
    DatabaseError."""
    try:
        yield
    except (OperationalError, DataError) as exc:
        raise DatabaseError(f"database error: {first_line(exc)}") from None


class Catalog:
    """Part of :class:`registry.Registry`: opening, registering, finding, exporting, removing."""
    """A catalog (SQL database) plus a blob store. Open with :meth:`open` or :meth:`init`."""

    def __init__(self, settings: Settings, engine: Engine, store: BlobStore):
        self.settings = settings
        self.engine = engine
        self.store = store
        self._sessions: sessionmaker[Session] = make_sessionmaker(engine)

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        database_url: str | None = None,
        store: str | None = None,
        user: str | None = None,
        token: str | None = None,
    ) -> "Registry":
        """Open an existing registry; raises RegistryNotInitializedError if there is none.

        ``home`` may be a registry server's URL (``http://HOST:PORT``, see ``pem serve``), and
        without any argument ``PEM_REGISTRY_URL`` names one: the result is then a
        :class:`registry.remote.RemoteRegistry` with the same methods, authenticated by
        ``token`` (else ``PEM_TOKEN``, else the one ``pem login`` stored)."""
        url = home if is_registry_url(home) else None
        if url is None and home is None and database_url is None and store is None:
            url = registry_url()
        if url is not None:
            from registry.remote import RemoteRegistry

            return RemoteRegistry(str(url), token=token)  # type: ignore[return-value]
        settings = Settings.resolve(home, database_url, store, user)
        missing = sqlite_file_missing(settings.database_url)
        if missing:  # do not create an empty database file just by looking
            raise RegistryNotInitializedError(f"no registry at {missing}: run `pem init` to create it")
        engine = make_engine(settings.database_url)
        require_current_schema(engine)
        return cls(settings, engine, open_store(settings.store, home=settings.home))

    @classmethod
    def init(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        database_url: str | None = None,
        store: str | None = None,
        user: str | None = None,
    ) -> "Registry":
        """Create the registry, or upgrade its schema to this version's; then open it."""
        settings = Settings.resolve(home, database_url, store, user)
        engine = make_engine(settings.database_url)
        current_revision(engine)  # a clear error when the database is unreachable
        migrate.upgrade(engine)
        if not settings.store.startswith("s3://"):
            Path(settings.store).mkdir(parents=True, exist_ok=True)
        store = open_store(settings.store, home=settings.home)
        store.check()  # a missing or unreachable bucket fails `pem init`, not the first `pem add`
        return cls(settings, engine, store)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with database_errors(), self._sessions() as session:
            yield session

    @contextmanager
    def _read_connection(self) -> Iterator[Connection]:
        """A connection for one read statement, outside any transaction: on PostgreSQL in
        autocommit, so the read is one round trip (no BEGIN, no ROLLBACK). A registry server
        looks up the token or the session of every request with it."""
        options = {"isolation_level": "AUTOCOMMIT"} if self.engine.dialect.name == "postgresql" else {}
        with database_errors(), self.engine.connect().execution_options(**options) as connection:
            yield connection

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        """A session in one write transaction, committed on success (BEGIN IMMEDIATE on SQLite).
        The rows of a pending :class:`WriteReceipt` are added last, in the same transaction."""
        receipt = WRITE_RECEIPT.get()
        if receipt is not None and receipt.committed:
            receipt = None  # a later write of the same call (rm deleting its blob) does not repeat it
        with self._session() as session, session.begin():
            session.connection(execution_options=WRITE)
            yield session
            if receipt is not None:
                receipt.add_rows(session, receipt.answer)
        if receipt is not None:
            receipt.committed = True

    # --- registering --------------------------------------------------------------------------

    def add(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        task: str | None = None,
        tags: dict[str, str] | None = None,
        base_model: str | None = None,
        base_revision: str | None = None,
        description: str | None = None,
        allow_nonfinite: bool = False,
        source_path: str | None = None,
    ) -> ModuleInfo:
        """Register the PEFT adapter folder at ``path`` as ``name`` (``NS/NAME``).

        Identical content (tensors and config) already registered under ``name`` is returned
        as it is (``created`` False); other content becomes the next version. ``source_path``
        is the folder as its owner knows it (a registry server receives uploads elsewhere).
        """
        module_name = parse_module_name(name)
        tag_pairs = parse_tags(tags)
        check_lengths(task=task, base_model=base_model, base_revision=base_revision, description=description)
        self._check_new_name_early(module_name)
        folder = Path(path)
        config, metadata, digest, size = self._ingest(folder, base_model, base_revision, allow_nonfinite)
        return self._register(
            module_name,
            kind="trained",
            digest=digest,
            size_bytes=size,
            config=config,
            metadata=metadata,
            task=task,
            tags=tag_pairs,
            description=description,
            source={"path": source_path or str(folder.absolute()), "file_sha256": file_sha256(folder / WEIGHTS_FILE)},
        )

    def _check_new_name_early(self, name: ModuleName) -> None:
        """The rules for a new name (:func:`check_new_name`), before any blob is written; they
        are checked again when registering, under the name's lock."""
        with self._session() as session:
            held = session.scalar(
                select(Module.id).where(Module.namespace == name.namespace, Module.name == name.name).limit(1)
            )
            if held is None:
                check_new_name(session, name)

    def _ingest(
        self, folder: Path, base_model: str | None = None, base_revision: str | None = None,
        allow_nonfinite: bool = False,
    ) -> tuple[dict[str, Any], AdapterMetadata, str, int]:
        """Validate an adapter folder and store its weights in canonical form: (config,
        metadata, digest, size). Every check runs before the blob is written."""
        from registry.adapters import adapter_type
        from registry.adapters.base import record_magnitudes
        from registry.safetensors_io import copy_canonical

        config, header = read_adapter_folder(folder)
        config = dict(config)
        for field_name in ("base_model_name_or_path", "revision", "task_type"):
            value = config.get(field_name)
            if value is not None and not isinstance(value, str):
                raise InvalidAdapterError(f"adapter_config.json: {field_name} must be a string, got {value!r}")
        if base_model is not None:
            config["base_model_name_or_path"] = base_model
        if base_revision is not None:
            config["revision"] = base_revision
        metadata = adapter_type(str(config["peft_type"])).describe(config, header)
        if not metadata.base_model:
            raise InvalidAdapterError(f"{folder / CONFIG_FILE} has no base_model_name_or_path: pass --base-model ID")
        check_lengths(base_model=metadata.base_model, base_revision=metadata.base_revision,
                      task_type=metadata.task_type, peft_type=metadata.peft_type)
        with self.store.writer() as writer:
            maxima = copy_canonical(header, writer.sink, allow_nonfinite)
            size = writer.sink.bytes_written
            digest = writer.commit()
        record_magnitudes(metadata.layers, adapter_type(metadata.peft_type).tensor_suffixes, maxima)
        return config, metadata, digest, size

    def _register(
        self,
        name: ModuleName,
        *,
        kind: str,
        digest: str,
        size_bytes: int,
        config: dict[str, Any],
        metadata: AdapterMetadata,
        task: str | None,
        tags: list[tuple[str, str]],
        description: str | None,
        source: dict[str, Any] | None,
        attach: Any = None,
        inputs: Sequence[Any] = (),
        doing: str = "registering",
    ) -> ModuleInfo:
        """Insert a module row for a blob already in the store. ``attach(session, module)``
        adds rows that must commit in the same transaction (a derivation). ``inputs`` (with
        ``module_id``, ``digest`` and ``ref``) are the modules it was made from, resolved
        earlier: they are re-checked and locked in the same transaction, so that a concurrent
        `pem rm` either happens before (this fails, naming what it was ``doing``) or after
        (the rm is refused: it now has a descendant), never both."""
        config_digest = canonical_json_digest(config)
        for attempt in range(VERSION_RETRIES):
            try:
                with self._write_session() as session:
                    lock_inputs(session, inputs, doing)
                    existing = session.scalars(
                        select(Module).where(
                            Module.namespace == name.namespace,
                            Module.name == name.name,
                            Module.digest == digest,
                            Module.config_digest == config_digest,
                        ).order_by(Module.version.desc())
                    ).first()
                    if existing is not None:
                        return module_info(existing, created=False)
                    lock_name(session, name)
                    previous = session.scalars(
                        select(Module).where(Module.namespace == name.namespace, Module.name == name.name)
                        .order_by(Module.version.desc())
                    ).first()
                    if previous is None:
                        check_new_name(session, name)
                    row_task, row_tags = inherited_metadata(previous, task, tags)
                    if session.get(Blob, digest) is None:
                        session.add(Blob(digest=digest, size_bytes=size_bytes))
                    if not self.store.exists(digest):  # collected by a concurrent `pem gc`
                        raise BlobStoreError(f"blob sha256:{digest[:12]} vanished before registration: try again")
                    version = next_version(session, name)
                    module = Module(
                        namespace=name.namespace,
                        name=name.name,
                        version=version,
                        kind=kind,
                        digest=digest,
                        config_digest=config_digest,
                        peft_type=metadata.peft_type,
                        composable=metadata.composable and not metadata.unsupported,
                        unsupported=metadata.unsupported,
                        base_model=metadata.base_model or "",
                        base_revision=metadata.base_revision,
                        task_type=metadata.task_type,
                        task=row_task,
                        rank=metadata.rank,
                        lora_alpha=metadata.lora_alpha,
                        use_rslora=metadata.use_rslora,
                        use_dora=metadata.use_dora,
                        target_modules=metadata.target_modules,
                        layers=metadata.layers,
                        config=config,
                        dtype=metadata.dtype,
                        num_parameters=metadata.num_parameters,
                        size_bytes=size_bytes,
                        description=description,
                        owner=self.settings.user,
                        source=source,
                        tags=[Tag(key=k, value=v) for k, v in row_tags],
                    )
                    session.add(module)
                    session.flush()
                    faults.point("row-flushed")
                    if attach is not None:
                        attach(session, module)
                    # Inputs known only from imported provenance become ordinary nodes now.
                    session.execute(
                        update(DerivationInput)
                        .where(
                            DerivationInput.input_id.is_(None),
                            DerivationInput.input_digest == digest,
                            DerivationInput.module_id != module.id,  # a port shares its input's digest
                        )
                        .values(input_id=module.id)
                    )
                    session.flush()
                    return module_info(module, created=True)
            except IntegrityError as exc:
                # A unique violation is another writer taking the same version or adding the
                # same blob row: retry. Anything else (a row referred to was removed) is
                # re-checked by the next attempt, which names it.
                if attempt == VERSION_RETRIES - 1:
                    if is_unique_violation(exc):
                        raise DatabaseError(
                            f"could not allocate a version of {name} after {VERSION_RETRIES} attempts "
                            "(many concurrent writers?): try again"
                        ) from None
                    raise DatabaseError(f"could not register {name}: {first_line(exc)}") from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # let the other writer finish
        raise AssertionError("unreachable")

    def _record_magnitudes(self, digests: Iterable[str], strict: bool = True) -> list[str]:
        """Record each tensor's largest magnitude for modules stored before pem recorded it,
        reading each blob once and checking it against its digest. Returns the digests
        recorded. ``strict`` False skips a missing or corrupt blob (verify reports it)."""
        from registry.adapters import adapter_type
        from registry.adapters.base import record_magnitudes
        from registry.safetensors_io import read_header, tensor_maxima

        recorded = []
        for digest in dict.fromkeys(digests):
            try:
                maxima, actual = tensor_maxima(read_header(self.store.local_path(digest)))
            except (BlobStoreError, InvalidAdapterError, OSError):
                if strict:
                    raise
                continue
            if actual != digest:
                if strict:
                    raise BlobStoreError(
                        f"blob sha256:{digest[:12]} is corrupt: its bytes hash to sha256:{actual[:12]}: "
                        "run `pem verify --all`"
                    )
                continue
            with self._write_session() as session:
                for module in session.scalars(select(Module).where(Module.digest == digest)):
                    layers = copy.deepcopy(module.layers)  # a new value: the JSON column sees the change
                    if record_magnitudes(layers, adapter_type(module.peft_type).tensor_suffixes, maxima):
                        module.layers = layers
                        if digest not in recorded:
                            recorded.append(digest)
        return recorded

    # --- finding ------------------------------------------------------------------------------

    def get(self, ref: str) -> ModuleDetails:
        """The module a reference names, with layers, config and provenance."""
        with self._session() as session:
            module = self._resolve(session, ref)
            return module_details(module, aliases_of(session, [module.id]).get(module.id, []))

    def list(
        self,
        *,
        base_model: str | None = None,
        peft_type: str | None = None,
        task: str | None = None,
        rank: int | None = None,
        tags: dict[str, str] | None = None,
        kind: str | None = None,
        derived_from: str | None = None,
        latest: bool = False,
        search: str | None = None,
        sort: str = "name",
        descending: bool = False,
        offset: int = 0,
        limit: int | None = None,
    ) -> list[ModuleInfo]:
        """Registered modules matching every given filter, by name then version (or by the
        ``sort`` column, one of :data:`SORT_COLUMNS`, then name and version).
        ``derived_from`` keeps modules made (transitively) from that reference; ``search``
        keeps modules whose name, task, description or a tag (``KEY=VALUE``) contains the
        text, ignoring case; ``latest`` keeps, of each name, the newest version among those
        that match; ``offset`` skips that many and ``limit`` returns at most that many (a page
        of the web catalog is one such call)."""
        order = sort_order(sort, descending)
        if offset < 0 or (limit is not None and limit < 1):
            raise InvalidNameError("offset is 0 or more and limit 1 or more")
        check_search(search)
        peft_type = peft_type.upper().replace("(IA)^3", "IA3") if peft_type is not None else None
        with self._session() as session:
            root = self._resolve(session, derived_from) if derived_from is not None else None
            descendants = select(lineage_queries.descendant_ids(root.id).c.id) if root is not None else None

            def matching(row: Any) -> list[Any]:
                """The filters, on ``Module`` or an alias of it (``--latest`` compares versions
                among the matches only)."""
                given = [
                    (base_model, row.base_model), (peft_type, row.peft_type), (task, row.task), (rank, row.rank),
                    (kind, row.kind),
                ]
                conditions = [column == value for value, column in given if value is not None]
                conditions += [
                    row.tags.any((Tag.key == key) & (Tag.value == value)) for key, value in (tags or {}).items()
                ]
                if root is not None:
                    conditions += [row.id.in_(descendants), row.id != root.id]
                if search:
                    conditions.append(search_clause(search, row))
                return conditions

            query = select(*INFO_COLUMNS).where(*matching(Module))
            if latest:
                newer = aliased(Module)
                query = query.where(
                    ~select(newer.id).where(
                        newer.namespace == Module.namespace, newer.name == Module.name, newer.version > Module.version,
                        *matching(newer),
                    ).exists()
                )
            rows = session.execute(query.order_by(*order).offset(offset or None).limit(limit)).all()
            tags_by_module: dict[int, dict[str, str]] = {}
            aliases: dict[int, list[str]] = {}
            if rows:
                ids = [row.id for row in rows] if limit is not None or offset else query.with_only_columns(Module.id)
                for tag in session.execute(
                    select(Tag.module_id, Tag.key, Tag.value).where(Tag.module_id.in_(ids)).order_by(Tag.key)
                ):
                    tags_by_module.setdefault(tag.module_id, {})[tag.key] = tag.value
                aliases = aliases_of(session, ids)
        # Rows come from typed columns: construct without re-validating each field.
        return [
            ModuleInfo.model_construct(**info_fields(row, tags_by_module.get(row.id, {}), aliases.get(row.id, [])))
            for row in rows
        ]

    def complete_reference(self, prefix: str, limit: int = 100) -> list[str]:
        """References starting with ``prefix``, for shell completion: ``NS/NAME`` of
        registered names, or after ``NAME@`` its versions (newest first) and aliases."""
        name, at, selector = prefix.partition("@")
        namespace, slash, rest = name.partition("/")
        with self._session() as session:
            if at:
                versions = session.scalars(
                    select(Module.version).where(Module.namespace == namespace, Module.name == rest)
                    .order_by(Module.version.desc())
                )
                labels = session.scalars(
                    select(AliasRow.alias).where(AliasRow.namespace == namespace, AliasRow.name == rest)
                    .order_by(AliasRow.alias)
                )
                found = [f"{name}@{v}" for v in [*map(str, versions), *labels] if v.startswith(selector)]
            else:
                query = select(Module.namespace, Module.name).distinct()
                if slash:
                    query = query.where(Module.namespace == namespace, Module.name.startswith(rest, autoescape=True))
                else:
                    query = query.where(Module.namespace.startswith(namespace, autoescape=True))
                found = [f"{ns}/{n}" for ns, n in session.execute(query.order_by(Module.namespace, Module.name))]
        return found[:limit]

    def resolve(self, ref: str) -> ModuleInfo:
        """What a reference points at (without layers and config)."""
        with self._session() as session:
            module = self._resolve(session, ref)
            return module_info(module, aliases=aliases_of(session, [module.id]).get(module.id, []))

    def _resolve(self, session: Session, ref: str | Reference, *, lock: bool = False) -> Module:
        """The module row ``ref`` names. ``lock`` (in a write transaction, for a writer that
        changes or refers to the row): the row is locked until the commit (PostgreSQL: FOR
        UPDATE; SQLite writers hold the database lock already), so a concurrent `pem rm`
        waits for this writer, or has removed the row and this raises ModuleRemovedError."""
        module = self._resolve_row(session, ref)
        if lock:
            locked = session.scalars(
                select(Module).where(Module.id == module.id, Module.digest == module.digest)
                .with_for_update().execution_options(populate_existing=True)
            ).first()
            if locked is None:
                raise ModuleRemovedError(f"{module.ref} was removed by another process meanwhile")
            module = locked
        return module

    def _resolve_row(self, session: Session, ref: str | Reference) -> Module:
        parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
        if parsed.digest_prefix is not None:
            return self._resolve_digest(session, parsed)
        assert parsed.module is not None
        ns, name = parsed.module.namespace, parsed.module.name
        query = select(Module).where(Module.namespace == ns, Module.name == name)
        if parsed.alias is not None:
            module = session.scalars(
                select(Module).join(AliasRow, AliasRow.module_id == Module.id).where(
                    AliasRow.namespace == ns, AliasRow.name == name, AliasRow.alias == parsed.alias
                )
            ).first()
            if module is None:
                raise unknown_alias_error(session, parsed.module, parsed.alias)
            return module
        if parsed.version is not None:
            module = session.scalars(query.where(Module.version == parsed.version)).first()
        else:
            module = session.scalars(query.order_by(Module.version.desc())).first()
        if module is not None:
            return module
        versions = session.scalars(select(Module.version).where(Module.namespace == ns, Module.name == name)).all()
        if versions:
            raise UnknownModuleError(
                f"no version {parsed.version} of {parsed.module}: it has versions {', '.join(map(str, sorted(versions)))}"
            )
        raise UnknownModuleError(f"no module named {parsed.module}{self._suggest(session, str(parsed.module))}")

    def _resolve_digest(self, session: Session, parsed: Reference) -> Module:
        prefix = parsed.digest_prefix or ""
        matches = session.scalars(
            select(Module).where(Module.digest.like(prefix + "%")).order_by(Module.namespace, Module.name, Module.version)
        ).all()
        if not matches:
            raise UnknownModuleError(f"no module has a digest starting with {prefix}")
        if len(matches) > 1:
            raise AmbiguousReferenceError(ambiguous_digest_message(prefix, matches))
        return matches[0]

    @staticmethod
    def _suggest(session: Session, wanted: str) -> str:
        names = [f"{ns}/{n}" for ns, n in session.execute(select(Module.namespace, Module.name).distinct())]
        close = closest_names(wanted, names)
        return f"; did you mean {', '.join(close)}?" if close else ""

    # --- exporting and removing ---------------------------------------------------------------

    def export(self, ref: str, directory: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``,
        a folder that ``PeftModel.from_pretrained`` loads. The folder is created if needed; an
        existing one keeps its mode and its other files, and adapter files already in it are
        replaced only with ``force``. New files follow the umask."""
        target = check_export_target(directory, force)
        with self._session() as session:
            module = self._resolve(session, ref)
            config, digest, size, module_ref = module.config, module.digest, module.size_bytes, module.ref
        return write_adapter_folder(target, config, lambda out: copy_blob(self.store, module_ref, digest, size, out))

    def remove(self, ref: str, *, dry_run: bool = False) -> Removal:
        """Delete one version, named as ``NS/NAME@N`` (or by its ``sha256:`` digest); refused
        while modules derived from it exist or an alias points at it. Its blob is deleted when
        no other module uses it. ``dry_run`` only says what would be removed."""
        try:
            removal, digest, orphan = self._remove_row(ref, dry_run)
        except IntegrityError:  # a writer that does not lock the row (pull, add of the same blob) got in first
            raise ModuleInUseError(
                f"cannot remove {ref}: another process made something refer to it meanwhile; run the command again"
            ) from None
        if orphan:  # after the commit: a crash here leaves a stray file, never a dangling row
            with self._blob_lock() as session:
                # A concurrent add of the same content may have registered it meanwhile.
                if session.scalar(select(func.count()).where(Module.digest == digest)) == 0:
                    self.store.delete(digest)
        return removal

    def _remove_row(self, ref: str, dry_run: bool) -> tuple[Removal, str, bool]:
        """Delete the row in one transaction: (what was removed, its digest, whether its blob
        file is to be deleted). The row is locked first, so a writer registering something made
        from it either committed before (and is seen here as a dependent) or waits and then fails."""
        with (self._session() if dry_run else self._write_session()) as session:
            parsed = parse_reference(ref)
            module = self._resolve(session, parsed, lock=not dry_run)
            if parsed.module is not None and parsed.version is None and parsed.alias is None:
                versions = session.scalars(
                    select(Module.version).where(Module.namespace == module.namespace, Module.name == module.name)
                    .order_by(Module.version)
                ).all()
                listed = f"version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
                raise InvalidNameError(
                    f"{ref} names no version: remove one at a time, "
                    f"e.g. `pem rm {module.ref}` ({module.full_name} has {listed})"
                )
            dependents = session.scalars(
                select(Module).join(DerivationInput, DerivationInput.module_id == Module.id)
                .where(DerivationInput.input_id == module.id, Module.id != module.id)  # a self-reference is corruption
                .order_by(Module.id)
            ).all()
            if dependents:
                names = ", ".join(m.ref for m in dependents[:5])
                raise ModuleInUseError(
                    f"cannot remove {module.ref}: {names} {'was' if len(dependents) == 1 else 'were'} derived from it; "
                    "remove those first"
                )
            labels = aliases_of(session, [module.id]).get(module.id, [])
            if labels:
                raise ModuleInUseError(
                    f"cannot remove {module.ref}: alias {', '.join(labels)} points at it; "
                    "move it (`pem alias set`) or remove it (`pem alias rm`) first"
                )
            digest = module.digest
            sharing = session.scalars(
                select(Module).where(Module.digest == digest, Module.id != module.id)
                .order_by(Module.namespace, Module.name, Module.version)
            ).all()
            orphan = not sharing
            removal = Removal(
                ref=module.ref, digest=digest, dry_run=dry_run, tags={t.key: t.value for t in module.tags},
                provenance=module.derivation is not None,
                hub_links=session.scalar(select(func.count()).where(HubLink.module_id == module.id)) or 0,
                blob_freed=orphan, bytes_freed=self.store.size(digest) if orphan and self.store.exists(digest) else 0,
                blob_kept_for=[m.ref for m in sharing],
            )
            if dry_run:
                return removal, digest, False
            answered(removal)
            session.delete(module)
            session.flush()
            if orphan:
                session.delete(session.get(Blob, digest))
        return removal, digest, orphan

    @contextmanager
    def _blob_lock(self) -> Iterator[Session]:
        """A write transaction in which no other writer can register a blob: deleting blob
        files is safe inside it (SQLite: the database write lock; PostgreSQL: the blobs table
        locked, so a writer's check that its blob exists waits until the deletion is done)."""
        with self._write_session() as session:
            if self.engine.dialect.name == "postgresql":
                session.execute(text("LOCK TABLE blobs IN ACCESS EXCLUSIVE MODE"))
            yield session


@contextmanager
def new_file(folder: Path, name: str, staged: list[tuple[Path, Path]]) -> Iterator[Any]:
    """A new temporary file in ``folder`` that will become ``name``, created with the mode the
    umask gives (not mkstemp's 0600), recorded in ``staged``."""
    temporary = folder / f".{name}.pem-{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    staged.append((temporary, folder / name))
    with os.fdopen(fd, "wb") as out:
        yield out


def ambiguous_digest_message(prefix: str, matches: list[Module]) -> str:
    """Every module a digest prefix matches, and how to pick one. A longer prefix helps only
    when the matches have different digests; modules sharing one digest (a port, the same
    tensors under two names) are told apart by name only."""
    if len({m.digest for m in matches}) > 1:
        listed = ", ".join(f"{m.ref} (sha256:{m.digest[:12]})" for m in matches)
        how = "use a longer prefix, or pick one by NS/NAME@VERSION"
    else:
        listed = ", ".join(m.ref for m in matches)
        how = f"they hold the same tensors, so pick one by NS/NAME@VERSION, e.g. {matches[0].ref}"
    return f"sha256:{prefix} matches {len(matches)} modules: {listed}; {how}"


SUGGESTION_CUTOFF = 0.6  # difflib's default: below it, suggestions are noise


def closest_names(wanted: str, names: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` names most similar to ``wanted``, most similar first (case ignored, ties in
    name order)."""
    target = wanted.lower()
    scored = []
    for name in names:
        matcher = difflib.SequenceMatcher(None, target, name.lower())
        if matcher.real_quick_ratio() >= SUGGESTION_CUTOFF and matcher.quick_ratio() >= SUGGESTION_CUTOFF:
            score = matcher.ratio()
            if score >= SUGGESTION_CUTOFF:
                scored.append((-score, name))
    return [name for _, name in sorted(scored)[:n]]


def lock_inputs(session: Session, inputs: Sequence[Any], doing: str) -> None:
    """Re-read the rows of modules resolved before this transaction, by id and digest, and
    lock them against removal until it commits (PostgreSQL: FOR SHARE, so concurrent
    compositions of one input do not wait for each other; on SQLite the writer already holds
    the database lock). A row that is gone, or whose id now holds another module, means the
    input was removed meanwhile: nothing may be registered from it."""
    if not inputs:
        return
    found = {
        row.id: row for row in session.execute(
            select(Module.id, Module.digest, Module.namespace, Module.name, Module.version)
            .where(Module.id.in_({i.module_id for i in inputs})).with_for_update(read=True)
        )
    }
    for item in inputs:
        row = found.get(item.module_id)
        if row is None or row.digest != item.digest or f"{row.namespace}/{row.name}@{row.version}" != item.ref:
            raise ModuleRemovedError(f"input {item.ref} was removed while {doing}; nothing was registered")


def is_unique_violation(exc: IntegrityError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)  # PostgreSQL (psycopg)
    if sqlstate is not None:
        return sqlstate == "23505"
    return "UNIQUE constraint failed" in str(exc.orig)  # SQLite


# --- sorting and searching the catalog ---------------------------------------------------------

# The columns a listing may be sorted by (the web catalog's sortable columns); ties are broken
# by name and version, so that pages of one sort never overlap.
SORT_COLUMNS = {
    "name": (), "kind": (Module.kind,), "peft_type": (Module.peft_type,), "base_model": (Module.base_model,),
    "task": (Module.task,), "rank": (Module.rank,), "dtype": (Module.dtype,), "size": (Module.size_bytes,),
    "created": (Module.created_at,),
}
MAX_SEARCH = 256


def sort_order(sort: str, descending: bool) -> list[Any]:
    if sort not in SORT_COLUMNS:
        raise InvalidNameError(f"cannot sort by {sort!r}: use one of {', '.join(SORT_COLUMNS)}")
    columns = [*SORT_COLUMNS[sort], Module.namespace, Module.name, Module.version]
    return [column.desc() if descending else column.asc() for column in columns]


def check_search(text: str | None) -> None:
    if text is not None and len(text) > MAX_SEARCH:
        raise InvalidNameError(f"a search is at most {MAX_SEARCH} characters")


def search_clause(text: str, row: Any = Module) -> Any:
    """Name (NS/NAME), task, description or a tag as KEY=VALUE of ``row`` (``Module`` or an
    alias of it) containing ``text``, ignoring case. LIKE wildcards in ``text`` are matched
    literally."""
    wanted = text.lower()

    def contains(column: Any) -> Any:
        return func.lower(column).contains(wanted, autoescape=True)

    return or_(
        contains(row.namespace + "/" + row.name),
        contains(row.task),
        contains(row.description),
        row.tags.any(contains(Tag.key + "=" + Tag.value)),
    )


# --- reading adapter folders ------------------------------------------------------------------


# --- writing adapter folders --------------------------------------------------------------------


def check_export_target(directory: str | os.PathLike[str], force: bool = False) -> Path:
    """The export folder, refused when it is a file or already holds adapter files (unless ``force``)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise PemError(f"export target {target} exists and is not a folder: choose a folder")
    present = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if os.path.lexists(target / name)]
    if present and not force:
        raise PemError(
            f"{target} already holds {' and '.join(present)}: "
            "pass --force to replace them, or choose another folder"
        )
    return target


def write_adapter_folder(target: Path, config: dict[str, Any], blob: Path | Callable[[BinaryIO], None]) -> Path:
    """Write ``adapter_config.json`` and a copy of ``blob`` as ``adapter_model.safetensors``
    into ``target`` (created if needed), each staged and renamed into place, the weights first.
    ``blob`` is a file, or a function writing the weights (a copy checked against its digest,
    which raises before anything is renamed). Shared by a local export and a server's client."""
    created = not target.exists()
    staged: list[tuple[Path, Path]] = []  # (temporary file, final name), renamed once all are written
    try:
        target.mkdir(parents=True, exist_ok=True)
        with new_file(target, WEIGHTS_FILE, staged) as out:
            if callable(blob):
                blob(out)
            else:
                with open(blob, "rb") as source:
                    shutil.copyfileobj(source, out, 8 * 1024 * 1024)
        with new_file(target, CONFIG_FILE, staged) as out:
            out.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        for temporary, final in staged:  # the weights first: a config never names weights not yet there
            os.replace(temporary, final)
    except BaseException as exc:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if isinstance(exc, OSError):
            raise PemError(
                f"cannot write to {target}: {exc.strerror or exc}: choose a folder you can write"
            ) from None
        raise
    return target
