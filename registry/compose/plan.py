"""From an expression to a checked plan, on catalog metadata alone (no tensor is read).

The steps: parse and type-check the expression (``registry.language``), resolve its
references, merge terms that name the same module, check compatibility (SEMANTICS.md
section 4: every violation at once), then let the PEFT type plan the output: its layers,
tensor shapes, dtype and adapter config. Only a plan that passed every check reaches the
engine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable

from registry.adapters import adapter_type
from registry.adapters.base import module_key
from registry.errors import ExpressionTypeError, UnsupportedMethodError
from registry.language import Term, canonical, caret, flatten, merge_terms, parse
from registry.methods import Method
from registry.safetensors_io import DTYPE_SIZES, FLOAT_DTYPES, canonical_header

OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class InputModule:
    """One distinct input of a composition, with its coefficients."""

    ref: str  # NS/NAME@VERSION
    module_id: int
    digest: str
    config_digest: str
    peft_type: str
    composable: bool
    unsupported: tuple[str, ...]
    base_model: str
    base_revision: str | None
    dtype: str
    layers: dict[str, dict[str, Any]]
    config: dict[str, Any]
    a: Fraction
    b: Fraction
    position: int = 0  # first appearance in the expression (for display)
    size_bytes: int | None = None  # of the blob, checked before it is read

    @classmethod
    def from_row(cls, module: Any, position: int = 0, a: Fraction = Fraction(0), b: Fraction = Fraction(0)) -> "InputModule":
        """From a catalog row (registry.db.models.Module)."""
        return cls(
            ref=module.ref, module_id=module.id, digest=module.digest, config_digest=module.config_digest,
            peft_type=module.peft_type, composable=module.composable, unsupported=tuple(module.unsupported),
            base_model=module.base_model, base_revision=module.base_revision, dtype=module.dtype,
            layers=module.layers, config=module.config, a=a, b=b, position=position, size_bytes=module.size_bytes,
        )


@dataclass
class OutputPlan:
    """What the composition will write, decided before any tensor is read."""

    method: Method
    parameters: dict[str, Any]
    inputs: list[InputModule]  # in canonical (computation) order
    peft_type: str
    dtype: str  # safetensors dtype of the output, e.g. "F32"
    layers: list[str]  # every output layer, sorted
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # output tensor name -> (dtype, shape)
    config: dict[str, Any]
    expression: str
    canonical: str
    union: bool
    notes: list[str] = field(default_factory=list)  # caveats to show the user

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())

    @property
    def size_bytes(self) -> int:
        header, _ = canonical_header((name, dtype, shape) for name, (dtype, shape) in self.tensors.items())
        return len(header) + sum(DTYPE_SIZES[dtype] * math.prod(shape) for dtype, shape in self.tensors.values())

    @property
    def max_rank(self) -> int | None:
        ranks = [shape[0] for name, (_, shape) in self.tensors.items() if name.endswith(".lora_A.weight")]
        return max(ranks) if ranks else None

    def identity(self) -> str:
        """A hash of everything that determines the output's bytes: method and version,
        parameters, output dtype, and each input's content, config and coefficients."""
        payload = {
            "method": self.method.name,
            "method_version": self.method.version,
            "parameters": self.parameters,
            "inputs": [[i.digest, i.config_digest, str(i.a), str(i.b)] for i in self.inputs],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def parse_expression(expression: str) -> tuple[Any, list[Term]]:
    tree = parse(expression)
    return tree, flatten(tree, expression)


def bind_terms(
    tree: Any, terms: list[Term], resolve: Callable[[str], InputModule], expression: str
) -> tuple[list[InputModule], str]:
    """Resolve each term's reference and merge terms naming the same module. Returns the
    inputs in canonical order (by digest, then config) and the canonical expression text."""
    resolved = {t.ref: resolve(t.ref) for t in terms}
    merged = merge_terms(terms, key=lambda ref: resolved[ref].module_id)
    inputs = []
    for term in merged:
        module = resolved[term.ref]
        try:
            float(term.a), float(term.b)
        except OverflowError:
            raise ExpressionTypeError(
                f"the coefficient of {term.ref} is too large to compute with\n{caret(expression, term.start, term.end)}"
            ) from None
        inputs.append(_with_coefficients(module, term.a, term.b))
    inputs.sort(key=lambda i: (i.digest, i.config_digest))
    return inputs, canonical(tree, rename=lambda ref: resolved[ref].ref)


def _with_coefficients(module: InputModule, a: Fraction, b: Fraction) -> InputModule:
    return replace(module, a=a, b=b)


def build_plan(
    expression: str,
    canonical_text: str,
    inputs: list[InputModule],
    method: Method,
    parameters: dict[str, Any],
    dtype: str | None,
    union: bool,
) -> tuple[OutputPlan | None, list[str]]:
    """Check the inputs and plan the output. Returns (plan, []) or (None, violations)."""
    handler = adapter_type(inputs[0].peft_type)
    same_type = [i for i in inputs if i.peft_type == handler.peft_type]
    violations = check_compatibility(inputs, method, union) + handler.extra_violations(same_type, method.name, union)
    if violations:
        return None, violations
    out_dtype = output_dtype(inputs, dtype)
    typed = handler.plan_output(inputs, method.name, method.validate(parameters), out_dtype)
    range_violations, range_notes = handler.range_problems(inputs, method.name, out_dtype)
    if range_violations:
        return None, range_violations
    plan = OutputPlan(
        method=method,
        parameters={**typed.parameters, "union": union, "dtype": out_dtype},
        inputs=inputs,
        peft_type=handler.peft_type,
        dtype=out_dtype,
        layers=typed.layers,
        tensors=typed.tensors,
        config=typed.config,
        expression=expression,
        canonical=canonical_text,
        union=union,
        notes=typed.notes + range_notes,
    )
    return plan, []


def output_dtype(inputs: list[InputModule], requested: str | None) -> str:
    if requested is not None:
        if requested in FLOAT_DTYPES:  # already a safetensors name (as provenance records it)
            return requested
        if requested not in OUTPUT_DTYPES:
            raise UnsupportedMethodError(f"unknown dtype {requested!r}: use one of {', '.join(OUTPUT_DTYPES)}")
        return OUTPUT_DTYPES[requested]
    dtypes = {i.dtype for i in inputs}
    if len(dtypes) == 1 and next(iter(dtypes)) in FLOAT_DTYPES:
        return next(iter(dtypes))
    return "F64" if "F64" in dtypes else "F32"  # mixed inputs: the widest float in use


# --- compatibility (SEMANTICS.md section 4) ---------------------------------------------------


def check_compatibility(inputs: list[InputModule], method: Method, union: bool) -> list[str]:
    """Every reason the inputs cannot be composed with ``method``; empty when they can.

    Each input is compared with the first input of its PEFT type (and each layer with the
    first input that adapts it), so every violation is found whatever the inputs' order."""
    violations: list[str] = []
    for module in inputs:
        if module.unsupported:
            violations.append(
                f"{module.ref} uses {', '.join(module.unsupported)}, whose arithmetic is not defined: "
                "it cannot be composed"
            )
        elif module.peft_type not in method.peft_types:
            violations.append(
                f"method {method.name!r} does not apply to {module.peft_type} ({module.ref}); "
                f"it takes {', '.join(sorted(method.peft_types))}"
            )
    first = inputs[0]
    for other in inputs[1:]:
        if other.peft_type != first.peft_type:
            violations.append(
                f"{first.ref} and {other.ref} have different PEFT types: {first.peft_type} vs {other.peft_type}"
            )
    for group in _by_type(inputs).values():
        violations.extend(_pair_violations(group))
        violations.extend(_revision_violations(group))
        violations.extend(layer_violations(group, union, _layer_shape_problem))
    return violations


def _by_type(inputs: list[InputModule]) -> dict[str, list[InputModule]]:
    groups: dict[str, list[InputModule]] = {}
    for module in inputs:
        groups.setdefault(module.peft_type, []).append(module)
    return groups


def _pair_violations(group: list[InputModule]) -> list[str]:
    violations = []
    first = group[0]
    for other in group[1:]:
        pair = f"{first.ref} and {other.ref}"
        if other.base_model != first.base_model:
            violations.append(
                f"{pair} have different base models: {first.base_model} vs {other.base_model} "
                f"(port one with `pem port` first)"
            )
        ff_a, ff_b = bool(first.config.get("fan_in_fan_out")), bool(other.config.get("fan_in_fan_out"))
        if ff_a != ff_b:
            violations.append(f"{pair} differ in fan_in_fan_out: {ff_a} vs {ff_b}")
    return violations


def _revision_violations(group: list[InputModule]) -> list[str]:
    """Revisions are compared where known: one base model, at most one known revision."""
    pinned: dict[str, list[InputModule]] = {}
    for module in group:
        if module.base_revision:
            pinned.setdefault(module.base_model, []).append(module)
    violations = []
    for base, modules in pinned.items():
        first = modules[0]
        for other in modules[1:]:
            if other.base_revision != first.base_revision:
                violations.append(
                    f"{first.ref} and {other.ref} have different base model revisions of {base}: "
                    f"{first.base_revision} vs {other.base_revision}"
                )
    return violations


LayerProblem = Callable[[dict, dict], "tuple[str, str] | None"]


def layer_violations(group: list[Any], union: bool, problem: LayerProblem) -> list[str]:
    """Per layer, each input that adapts it against the first one that does; ``problem``
    says what differs between two layer descriptions, as (what, detail), or None. Without ``union``,
    every input must adapt the same layers as the first."""
    violations = []
    first = group[0]
    if not union:
        for other in group[1:]:
            only_first = sorted(set(first.layers) - set(other.layers))
            only_other = sorted(set(other.layers) - set(first.layers))
            if only_first or only_other:
                parts = []
                if only_first:
                    parts.append(f"{len(only_first)} only in {first.ref} (e.g. {module_key(only_first[0])})")
                if only_other:
                    parts.append(f"{len(only_other)} only in {other.ref} (e.g. {module_key(only_other[0])})")
                violations.append(
                    f"{first.ref} and {other.ref} adapt different layers: {'; '.join(parts)}; "
                    "pass --union to compose the union"
                )
    owner: dict[str, Any] = {}
    for module in group:
        for layer in sorted(module.layers):
            reference = owner.setdefault(layer, module)
            if reference is module:
                continue
            difference = problem(reference.layers[layer], module.layers[layer])
            if difference:
                what, detail = difference
                violations.append(f"{reference.ref} and {module.ref} {what} at {module_key(layer)}: {detail}")
    return violations


def _layer_shape_problem(left: dict[str, Any], right: dict[str, Any]) -> tuple[str, str] | None:
    if _io_shape(left) != _io_shape(right):
        return "have different shapes", f"{_describe_shape(left)} vs {_describe_shape(right)}"
    if left.get("feedforward") != right.get("feedforward"):
        return "disagree on feed-forward", f"{bool(left.get('feedforward'))} vs {bool(right.get('feedforward'))}"
    return None


def _io_shape(layer: dict[str, Any]) -> Any:
    """The shape a layer's update must have, independent of rank."""
    params = layer["params"]
    if "lora_A" in params:
        return (params["lora_B"][0], params["lora_A"][1])
    return tuple(tuple(s) for _, s in sorted(params.items()))


def _describe_shape(layer: dict[str, Any]) -> str:
    return " ".join(f"{p} {s}" for p, s in sorted(layer["params"].items()))

