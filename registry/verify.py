"""``pem verify``: every blob against its digest, every derivation re-run from its inputs.

Read-only: re-derivations are written to a scratch store in a temporary folder and thrown
away. Elementwise methods (module, exact) must re-derive bit for bit on the same torch
version; the non-linear methods end in an SVD, which depends on the LAPACK build and thread
count (SEMANTICS.md section 7), so when their digest differs they are compared by the relative
error of ``B @ A`` against the tolerance their provenance records, and the report says so.
A module made with a method or method version this pem cannot re-run is a failure, named.
"""

from __future__ import annotations

import hashlib
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from registry.compose.plan import InputModule, build_plan
from registry.db.models import Module
from registry.errors import BlobStoreError, PemError
from registry.methods import METHODS
from registry.schemas import VerifyFailure, VerifyReport
from registry.store import BlobStore, LocalBlobStore

DEFAULT_SVD_TOLERANCE = 1e-4  # for non-linear modules whose provenance records none


def blob_problem(store: BlobStore, digest: str) -> str | None:
    """None when the blob exists and hashes to its digest; otherwise what is wrong."""
    if not store.exists(digest):
        return f"blob sha256:{digest[:12]} is missing from the store"
    try:
        path = store.local_path(digest)
    except BlobStoreError as exc:  # a remote store refuses a download that does not match its digest
        return str(exc)
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
            hasher.update(chunk)
    if hasher.hexdigest() != digest:
        return f"blob sha256:{digest[:12]} is corrupt: its bytes hash to sha256:{hasher.hexdigest()[:12]}"
    return None


def verify_modules(
    registry: Any, session: Session, modules: list[Module], progress: Any = None,
    graph: dict[str, list[str]] | None = None,
) -> VerifyReport:
    """``graph``: corrupt provenance found by :func:`registry.lineage.graph_problems`, per
    ref; such a module is reported for it and not re-derived (its recorded inputs are not
    what it was made from, so a re-derivation would blame the wrong cause)."""
    graph = dict(graph or {})
    failures: list[VerifyFailure] = []
    notes: list[str] = []
    blob_problems: dict[str, str | None] = {}
    rederived = 0
    for done, module in enumerate(modules, 1):
        if module.ref in graph:
            failures.append(VerifyFailure(ref=module.ref, problem=corrupt_provenance(module.ref, graph.pop(module.ref))))
            if progress is not None:
                progress(done, len(modules))
            continue
        if module.digest not in blob_problems:
            blob_problems[module.digest] = blob_problem(registry.store, module.digest)
        problem = blob_problems[module.digest]
        external = module.derivation is not None and any(i.input is None for i in module.derivation.inputs)
        if problem is None and external:
            notes.append(f"{module.ref}: some inputs are external (imported provenance): not re-derived")
        elif problem is None and module.derivation is not None and module.derivation.method not in METHODS:
            if module.derivation.method != "port":
                problem = (
                    f"cannot re-derive: method {module.derivation.method!r} is unknown to this pem "
                    f"(it knows {', '.join(METHODS)})"
                )
        elif problem is None and module.derivation is not None:
            for item in module.derivation.inputs:
                if item.input.digest not in blob_problems:
                    blob_problems[item.input.digest] = blob_problem(registry.store, item.input.digest)
            bad_inputs = [i.input.ref for i in module.derivation.inputs if blob_problems[i.input.digest]]
            if bad_inputs:
                problem = f"cannot re-derive: input {', '.join(bad_inputs)} failed verification"
            else:
                problem, note = rederive(registry, module)
                rederived += 1
                if note:
                    notes.append(f"{module.ref}: {note}")
        if problem is None and module.derivation is not None and module.derivation.method == "port":
            source = module.derivation.inputs[0].input
            if source.digest != module.digest:  # a port shares its source's tensors
                problem = f"ported from {source.ref} but its tensors differ (sha256:{module.digest[:12]} vs {source.digest[:12]})"
        if problem is not None:
            failures.append(VerifyFailure(ref=module.ref, problem=problem))
        if progress is not None:
            progress(done, len(modules))
    for ref, problems in sorted(graph.items()):  # ancestors of the module verified
        failures.append(VerifyFailure(ref=ref, problem=corrupt_provenance(ref, problems)))
    return VerifyReport(checked=len(modules), rederived=rederived, ok=not failures, failures=failures, notes=notes)


