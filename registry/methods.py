"""Composition methods: one table, one screen.

A method is a name, a version (bumped whenever the order or form of its floating-point
operations changes, since that changes digests), the parameters it declares, and the PEFT
types that implement it. The arithmetic itself lives with each type
(``registry/adapters/<type>/compose.py``), because it is type-specific; this table is what
``pem check`` validates against before anything is loaded, and what provenance records.
Later methods (ties, dare, magnitude_prune) are added here and in the types that support them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry.errors import UnsupportedMethodError


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type
    help: str
    default: Any = None


@dataclass(frozen=True)
class Method:
    name: str
    version: int
    summary: str
    peft_types: frozenset[str]
    # Linear methods compose across lineage levels (pem contents multiplies coefficients
    # along paths); others are opaque nodes.
    linear: bool
    parameters: tuple[Parameter, ...] = ()

    def validate(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check parameters by name and type; returns every declared parameter with its value."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(k for k, v in given.items() if v is not None and k not in declared)
        if unknown:
            raise UnsupportedMethodError(
                f"method {self.name!r} takes no parameter {', '.join(unknown)}"
                + (f" (it takes: {', '.join(declared)})" if declared else "")
            )
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            value = given.get(parameter.name, parameter.default)
            if value is not None and not isinstance(value, parameter.kind):
                raise UnsupportedMethodError(f"method {self.name!r}: {parameter.name} must be {parameter.kind.__name__}")
            values[parameter.name] = value
        return values


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "module", 1,
            "the paper's arithmetic on module parameters (Zhang et al. 2023); rank is kept",
            frozenset({"LORA", "IA3"}), linear=True,
        ),
        Method(
            "exact", 1,
            "exact sum of the effects, stored by concatenating ranks (= PEFT's 'cat')",
            frozenset({"LORA"}), linear=True,
        ),
        Method(
            "svd", 1,
            "exact sum of the effects, truncated to a rank by SVD (= PEFT's 'svd')",
            frozenset({"LORA"}), linear=False,
            parameters=(Parameter("rank", int, "output rank (default: the largest input rank)"),),
        ),
    )
}
DEFAULT_METHOD = "module"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnsupportedMethodError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None
