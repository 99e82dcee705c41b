"""Base models and porting between hosts (Sabry & Belz, 2024)."""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry import __version__, lazy_module
from registry.db.models import (
    BaseModelRecord,
    Derivation,
    DerivationInput,
    Module,
)
from registry.errors import (
    AmbiguousReferenceError,
    IncompatibleModulesError,
    NameConflictError,
    UnknownBaseModelError,
)
from registry.refs import (
    BaseReference,
    parse_base_reference,
    parse_module_name,
)
from registry.schemas import (
    BaseModelInfo,
    ModuleInfo,
    PortReport,
)
from registry.store.checked import check_blob


hosts = lazy_module("registry.hosts")  # loaded on first use: most commands never port

class Porting:
    """Part of :class:`registry.Registry` (see registry/api/__init__.py)."""


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
        structure, unknown_reason = hosts.build_structure(config)
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
            return self._base_info(session, record).model_copy(update={"structure_unknown_reason": unknown_reason})

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
        from registry.adapters import adapter_type
        from registry.adapters.base import copy_magnitudes
        from registry.compose.plan import InputModule
        from registry.safetensors_io import read_header

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
            digest, size = module.digest, module.size_bytes
        check_blob(self.store, source.ref, digest, size)  # the port is registered from this blob
        header = read_header(self.store.local_path(digest, verified=False))
        metadata = adapter_type(module.peft_type).describe(config, header)
        copy_magnitudes(source.layers, metadata.layers)  # the same tensors
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
            inputs=[source], doing="porting",
        )

