"""Composition: check an expression on metadata, then evaluate it into a new module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.api.common import (
    check_lengths,
    environment,
    module_info,
)
from registry.db.models import (
    Derivation,
    DerivationInput,
    Module,
)
from registry.errors import (
    AmbiguousReferenceError,
    BlobStoreError,
    CorruptBlobError,
    IncompatibleModulesError,
    InvalidNameError,
    NameConflictError,
    NotFoundError,
    UnknownModuleError,
    UnsupportedMethodError,
)
from registry.methods import DEFAULT_METHOD, get_method
from registry.refs import (
    parse_module_name,
)
from registry.schemas import (
    CheckReport,
    Deviation,
    ModuleInfo,
    OutputSummary,
    TermInfo,
)
from registry.store.checked import check_blob, reading

if TYPE_CHECKING:
    from registry.compose.plan import InputModule, OutputPlan


class Composing:
    """Part of :class:`registry.Registry` (see registry/api/__init__.py)."""


    def check(
        self,
        expression: str,
        *,
        method: str = DEFAULT_METHOD,
        rank: int | None = None,
        density: float | None = None,
        seed: int | None = None,
        majority_sign: str | None = None,
        space: str | None = None,
        dtype: str | None = None,
        union: bool = False,
        deviation: bool = False,
    ) -> CheckReport:
        """Parse, resolve, type-check and validate ``expression`` on metadata alone, and say
        what the output would be, with an estimate of the time and memory computing it takes.
        Incompatibilities are listed in the report (``composable`` False), not raised; a
        parameter the method does not take, or out of range, raises. ``deviation`` (LoRA)
        reads the tensors to measure how far the result's effect is from the exact sum."""
        from registry.adapters import adapter_type

        given = {"rank": rank, "density": density, "seed": seed, "majority_sign": majority_sign, "space": space}
        plan, inputs, canonical_text, violations = self._plan(expression, method, given, dtype, union)
        report = CheckReport(
            expression=expression,
            canonical=canonical_text,
            method=method,
            parameters=plan.parameters if plan else {**given, "union": union, "dtype": dtype},
            composable=plan is not None,
            violations=violations,
            terms=[
                TermInfo(ref=i.ref, digest=i.digest, peft_type=i.peft_type, a=float(i.a), b=float(i.b))
                for i in sorted(inputs, key=lambda i: i.position)
            ],
            output=None if plan is None else OutputSummary(
                peft_type=plan.peft_type, dtype=plan.dtype, rank=plan.max_rank, layers=len(plan.layers),
                num_parameters=plan.num_parameters, size_bytes=plan.size_bytes,
                **adapter_type(plan.peft_type).estimate(plan),
            ),
            notes=plan.notes if plan else [],
        )
        if deviation and plan is not None:
            if plan.peft_type != "LORA":
                raise UnsupportedMethodError("--deviation applies to LoRA inputs")
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
        density: float | None = None,
        seed: int | None = None,
        majority_sign: str | None = None,
        space: str | None = None,
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
        # Imported here: commands that never compose (list, show) should not pay for them.
        from registry.adapters import adapter_type
        from registry.adapters.base import copy_magnitudes, has_magnitudes, record_magnitudes
        from registry.safetensors_io import read_header

        output_name = parse_module_name(name)
        check_lengths(description=description)
        self._check_new_name_early(output_name)
        given = {"rank": rank, "density": density, "seed": seed, "majority_sign": majority_sign, "space": space}
        plan, _, _, violations = self._plan(expression, method, given, dtype, union)
        if plan is not None and self._record_magnitudes(i.digest for i in plan.inputs if not has_magnitudes(i.layers)):
            # Inputs registered before magnitudes were recorded: now known, check the range again.
            plan, _, _, violations = self._plan(expression, method, given, dtype, union)
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
                    return module_info(module, created=False)
            if same_name and not new_version:
                raise NameConflictError(
                    f"{output_name} already exists ({same_name[0].ref}) and was made differently: "
                    "choose another --name, or pass --new-version to add a version"
                )
            earlier = session.scalars(
                select(Derivation).where(Derivation.identity == identity).order_by(Derivation.module_id)
            ).first()
            reuse = (
                (earlier.module.digest, earlier.results, earlier.module.layers, earlier.module.ref)
                if earlier is not None else None
            )
        maxima: dict[str, float] = {}
        if reuse is not None and self.store.exists(reuse[0]):
            digest, results, _, earlier_ref = reuse  # the same derivation was computed before: share its blob
            size = self.store.size(digest)
            check_blob(self.store, earlier_ref, digest, size)
        else:
            digest, size, results = self._evaluate(plan, progress, maxima)
            reuse = None
            if "rank" in plan.parameters:  # requested (parameters) and effective rank, issue 14 item 11
                results = {**results, "effective_rank": plan.max_rank}
        handler = adapter_type(plan.peft_type)
        arrays = getattr(handler.compute(plan.method.name), "ARRAYS", "torch")
        metadata = handler.describe(plan.config, read_header(self.store.local_path(digest)))
        if reuse is not None:
            copy_magnitudes(reuse[2], metadata.layers)
        else:
            record_magnitudes(metadata.layers, handler.tensor_suffixes, maxima)

        def attach(session: Session, module: Module) -> None:
            session.add(Derivation(
                module_id=module.id,
                expression=expression,
                canonical=plan.canonical,
                method=plan.method.name,
                method_version=plan.method.version,
                parameters=plan.parameters,
                results=results,
                environment=environment(arrays),
                identity=identity,
                inputs=[
                    DerivationInput(position=n, input_id=i.module_id, input_digest=i.digest, a=float(i.a), b=float(i.b))
                    for n, i in enumerate(plan.inputs)
                ],
            ))

        return self._register(
            output_name, kind="derived", digest=digest, size_bytes=size, config=plan.config, metadata=metadata,
            task=None, tags=[], description=description, source=None, attach=attach,
            inputs=plan.inputs, doing="composing",
        )

    def _evaluate(self, plan: OutputPlan, progress: Any, maxima: dict[str, float]) -> tuple[str, int, dict[str, Any]]:
        from registry.compose.engine import evaluate

        try:
            return reading(self.store, lambda: evaluate(plan, self.store, progress, magnitudes=maxima))
        except BlobStoreError as exc:
            if isinstance(exc, CorruptBlobError):
                raise
            # A blob that vanished after planning: its module was removed meanwhile (pem rm
            # deletes an orphaned blob), which verify could not find; say so.
            with self._session() as session:
                present = set(session.scalars(select(Module.id).where(Module.id.in_([i.module_id for i in plan.inputs]))))
            removed = [i.ref for i in plan.inputs if i.module_id not in present]
            if removed:
                raise UnknownModuleError(
                    f"input {', '.join(removed)} was removed while composing; nothing was registered"
                ) from None
            raise

    def _plan(
        self, expression: str, method_name: str, parameters: dict[str, Any], dtype: str | None, union: bool
    ) -> tuple[OutputPlan | None, list[InputModule], str, list[str]]:
        """Everything before tensors: (plan or None, inputs, canonical text, violations)."""
        from registry.compose.plan import InputModule, bind_terms, build_plan, parse_expression
        from registry.language import caret

        method = get_method(method_name)
        method.validate(parameters)  # before the catalog is read: a typo costs nothing
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
        plan, violations = build_plan(expression, canonical_text, inputs, method, parameters, dtype, union)
        return plan, inputs, canonical_text, violations