def corrupt_provenance(ref: str, problems: list[str]) -> str:
    return f"corrupt provenance: {ref} {'; '.join(problems)}"


def _inputs(module: Module) -> list[InputModule]:
    assert module.derivation is not None
    return [
        InputModule.from_row(item.input, position=item.position, a=Fraction(item.a), b=Fraction(item.b))
        for item in module.derivation.inputs
    ]


def rederive(registry: Any, module: Module) -> tuple[str | None, str | None]:
    """(problem, note): re-run the stored derivation and compare it with the stored blob."""
    derivation = module.derivation
    assert derivation is not None
    method = METHODS[derivation.method]
    older = derivation.method_version != method.version
    if older and derivation.method_version not in method.checkable_versions:
        return (
            f"cannot re-derive: made with {method.name} version {derivation.method_version}, and this pem "
            f"computes version {method.version} only",
            None,
        )
    parameters = derivation.parameters
    try:
        plan, violations = build_plan(
            derivation.expression, derivation.canonical, _inputs(module), method,
            {k: v for k, v in parameters.items() if k not in ("union", "dtype")},
            parameters.get("dtype"), bool(parameters.get("union")),
        )
    except PemError as exc:
        return f"cannot re-derive: {exc}", None
    if plan is None:
        return f"cannot re-derive: {'; '.join(violations)}", None
    from registry.compose.engine import evaluate

    with tempfile.TemporaryDirectory(prefix="pem-verify-") as scratch:
        scratch_store = LocalBlobStore(Path(scratch))
        try:
            digest, _, _ = evaluate(plan, registry.store, output_store=scratch_store)
        except PemError as exc:
            return f"re-derivation failed: {exc}", None
        if digest == module.digest:
            return None, None
        if not method.linear:
            made = f"{method.name} version {derivation.method_version}" if older else method.name
            tolerance = float(derivation.results.get("verify_tolerance", DEFAULT_SVD_TOLERANCE))
            error = _relative_effect_error(registry.store.local_path(module.digest), scratch_store.local_path(digest))
            if error <= tolerance:
                return None, (
                    f"{made} re-derived" + (f" with version {method.version}" if older else "")
                    + f" within its recorded tolerance (relative error of B@A {error:.2e} <= {tolerance:g}), "
                    "compared by effect, not by digest"
                )
            return f"{made} re-derivation differs: relative error of B@A {error:.2e} > {tolerance:g}", None
    stack = derivation.environment
    return (
        f"re-derivation gives sha256:{digest[:12]}, stored sha256:{module.digest[:12]} "
        f"(made with {_stack_text(stack)})",
        None,
    )


def _stack_text(stack: dict[str, Any]) -> str:
    if "numpy" in stack:
        return f"numpy {stack['numpy']}"
    return f"torch {stack.get('torch')}, safetensors {stack.get('safetensors')}"


def _relative_effect_error(stored: Path, rederived: Path) -> float:
    import torch
    from safetensors.torch import load_file

    left, right = load_file(str(stored)), load_file(str(rederived))
    error_sq = norm_sq = 0.0
    for name in sorted(left):
        if not name.endswith(".lora_A.weight"):
            continue
        b_name = name.replace(".lora_A.weight", ".lora_B.weight")
        mine = left[b_name].float() @ left[name].float()
        theirs = right[b_name].float() @ right[name].float()
        error_sq += torch.linalg.matrix_norm(mine - theirs).item() ** 2
        norm_sq += torch.linalg.matrix_norm(mine).item() ** 2
    return (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0
