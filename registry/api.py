"""The Python API. Everything the ``pem`` command does is a method here.

>>> from registry import Registry
>>> reg = Registry.init("~/.pem")                       # create or upgrade the catalog
>>> info = reg.add("out/yelp-lora", "team/yelp", task="sentiment", tags={"lang": "en"})
>>> [m.ref for m in reg.list(peft_type="LORA")]
['team/yelp@1']
>>> reg.export("team/yelp", "exported/")                # a folder PeftModel.from_pretrained loads
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker

from registry import __version__, faults, hosts, hub
from registry import lineage as lineage_queries
from registry.adapters import AdapterMetadata, adapter_type
from registry.compose.plan import InputModule, OutputPlan, bind_terms, build_plan, parse_expression
from registry.config import Settings
from registry.db import migrate
from registry.db.engine import (
    SCHEMA_HEAD,
    WRITE,
    current_revision,
    make_engine,
    make_sessionmaker,
    require_current_schema,
    sqlite_file_missing,
)
from registry.db.models import Alias as AliasRow
from registry.db.models import (
    AliasEvent,
    BaseModelRecord,
    Blob,
    Derivation,
    DerivationInput,
    HubLink,
    MetadataEvent,
    Module,
    NameCounter,
    Tag,
    utcnow,
)
from registry.errors import (
    AmbiguousReferenceError,
    BlobStoreError,
    DatabaseError,
    HubError,
    IncompatibleModulesError,
    InvalidAdapterError,
    InvalidNameError,
    ModuleInUseError,
    NameConflictError,
    NotFoundError,
    PemError,
    RegistryNotInitializedError,
    UnknownBaseModelError,
    UnknownModuleError,
    UnsafeFormatError,
    UnsupportedMethodError,
)
from registry.language import caret
from registry.methods import DEFAULT_METHOD, get_method
from registry.refs import (
    BaseReference,
    ModuleName,
    Reference,
    parse_alias,
    parse_base_reference,
    parse_module_name,
    parse_reference,
)
from registry.safetensors_io import SafetensorsHeader, copy_canonical, read_header
from registry.schemas import (
    AliasInfo,
    AliasMove,
    BaseModelInfo,
    CheckReport,
    Contents,
    ContentTerm,
    Descendant,
    Deviation,
    GcReport,
    HealthCheck,
    Lineage,
    LineageEdge,
    LineageNode,
    MetadataChange,
    ModuleDetails,
    ModuleInfo,
    OutputSummary,
    PortReport,
    Provenance,
    ProvenanceInput,
    ProvenanceSidecar,
    PushResult,
    SyncStatus,
    TermInfo,
    VerifyReport,
)
from registry.store import BlobStore, open_store
from registry.store.cache import CacheInfo

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
VERSION_RETRIES = 10
GC_GRACE_SECONDS = 3600.0  # unreferenced blobs younger than this may belong to a writer in flight  # concurrent registrations of one name race for the next version


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep or not TAG_KEY_RE.fullmatch(key):
        raise InvalidNameError(f"invalid tag {text!r}: use KEY=VALUE, KEY of letters, digits, '_', '.', ':', '-'")
    return key, value


# Column sizes of the catalog, checked before anything is written.
MAX_LENGTHS = {"task": 128, "base_model": 255, "base_revision": 255, "task_type": 64, "peft_type": 32}
MAX_TAG_VALUE = 512


def check_lengths(**values: str | None) -> None:
    for field, value in values.items():
        limit = MAX_LENGTHS[field]
        if value is not None and len(value) > limit:
            raise InvalidNameError(f"{field.replace('_', ' ')} is {len(value)} characters long; the limit is {limit}")


def parse_tags(tags: dict[str, str] | None) -> list[tuple[str, str]]:
    """Validate tags given as a mapping; sorted pairs."""
    pairs = []
    for key, value in (tags or {}).items():
        if not TAG_KEY_RE.fullmatch(key):
            raise InvalidNameError(f"invalid tag key {key!r}: use letters, digits, '_', '.', ':', '-'")
        if len(str(value)) > MAX_TAG_VALUE:
            raise InvalidNameError(f"tag {key} has a value of {len(str(value))} characters; the limit is {MAX_TAG_VALUE}")
        pairs.append((key, str(value)))
    return sorted(pairs)


def _canonical_json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Registry:
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
    ) -> "Registry":
        """Open an existing registry; raises RegistryNotInitializedError if there is none."""
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
        try:
            with self._sessions() as session:
                yield session
        except (OperationalError, DataError) as exc:
            raise DatabaseError(f"database error: {str(exc.orig).strip().splitlines()[0]}") from None

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        """A session in one write transaction, committed on success (BEGIN IMMEDIATE on SQLite)."""
        with self._session() as session, session.begin():
            session.connection(execution_options=WRITE)
            yield session

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
    ) -> ModuleInfo:
        """Register the PEFT adapter folder at ``path`` as ``name`` (``NS/NAME``).

        Identical content (tensors and config) already registered under ``name`` is returned
        as it is (``created`` False); other content becomes the next version.
        """
        module_name = parse_module_name(name)
        tag_pairs = parse_tags(tags)
        check_lengths(task=task, base_model=base_model, base_revision=base_revision)
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
            source={"path": str(folder.absolute()), "file_sha256": _file_sha256(folder / WEIGHTS_FILE)},
        )

    def _ingest(
        self, folder: Path, base_model: str | None = None, base_revision: str | None = None,
        allow_nonfinite: bool = False,
    ) -> tuple[dict[str, Any], AdapterMetadata, str, int]:
        """Validate an adapter folder and store its weights in canonical form: (config,
        metadata, digest, size). Every check runs before the blob is written."""
        config, header = read_adapter_folder(folder)
        config = dict(config)
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
            copy_canonical(header, writer.sink, allow_nonfinite)
            size = writer.sink.bytes_written
            digest = writer.commit()
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
    ) -> ModuleInfo:
        """Insert a module row for a blob already in the store. ``attach(session, module)``
        adds rows that must commit in the same transaction (a derivation)."""
        config_digest = _canonical_json_digest(config)
        for attempt in range(VERSION_RETRIES):
            try:
                with self._write_session() as session:
                    existing = session.scalars(
                        select(Module).where(
                            Module.namespace == name.namespace,
                            Module.name == name.name,
                            Module.digest == digest,
                            Module.config_digest == config_digest,
                        ).order_by(Module.version.desc())
                    ).first()
                    if existing is not None:
                        return _module_info(existing, created=False)
                    if session.get(Blob, digest) is None:
                        session.add(Blob(digest=digest, size_bytes=size_bytes))
                    if not self.store.exists(digest):  # collected by a concurrent `pem gc`
                        raise BlobStoreError(f"blob sha256:{digest[:12]} vanished before registration: try again")
                    version = _next_version(session, name)
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
                        task=task,
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
                        tags=[Tag(key=k, value=v) for k, v in tags],
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
                    return _module_info(module, created=True)
            except IntegrityError:
                if attempt == VERSION_RETRIES - 1:
                    raise DatabaseError(
                        f"could not allocate a version of {name} after {VERSION_RETRIES} attempts "
                        "(many concurrent writers?): try again"
                    ) from None
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # let the other writer finish
        raise AssertionError("unreachable")

    # --- finding ------------------------------------------------------------------------------

    def get(self, ref: str) -> ModuleDetails:
        """The module a reference names, with layers, config and provenance."""
        with self._session() as session:
            module = self._resolve(session, ref)
            return _module_details(module, _aliases_of(session, [module.id]).get(module.id, []))

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
        limit: int | None = None,
    ) -> list[ModuleInfo]:
        """Registered modules matching every given filter, by name then version.
        ``derived_from`` keeps modules made (transitively) from that reference; ``limit``
        returns at most that many."""
        query = select(*_INFO_COLUMNS)
        if base_model is not None:
            query = query.where(Module.base_model == base_model)
        if peft_type is not None:
            query = query.where(Module.peft_type == peft_type.upper().replace("(IA)^3", "IA3"))
        if task is not None:
            query = query.where(Module.task == task)
        if rank is not None:
            query = query.where(Module.rank == rank)
        if kind is not None:
            query = query.where(Module.kind == kind)
        for key, value in (tags or {}).items():
            query = query.where(Module.tags.any((Tag.key == key) & (Tag.value == value)))
        if latest:
            newer = aliased(Module)
            query = query.where(
                ~select(newer.id).where(
                    newer.namespace == Module.namespace, newer.name == Module.name, newer.version > Module.version
                ).exists()
            )
        with self._session() as session:
            if derived_from is not None:
                root = self._resolve(session, derived_from)
                ids = lineage_queries.descendant_ids(root.id)
                query = query.where(Module.id.in_(select(ids.c.id)), Module.id != root.id)
            rows = session.execute(query.order_by(Module.namespace, Module.name, Module.version).limit(limit)).all()
            tags_by_module: dict[int, dict[str, str]] = {}
            aliases: dict[int, list[str]] = {}
            if rows:
                matching = [row.id for row in rows] if limit is not None else query.with_only_columns(Module.id)
                for tag in session.execute(
                    select(Tag.module_id, Tag.key, Tag.value).where(Tag.module_id.in_(matching)).order_by(Tag.key)
                ):
                    tags_by_module.setdefault(tag.module_id, {})[tag.key] = tag.value
                aliases = _aliases_of(session, matching)
        # Rows come from typed columns: construct without re-validating each field.
        return [
            ModuleInfo.model_construct(**_info_fields(row, tags_by_module.get(row.id, {}), aliases.get(row.id, [])))
            for row in rows
        ]

    def resolve(self, ref: str) -> ModuleInfo:
        """What a reference points at (without layers and config)."""
        with self._session() as session:
            module = self._resolve(session, ref)
            return _module_info(module, aliases=_aliases_of(session, [module.id]).get(module.id, []))

    def _resolve(self, session: Session, ref: str | Reference) -> Module:
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
                raise _unknown_alias(session, parsed.module, parsed.alias)
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
            listed = ", ".join(f"{m.ref} (sha256:{m.digest[:12]})" for m in matches[:10])
            raise AmbiguousReferenceError(
                f"sha256:{prefix} matches {len(matches)} modules: {listed}; use a longer prefix or NS/NAME@VERSION"
            )
        return matches[0]

    @staticmethod
    def _suggest(session: Session, wanted: str) -> str:
        names = session.execute(select(Module.namespace, Module.name).distinct()).all()
        close = difflib.get_close_matches(wanted, [f"{ns}/{n}" for ns, n in names], n=3, cutoff=0.6)
        return f"; did you mean {', '.join(close)}?" if close else ""

    # --- composing ----------------------------------------------------------------------------

    def check(
        self,
        expression: str,
        *,
        method: str = DEFAULT_METHOD,
        rank: int | None = None,
        dtype: str | None = None,
        union: bool = False,
        deviation: bool = False,
    ) -> CheckReport:
        """Parse, resolve, type-check and validate ``expression`` on metadata alone, and say
        what the output would be. Incompatibilities are listed in the report (``composable``
        False), not raised. ``deviation`` (LoRA, method ``module``) reads the tensors to
        measure how far the result's effect is from the exact sum."""
        plan, inputs, canonical_text, violations = self._plan(expression, method, rank, dtype, union)
        report = CheckReport(
            expression=expression,
            canonical=canonical_text,
            method=method,
            parameters=plan.parameters if plan else {"rank": rank, "union": union, "dtype": dtype},
            composable=plan is not None,
            violations=violations,
            terms=[
                TermInfo(ref=i.ref, digest=i.digest, peft_type=i.peft_type, a=float(i.a), b=float(i.b))
                for i in sorted(inputs, key=lambda i: i.position)
            ],
            output=None if plan is None else OutputSummary(
                peft_type=plan.peft_type, dtype=plan.dtype, rank=plan.max_rank, layers=len(plan.layers),
                num_parameters=plan.num_parameters, size_bytes=plan.size_bytes,
            ),
            notes=plan.notes if plan else [],
        )
        if deviation and plan is not None:
            if plan.peft_type != "LORA" or method != "module":
                raise UnsupportedMethodError("--deviation applies to LoRA inputs with method 'module'")
            from registry.compose.engine import measure_deviation

            report.deviation = Deviation(**measure_deviation(plan, self.store))
        return report

    def compose(
        self,
        expression: str,
        name: str,
        *,
        method: str = DEFAULT_METHOD,
        rank: int | None = None,
        dtype: str | None = None,
        union: bool = False,
        description: str | None = None,
        new_version: bool = False,
        progress: Any = None,
    ) -> ModuleInfo:
        """Evaluate ``expression`` into a new module ``name`` (kind ``derived``), stored with
        its provenance. Asking again for the same derivation returns the existing module
        (``created`` False); another derivation under an existing name is refused unless
        ``new_version``."""
        output_name = parse_module_name(name)
        plan, _, _, violations = self._plan(expression, method, rank, dtype, union)
        if plan is None:
            raise IncompatibleModulesError(violations)
        identity = plan.identity()
        with self._session() as session:
            same_name = session.scalars(
                select(Module).where(Module.namespace == output_name.namespace, Module.name == output_name.name)
                .order_by(Module.version.desc())
            ).all()
            for module in same_name:
                if module.derivation is not None and module.derivation.identity == identity:
                    return _module_info(module, created=False)
            if same_name and not new_version:
                raise NameConflictError(
                    f"{output_name} already exists ({same_name[0].ref}) and was made differently: "
                    "choose another --name, or pass --new-version to add a version"
                )
            earlier = session.scalars(
                select(Derivation).where(Derivation.identity == identity).order_by(Derivation.module_id)
            ).first()
            reuse = (earlier.module.digest, earlier.results) if earlier is not None else None
        if reuse is not None and self.store.exists(reuse[0]):
            digest, results = reuse  # the same derivation was computed before: share its blob
            size = self.store.size(digest)
        else:
            from registry.compose.engine import evaluate

            digest, size, results = evaluate(plan, self.store, progress)
        handler = adapter_type(plan.peft_type)
        metadata = handler.describe(plan.config, read_header(self.store.local_path(digest)))

        def attach(session: Session, module: Module) -> None:
            session.add(Derivation(
                module_id=module.id,
                expression=expression,
                canonical=plan.canonical,
                method=plan.method.name,
                method_version=plan.method.version,
                parameters=plan.parameters,
                results=results,
                environment=_environment(),
                identity=identity,
                inputs=[
                    DerivationInput(position=n, input_id=i.module_id, input_digest=i.digest, a=float(i.a), b=float(i.b))
                    for n, i in enumerate(plan.inputs)
                ],
            ))

        return self._register(
            output_name, kind="derived", digest=digest, size_bytes=size, config=plan.config, metadata=metadata,
            task=None, tags=[], description=description, source=None, attach=attach,
        )

    def _plan(
        self, expression: str, method_name: str, rank: int | None, dtype: str | None, union: bool
    ) -> tuple[OutputPlan | None, list[InputModule], str, list[str]]:
        """Everything before tensors: (plan or None, inputs, canonical text, violations)."""
        method = get_method(method_name)
        tree, terms = parse_expression(expression)
        with self._session() as session:
            def resolve(ref: str) -> InputModule:
                term = next(t for t in terms if t.ref == ref)
                try:
                    module = self._resolve(session, ref)
                except (NotFoundError, AmbiguousReferenceError, InvalidNameError) as exc:
                    raise type(exc)(f"{exc}\n{caret(expression, term.start, term.end)}") from None
                return InputModule.from_row(module, position=terms.index(term))

            inputs, canonical_text = bind_terms(tree, terms, resolve, expression)
        plan, violations = build_plan(expression, canonical_text, inputs, method, {"rank": rank}, dtype, union)
        return plan, inputs, canonical_text, violations

    # --- provenance queries -------------------------------------------------------------------

    def lineage(self, ref: str) -> Lineage:
        """The ancestor graph of ``ref`` down to modules that were not derived."""
        with self._session() as session:
            root = self._resolve(session, ref)
            ids = lineage_queries.ancestor_ids(root.id)
            modules = lineage_queries.modules_by_id(session, ids)
            edges = lineage_queries.edges_into(session, ids)
            derivations = {
                row.module_id: row for row in session.execute(
                    select(Derivation.module_id, Derivation.method, Derivation.canonical)
                    .where(Derivation.module_id.in_(select(ids.c.id)))
                )
            }
            nodes = [
                LineageNode(
                    ref=m.ref, digest=m.digest, kind=m.kind, peft_type=m.peft_type,
                    method=derivations[m.id].method if m.id in derivations else None,
                    expression=derivations[m.id].canonical if m.id in derivations else None,
                )
                for m in sorted(modules.values(), key=lambda m: (m.id != root.id, m.ref))
            ]
            edge_list = []
            for e in edges:
                if e.input_id is None:  # known only from imported provenance
                    label = lineage_queries.external_label(e.external, e.input_digest)
                    if all(n.ref != label for n in nodes):
                        nodes.append(LineageNode(ref=label, digest=e.input_digest, kind="external",
                                                 peft_type=modules[e.module_id].peft_type, method=None, expression=None))
                else:
                    label = modules[e.input_id].ref
                edge_list.append(LineageEdge(output=modules[e.module_id].ref, input=label, method=e.method, a=e.a, b=e.b))
            return Lineage(root=root.ref, nodes=nodes, edges=edge_list)

    def descendants(self, ref: str) -> list[Descendant]:
        """Every module derived from ``ref``, transitively, with a shortest path to it."""
        with self._session() as session:
            root = self._resolve(session, ref)
            ids = lineage_queries.descendant_ids(root.id)
            modules = lineage_queries.modules_by_id(session, ids)
            edges = lineage_queries.edges_into(session, ids)
            paths = lineage_queries.shortest_paths(root.id, edges)
            ref_of = {i: node.ref for i, node in modules.items()}
            found = [
                Descendant.model_construct(
                    ref=ref_of[i], kind=modules[i].kind, depth=len(p) - 1, path=[ref_of[n] for n in p]
                )
                for i, p in paths.items() if i != root.id
            ]
            return sorted(found, key=lambda d: (d.depth, d.ref))

    def contents(self, ref: str) -> Contents:
        """The effective weight of each non-derived ancestor inside ``ref``; modules made by a
        non-linear method are opaque terms with their own contents nested."""
        with self._session() as session:
            root = self._resolve(session, ref)
            linear = root.derivation is None or root.derivation.method in lineage_queries.LINEAR_METHODS
            return Contents(root=root.ref, root_linear=linear, terms=self._content_terms(session, root.id))

    def _content_terms(self, session: Session, root_id: int) -> list[ContentTerm]:
        weights = lineage_queries.effective_weights(session, root_id)
        ids = [module_id for module_id, _, _, _ in weights if module_id is not None]
        modules = {m.id: m for m in session.scalars(select(Module).where(Module.id.in_(ids)))}
        derived = set(session.scalars(select(Derivation.module_id).where(Derivation.module_id.in_(ids))))
        externals = {
            row.input_digest: row.external for row in session.execute(
                select(DerivationInput.input_digest, DerivationInput.external).where(
                    DerivationInput.input_id.is_(None),
                    DerivationInput.input_digest.in_([d for i, d, _, _ in weights if i is None]),
                )
            )
        }
        terms = []
        for module_id, digest, a, b in weights:
            if module_id is None:
                label = lineage_queries.external_label(externals.get(digest), digest)
                terms.append(ContentTerm(ref=label, digest=digest, kind="external", a=a, b=b, opaque=False))
                continue
            module = modules[module_id]
            opaque = module_id in derived and module_id != root_id
            terms.append(ContentTerm(
                ref=module.ref, digest=module.digest, kind=module.kind, a=a, b=b, opaque=opaque,
                contents=self._content_terms(session, module_id) if opaque else None,
            ))
        return sorted(terms, key=lambda t: t.ref)

    def verify(self, ref: str | None = None, *, progress: Any = None) -> VerifyReport:
        """Check blobs against their digests and re-run derivations (all modules when ``ref``
        is None). Read-only: re-derivations are computed in a scratch store and discarded."""
        from registry.verify import verify_modules

        with self._session() as session:
            if ref is None:
                modules = list(session.scalars(select(Module).order_by(Module.id)))
            else:
                modules = [self._resolve(session, ref)]
            return verify_modules(self, session, modules, progress)

    # --- base models and porting --------------------------------------------------------------

    def add_base(
        self, base: str, *, config_path: str | os.PathLike[str] | None = None, endpoint: str | None = None
    ) -> BaseModelInfo:
        """Record a base model (``ID[@REV]``) from its config.json: a local file, or the file
        alone downloaded from the Hub (no weights). Recording it again refreshes it."""
        reference = parse_base_reference(base)
        if config_path is None:
            from registry.hub import download_config

            config_path = download_config(reference.model_id, reference.revision, endpoint or self.settings.hub_endpoint)
        config = hosts.read_config(Path(config_path))
        structure = hosts.build_structure(config)
        with self._write_session() as session:
            record = session.scalars(
                select(BaseModelRecord).where(
                    BaseModelRecord.model_id == reference.model_id, BaseModelRecord.revision == (reference.revision or "")
                )
            ).first()
            if record is None:
                record = BaseModelRecord(model_id=reference.model_id, revision=reference.revision or "")
                session.add(record)
            record.architecture = hosts.architecture(config)
            record.model_type = config.get("model_type")
            record.dimensions = hosts.dimensions(config)
            record.config = config
            record.structure = structure
            session.flush()
            return self._base_info(session, record)

    def list_bases(self) -> list[BaseModelInfo]:
        with self._session() as session:
            records = session.scalars(select(BaseModelRecord).order_by(BaseModelRecord.model_id, BaseModelRecord.revision))
            return [self._base_info(session, r) for r in records]

    def get_base(self, base: str) -> BaseModelInfo:
        with self._session() as session:
            return self._base_info(session, self._resolve_base(session, parse_base_reference(base)))

    def _resolve_base(self, session: Session, reference: BaseReference) -> BaseModelRecord:
        query = select(BaseModelRecord).where(BaseModelRecord.model_id == reference.model_id)
        if reference.revision is not None:
            query = query.where(BaseModelRecord.revision == reference.revision)
        matches = session.scalars(query.order_by(BaseModelRecord.revision)).all()
        if not matches:
            raise UnknownBaseModelError(f"no base model {reference} recorded: run `pem base add {reference} --config PATH`")
        if len(matches) > 1:
            revisions = ", ".join(f"{m.model_id}@{m.revision or '(unpinned)'}" for m in matches)
            raise AmbiguousReferenceError(f"{reference} is recorded at several revisions ({revisions}): add @REVISION")
        return matches[0]

    def _base_info(self, session: Session, record: BaseModelRecord) -> BaseModelInfo:
        adapters = select(func.count()).where(Module.base_model == record.model_id)
        if record.revision:
            adapters = adapters.where(Module.base_revision == record.revision)
        return BaseModelInfo(
            model_id=record.model_id, revision=record.revision or None, architecture=record.architecture,
            model_type=record.model_type, dimensions=record.dimensions, structure_known=record.structure is not None,
            adaptable_modules=len(record.structure or {}), adapters=session.scalar(adapters) or 0,
            created_at=record.created_at,
        )

    def check_port(self, ref: str, to: str) -> PortReport:
        """How a module fits another host: same-base, compatible, incompatible, or unknown."""
        with self._session() as session:
            module = self._resolve(session, ref)
            return self._port_report(module, self._resolve_base(session, parse_base_reference(to)))

    @staticmethod
    def _port_report(module: Module, host: BaseModelRecord) -> PortReport:
        source = module.base_model + (f"@{module.base_revision}" if module.base_revision else "")
        target = host.model_id + (f"@{host.revision}" if host.revision else "")
        report = dict(module=module.ref, from_base=source, to_base=target)
        revisions_agree = not module.base_revision or not host.revision or module.base_revision == host.revision
        if module.base_model == host.model_id and revisions_agree:  # revisions count where both are known
            return PortReport(**report, level=hosts.SAME_BASE, evidence=[f"{module.ref} is already on {target}"])
        if host.structure is None:
            return PortReport(**report, level=hosts.UNKNOWN, evidence=[
                f"the structure of {target} is unknown: {hosts.unknown_reason(host.config)}"
            ])
        missing, mismatched = hosts.structural_report(module.layers, host.structure)
        if missing or mismatched:
            evidence = [f"{len(missing)} adapted layers missing in {target}"] if missing else []
            evidence += [f"{len(mismatched)} adapted layers with other shapes in {target}"] if mismatched else []
            return PortReport(**report, level=hosts.INCOMPATIBLE, evidence=evidence, missing=missing, mismatched=mismatched)
        return PortReport(**report, level=hosts.COMPATIBLE, evidence=[
            f"all {len(module.layers)} adapted layers exist in {target} ({host.architecture}) with the shapes the module needs"
        ])

    def port(self, ref: str, to: str, name: str) -> ModuleInfo:
        """A new module (kind ``ported``) with the same tensors (the blob is shared) on host
        ``to``, with a provenance recording the port. Refused unless the host is compatible."""
        output_name = parse_module_name(name)
        with self._session() as session:
            module = self._resolve(session, ref)
            host = self._resolve_base(session, parse_base_reference(to))
            taken = session.scalars(select(Module).where(
                Module.namespace == output_name.namespace, Module.name == output_name.name)).first()
            if taken is not None and not (taken.derivation and taken.derivation.method == "port"
                                          and taken.digest == module.digest and taken.base_model == host.model_id):
                raise NameConflictError(f"{output_name} already exists ({taken.ref}): choose another --name")
            report = self._port_report(module, host)
            if report.level != hosts.COMPATIBLE:
                detail = "; ".join(report.evidence + report.missing[:3] + report.mismatched[:3])
                raise IncompatibleModulesError([f"cannot port {module.ref} to {report.to_base} ({report.level}): {detail}"])
            config = {**module.config, "base_model_name_or_path": host.model_id, "revision": host.revision or None}
            source = InputModule.from_row(module, a=Fraction(1), b=Fraction(1))
            digest, header = module.digest, read_header(self.store.local_path(module.digest))
        metadata = adapter_type(module.peft_type).describe(config, header)
        parameters = {"from": report.from_base, "to": report.to_base, "level": report.level, "evidence": report.evidence}
        identity = hashlib.sha256(
            json.dumps(["port", 1, source.digest, source.config_digest, report.to_base], sort_keys=True).encode()
        ).hexdigest()
        expression = f"port({source.ref}, to={report.to_base})"

        def attach(session: Session, new: Module) -> None:
            session.add(Derivation(
                module_id=new.id, expression=expression, canonical=expression, method="port", method_version=1,
                parameters=parameters, results={}, environment={"pem_registry": __version__}, identity=identity,
                inputs=[DerivationInput(position=0, input_id=source.module_id, input_digest=digest, a=1.0, b=1.0)],
            ))

        return self._register(
            output_name, kind="ported", digest=digest, size_bytes=module.size_bytes, config=config, metadata=metadata,
            task=module.task, tags=[], description=module.description, source=None, attach=attach,
        )

    # --- the Hub ------------------------------------------------------------------------------

    def pull(
        self,
        repo: str,
        *,
        name: str | None = None,
        task: str | None = None,
        tags: dict[str, str] | None = None,
        endpoint: str | None = None,
    ) -> ModuleInfo:
        """Register the adapter at ``REPO_ID[@REVISION]`` on the Hub (kind ``pulled``), pinned
        to the commit the revision resolves to. Pulling a commit already pulled returns its
        module (``created`` False); a new commit becomes a new version. Provenance in a
        ``pem-provenance.json`` sidecar is imported."""
        repo_id, revision = hub.parse_repo_reference(repo)
        module_name = parse_module_name(name or hub.default_name(repo_id))
        tag_pairs = parse_tags(tags)
        check_lengths(task=task)
        endpoint = (endpoint or self.settings.hub_endpoint).rstrip("/")
        commit, names = hub.resolve(repo_id, revision, endpoint)
        with self._session() as session:
            known = session.scalars(
                select(Module).join(HubLink, HubLink.module_id == Module.id).where(
                    HubLink.direction == "pull", HubLink.repo_id == repo_id, HubLink.commit == commit,
                    Module.namespace == module_name.namespace, Module.name == module_name.name,
                )
            ).first()
            if known is not None:
                return _module_info(known, created=False)
        with tempfile.TemporaryDirectory(prefix="pem-pull-") as tmp:
            files = hub.download(repo_id, commit, names, endpoint, Path(tmp))
            faults.point("pull-downloaded")
            config, metadata, digest, size = self._ingest(Path(tmp))
            weights_oid = hub.git_blob_oid(Path(tmp) / WEIGHTS_FILE)
            file_sha256 = _file_sha256(Path(tmp) / WEIGHTS_FILE)
        link = HubLink(direction="pull", endpoint=endpoint, repo_id=repo_id, revision=revision or "main",
                       commit=commit, weights_oid=weights_oid)
        sidecar = files.sidecar if files.sidecar and files.sidecar.module.digest == digest else None

        def attach(session: Session, module: Module) -> None:
            link.module_id = module.id
            session.add(link)
            if sidecar is not None and sidecar.derivation is not None:
                session.add(_imported_derivation(session, module, sidecar, repo_id, commit))

        source = {"hub": {"endpoint": endpoint, "repo_id": repo_id, "revision": revision or "main", "commit": commit,
                          "file_sha256": file_sha256}, "card": files.card}
        info = self._register(
            module_name, kind="pulled", digest=digest, size_bytes=size, config=config, metadata=metadata,
            task=task, tags=tag_pairs, description=None, source=source, attach=attach,
        )
        if not info.created:  # same content as a version we have: remember this commit too
            with self._write_session() as session:
                link.module_id = session.scalars(select(Module.id).where(
                    Module.namespace == module_name.namespace, Module.name == module_name.name,
                    Module.version == info.version)).one()
                session.add(link)
        return info

    def push(
        self,
        ref: str,
        repo: str,
        *,
        private: bool = False,
        branch: str | None = None,
        message: str | None = None,
        endpoint: str | None = None,
    ) -> PushResult:
        """Publish a module to the Hub: config, weights, a model card and the provenance
        sidecar. Creates the repo if needed; unchanged content makes no new commit."""
        repo_id, revision = hub.parse_repo_reference(repo)
        if revision:
            raise InvalidNameError(f"push takes a repo id without @revision: use --branch {revision}")
        endpoint = (endpoint or self.settings.hub_endpoint).rstrip("/")
        with self._session() as session:
            module = self._resolve(session, ref)
            input_ids = [i.input_id for i in module.derivation.inputs if i.input_id] if module.derivation else []
            links = {
                link.module_id: {"repo_id": link.repo_id, "commit": link.commit}
                for link in session.scalars(select(HubLink).where(HubLink.module_id.in_(input_ids)).order_by(HubLink.id))
            }
            sidecar = hub.sidecar_for(module, links)
            card = hub.model_card(module, sidecar)
            config, module_id, module_ref = module.config, module.id, module.ref
        weights = self.store.local_path(module.digest)
        with tempfile.TemporaryDirectory(prefix="pem-push-") as tmp:
            hub.stage_push(Path(tmp), config, weights, card, sidecar)
            commit = hub.upload(endpoint, repo_id, Path(tmp), private=private, branch=branch,
                                message=message or f"pem-registry: push {module_ref}")
        with self._write_session() as session:
            session.add(HubLink(module_id=module_id, direction="push", endpoint=endpoint, repo_id=repo_id,
                                revision=branch or "main", commit=commit, weights_oid=hub.git_blob_oid(weights)))
        return PushResult(ref=module_ref, repo_id=repo_id, branch=branch or "main", commit=commit,
                          url=f"{endpoint}/{repo_id}")

    def sync(self, *, pull: bool = False, endpoint: str | None = None) -> list[SyncStatus]:
        """For each pulled module, whether its repo moved on since the pinned commit; for each
        pushed one, whether the remote still holds what was pushed. ``pull`` pulls new
        commits as new versions."""
        with self._session() as session:
            # The newest link of each (name, direction, repo, branch): once a new commit was
            # pulled as @2, @1 is history, not a module that is behind.
            latest = (
                select(func.max(HubLink.id))
                .join(Module, Module.id == HubLink.module_id)
                .group_by(Module.namespace, Module.name, HubLink.direction, HubLink.repo_id, HubLink.revision)
            )
            rows = [
                (link, module.ref, module.full_name)
                for link, module in session.execute(
                    select(HubLink, Module).join(Module, Module.id == HubLink.module_id)
                    .where(HubLink.id.in_(latest)).order_by(HubLink.id)
                )
            ]
        return [self._sync_one(link, ref, full_name, pull, endpoint or link.endpoint) for link, ref, full_name in rows]

    def _sync_one(self, link: HubLink, ref: str, full_name: str, pull: bool, endpoint: str) -> SyncStatus:
        base = dict(ref=ref, direction=link.direction, repo_id=link.repo_id, revision=link.revision, commit=link.commit)
        try:
            head = hub.remote_head(endpoint, link.repo_id, link.revision)
            if link.direction == "pull":
                if head == link.commit:
                    return SyncStatus(**base, remote_commit=head, status="up-to-date", detail="pinned commit is the head")
                pulled = None
                if pull:
                    info = self.pull(f"{link.repo_id}@{link.revision}", name=full_name, endpoint=endpoint)
                    pulled = info.ref if info.created else None
                return SyncStatus(**base, remote_commit=head, status="behind", pulled=pulled,
                                  detail=f"{link.revision} moved to {head[:12]}")
            oid = hub.remote_weights_oid(endpoint, link.repo_id, link.revision)
        except HubError as exc:
            return SyncStatus(**base, remote_commit=None, status="error", detail=str(exc))
        if oid is None:
            return SyncStatus(**base, remote_commit=head, status="missing", detail="the weights are gone from the remote")
        if oid != link.weights_oid:
            return SyncStatus(**base, remote_commit=head, status="changed", detail="the remote weights differ from what was pushed")
        return SyncStatus(**base, remote_commit=head, status="in-sync", detail="the remote holds what was pushed")

    # --- aliases and metadata edits -----------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> AliasInfo:
        """Point ``NAME@ALIAS`` at version ``version`` (creating or moving it); the move is logged."""
        module_name, label = parse_module_name(name), parse_alias(alias)
        for attempt in range(VERSION_RETRIES):
            try:
                with self._write_session() as session:
                    target = self._resolve(session, f"{module_name}@{version}")
                    row = session.scalars(
                        select(AliasRow).where(
                            AliasRow.namespace == module_name.namespace, AliasRow.name == module_name.name,
                            AliasRow.alias == label,
                        ).with_for_update()  # concurrent moves queue up: none is lost from the log
                    ).first()
                    previous = session.get(Module, row.module_id).version if row is not None else None
                    if previous == target.version:  # already there: nothing moved, nothing to log
                        return AliasInfo(alias=f"{module_name}@{label}", ref=target.ref, version=target.version)
                    if row is None:
                        row = AliasRow(namespace=module_name.namespace, name=module_name.name, alias=label,
                                       module_id=target.id)
                        session.add(row)
                    row.module_id, row.updated_at = target.id, utcnow()
                    session.add(AliasEvent(namespace=module_name.namespace, name=module_name.name, alias=label,
                                           from_version=previous, to_version=target.version, by=self.settings.user))
                    return AliasInfo(alias=f"{module_name}@{label}", ref=target.ref, version=target.version)
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
                raise _unknown_alias(session, module_name, label)
            version = session.get(Module, row.module_id).version
            session.delete(row)
            session.add(AliasEvent(namespace=module_name.namespace, name=module_name.name, alias=label,
                                   from_version=version, to_version=None, by=self.settings.user))
            return AliasInfo(alias=f"{module_name}@{label}", ref=f"{module_name}@{version}", version=version)

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
            module = self._resolve(session, ref)
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
            return _module_info(module, aliases=_aliases_of(session, [module.id]).get(module.id, []))

    def describe(self, ref: str, description: str | None) -> ModuleInfo:
        """Replace a version's description (None clears it); recorded with time and author."""
        with self._write_session() as session:
            module = self._resolve(session, ref)
            if module.description != description:
                session.add(MetadataEvent(module_id=module.id, field="description", old=module.description,
                                          new=description, by=self.settings.user))
                module.description = description
            session.flush()
            return _module_info(module, aliases=_aliases_of(session, [module.id]).get(module.id, []))

    def history(self, ref: str) -> list[MetadataChange]:
        """The metadata edits of one version, oldest first."""
        with self._session() as session:
            module = self._resolve(session, ref)
            events = session.scalars(select(MetadataEvent).where(MetadataEvent.module_id == module.id).order_by(MetadataEvent.id))
            return [MetadataChange(field=e.field, old=e.old, new=e.new, at=e.at, by=e.by) for e in events]

    # --- maintenance --------------------------------------------------------------------------

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
        checks = [_check_database(settings)]
        store = open_store(settings.store, home=settings.home)
        checks.append(_check_store(store))
        if hasattr(store, "cache_info"):
            checks.append(_check_cache(store))
        checks.append(_check_hub(settings.hub_endpoint))
        return checks


    def gc(self, *, dry_run: bool = False, grace_seconds: float = GC_GRACE_SECONDS) -> GcReport:
        """Delete blobs no module references, and partial writes of crashed writers, older than
        ``grace_seconds`` (a writer stores its blob before committing its row: a recent
        unreferenced blob may be about to be registered). ``dry_run`` only lists them."""
        now = time.time()
        with self._write_session() as session:
            if self.engine.dialect.name == "postgresql":  # writers wait while blobs are collected
                session.execute(text("LOCK TABLE blobs IN ACCESS EXCLUSIVE MODE"))
            referenced = set(session.scalars(select(Module.digest).distinct()))
            blobs = [d for d in self.store.digests() if d not in referenced and now - self.store.modified_at(d) >= grace_seconds]
            stale_rows = list(session.scalars(select(Blob.digest).where(Blob.digest.not_in(select(Module.digest)))))
            temporary = [p for p, mtime in self.store.temporary_files() if now - mtime >= grace_seconds]
            freed = sum(self.store.size(d) for d in blobs)  # a remote store answers without downloading
            if not dry_run:
                for digest in stale_rows:
                    session.delete(session.get(Blob, digest))
                for digest in blobs:
                    self.store.delete(digest)
                for path in temporary:
                    path.unlink(missing_ok=True)
        return GcReport(dry_run=dry_run, blobs=blobs, temporary_files=[str(p) for p in temporary], bytes_freed=freed)

    # --- exporting and removing ---------------------------------------------------------------

    def export(self, ref: str, directory: str | os.PathLike[str]) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``
        (new or empty), a folder that ``PeftModel.from_pretrained`` loads."""
        target = Path(directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise PemError(f"export target {target} exists and is not an empty folder: choose a new folder")
        with self._session() as session:
            module = self._resolve(session, ref)
            config, digest = module.config, module.digest
        blob = self.store.local_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".pem-export-", dir=target.parent))
        try:
            (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(blob, staging / WEIGHTS_FILE)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def remove(self, ref: str) -> ModuleInfo:
        """Delete a module version; refused while modules derived from it exist. Its blob is
        deleted when no other module uses it."""
        with self._write_session() as session:
            module = self._resolve(session, ref)
            dependents = session.scalars(
                select(Module).join(DerivationInput, DerivationInput.module_id == Module.id)
                .where(DerivationInput.input_id == module.id).order_by(Module.id)
            ).all()
            if dependents:
                names = ", ".join(m.ref for m in dependents[:5])
                raise ModuleInUseError(
                    f"cannot remove {module.ref}: {names} {'was' if len(dependents) == 1 else 'were'} derived from it; "
                    "remove those first"
                )
            labels = _aliases_of(session, [module.id]).get(module.id, [])
            if labels:
                raise ModuleInUseError(
                    f"cannot remove {module.ref}: alias {', '.join(labels)} points at it; "
                    "move it (`pem alias set`) or remove it (`pem alias rm`) first"
                )
            info = _module_info(module)
            digest = module.digest
            session.delete(module)
            session.flush()
            orphan = session.scalar(select(func.count()).where(Module.digest == digest)) == 0
            if orphan:
                session.delete(session.get(Blob, digest))
        if orphan:  # after the commit: a crash here leaves a stray file, never a dangling row
            self.store.delete(digest)
        return info


# --- reading adapter folders ------------------------------------------------------------------


def read_adapter_folder(folder: Path) -> tuple[dict[str, Any], SafetensorsHeader]:
    """Validate a PEFT adapter folder and read its config and weights header (no tensor data)."""
    if not folder.is_dir():
        raise InvalidAdapterError(f"{folder} is not a folder: pass a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidAdapterError(f"{folder} has no {CONFIG_FILE}: is it a PEFT adapter folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge integers, hostile nesting
        raise InvalidAdapterError(f"{config_path} is not valid JSON ({exc.__class__.__name__}): fix or re-save it") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise InvalidAdapterError(f"{config_path} has no peft_type: is it a PEFT adapter config?")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (folder / p).is_file()]
        if pickles:
            raise UnsafeFormatError(
                f"{folder / pickles[0]} is a pickle, which the registry never loads: convert it to safetensors "
                "(load it in PEFT and save_pretrained(..., safe_serialization=True))"
            )
        raise InvalidAdapterError(f"{folder} has no {WEIGHTS_FILE}")
    return config, read_header(weights)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- rows to results --------------------------------------------------------------------------


def _imported_derivation(
    session: Session, module: Module, sidecar: ProvenanceSidecar, repo_id: str, commit: str
) -> Derivation:
    """The derivation a pulled sidecar describes; inputs registered here (by digest) are
    linked, the others are external nodes with the repo and commit they were published at."""
    assert sidecar.derivation is not None
    d = sidecar.derivation
    digests = [i.digest for i in d.inputs]
    local = {}
    for row in session.execute(
        select(Module.digest, func.min(Module.id))
        .where(Module.digest.in_(digests), Module.id != module.id)  # a port shares its input's digest
        .group_by(Module.digest)
    ):
        local[row[0]] = row[1]
    inputs = [
        DerivationInput(
            position=n, input_id=local.get(i.digest), input_digest=i.digest, a=i.a, b=i.b,
            external={"ref": i.ref, **(i.hub or {})},
        )
        for n, i in enumerate(d.inputs)
    ]
    identity = hashlib.sha256(json.dumps(["imported", repo_id, commit, module.digest]).encode()).hexdigest()
    environment = {**d.environment, "imported_from": f"{repo_id}@{commit}"}
    return Derivation(
        module_id=module.id, expression=d.expression, canonical=d.canonical, method=d.method,
        method_version=d.method_version, parameters=d.parameters, results=d.results, environment=environment,
        identity=identity, inputs=inputs,
    )


def _check_database(settings: Settings) -> HealthCheck:
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


def make_url_safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _check_store(store: BlobStore) -> HealthCheck:
    root = getattr(store, "root", None)
    if root is not None and not Path(root).is_dir():  # never create it just by looking
        return HealthCheck(name="store", ok=False, detail=f"{root} does not exist", fix="run `pem init`")
    try:
        next(iter(store.digests()), None)  # readable
        with store.writer() as writer:  # writable: a temporary write, then discarded
            writer.write(b"pem doctor")
    except Exception as exc:  # any failure here is the finding
        return HealthCheck(name="store", ok=False, detail=f"{store.location}: {exc.__class__.__name__}: {exc}",
                           fix="check PEM_STORE, its permissions or credentials")
    return HealthCheck(name="store", ok=True, detail=f"{store.location} readable and writable", fix=None)


def _check_cache(store: Any) -> HealthCheck:
    try:
        info = store.cache_info()
    except Exception as exc:
        return HealthCheck(name="cache", ok=False, detail=f"{exc.__class__.__name__}: {exc}", fix="run `pem cache clear`")
    return HealthCheck(name="cache", ok=True, detail=str(info), fix=None)


def _check_hub(endpoint: str) -> HealthCheck:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=5)
    except urllib.error.HTTPError:
        pass  # any HTTP answer (401 without a token) means the endpoint is there
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return HealthCheck(name="hub", ok=False, detail=f"{endpoint} unreachable ({reason})",
                           fix="check HF_ENDPOINT and the network (only pull, push and sync need it)")
    return HealthCheck(name="hub", ok=True, detail=f"{endpoint} reachable", fix=None)


def _environment() -> dict[str, Any]:
    """The stack a derivation was computed with (bit-for-bit re-derivation depends on it)."""
    import platform

    import safetensors
    import torch

    from registry import __version__

    return {
        "pem_registry": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


# Columns of a ModuleInfo, selected directly by list(): no ORM objects, no large JSON.
_INFO_COLUMNS = (
    Module.id, Module.namespace, Module.name, Module.version, Module.digest, Module.kind, Module.peft_type,
    Module.composable, Module.base_model, Module.base_revision, Module.task, Module.task_type, Module.rank,
    Module.lora_alpha, Module.use_rslora, Module.use_dora, Module.target_modules, Module.dtype,
    Module.num_parameters, Module.size_bytes, Module.owner, Module.description, Module.created_at,
)


def _info_fields(module: Any, tags: dict[str, str], aliases: list[str]) -> dict[str, Any]:
    """ModuleInfo fields from a Module row or a row of _INFO_COLUMNS."""
    return dict(
        name=f"{module.namespace}/{module.name}",
        version=module.version,
        ref=f"{module.namespace}/{module.name}@{module.version}",
        digest=module.digest,
        kind=module.kind,
        peft_type=module.peft_type,
        composable=module.composable,
        base_model=module.base_model,
        base_revision=module.base_revision,
        task=module.task,
        task_type=module.task_type,
        rank=module.rank,
        lora_alpha=module.lora_alpha,
        use_rslora=module.use_rslora,
        use_dora=module.use_dora,
        target_modules=module.target_modules,
        dtype=module.dtype,
        num_parameters=module.num_parameters,
        size_bytes=module.size_bytes,
        tags=tags,
        aliases=aliases,
        owner=module.owner,
        description=module.description,
        created_at=module.created_at,
    )


def _unknown_alias(session: Session, name: ModuleName, label: str) -> UnknownModuleError:
    known = session.scalars(
        select(AliasRow.alias).where(AliasRow.namespace == name.namespace, AliasRow.name == name.name)
    ).all()
    listed = f"; it has {', '.join(sorted(known))}" if known else "; set one with `pem alias set`"
    return UnknownModuleError(f"{name} has no alias {label!r}{listed}")


def _next_version(session: Session, name: ModuleName) -> int:
    """Take the next version of ``name``: one atomic UPDATE ... RETURNING, so concurrent
    writers queue on the counter's row lock and each gets its own number. The first
    registration of a name inserts the counter (two racing inserts: one retries)."""
    taken = session.execute(
        update(NameCounter)
        .where(NameCounter.namespace == name.namespace, NameCounter.name == name.name)
        .values(last_version=NameCounter.last_version + 1)
        .returning(NameCounter.last_version)
    ).scalar()
    if taken is None:
        session.add(NameCounter(namespace=name.namespace, name=name.name, last_version=1))
        session.flush()
        taken = 1
    return taken


def _module_info(module: Module, created: bool = True, aliases: list[str] | None = None) -> ModuleInfo:
    return ModuleInfo(**_info_fields(module, {t.key: t.value for t in module.tags}, aliases or []), created=created)


def _aliases_of(session: Session, module_ids: Any) -> dict[int, list[str]]:
    """Alias labels per module id (``module_ids``: a list or a select of ids)."""
    found: dict[int, list[str]] = {}
    for row in session.execute(
        select(AliasRow.module_id, AliasRow.alias).where(AliasRow.module_id.in_(module_ids)).order_by(AliasRow.alias)
    ):
        found.setdefault(row.module_id, []).append(row.alias)
    return found


def _module_details(module: Module, aliases: list[str]) -> ModuleDetails:
    derivation = module.derivation
    provenance = None
    if derivation is not None:
        provenance = Provenance(
            expression=derivation.expression,
            canonical=derivation.canonical,
            method=derivation.method,
            method_version=derivation.method_version,
            parameters=derivation.parameters,
            results=derivation.results,
            environment=derivation.environment,
            inputs=[
                ProvenanceInput(
                    ref=i.input.ref if i.input is not None else lineage_queries.external_label(i.external, i.input_digest),
                    digest=i.input_digest, a=i.a, b=i.b,
                )
                for i in derivation.inputs
            ],
            created_at=derivation.created_at,
        )
    return ModuleDetails(
        **_info_fields(module, {t.key: t.value for t in module.tags}, aliases),
        unsupported=module.unsupported,
        layers=module.layers,
        config=module.config,
        source=module.source,
        provenance=provenance,
    )
