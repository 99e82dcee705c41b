"""Composition methods: one table, one screen.

A method is a name, a version (bumped whenever the order or form of its floating-point
operations changes, since that changes digests), the parameters it declares, and the PEFT
types that implement it. The arithmetic itself lives with each type
(``registry/adapters/<type>/compute.py``), because it is type-specific; this table is what
``pem check`` validates against before anything is loaded, and what provenance records.

The non-linear merges (ties, dare_linear, dare_ties, magnitude_prune) follow PEFT's
``merge_utils`` on the per-layer effects, then truncate by SVD (PEFT's ``*_svd`` types). With
``space="core"`` they run on the small core matrices of Panariello et al. (NeurIPS 2025)
instead of the dense effects (SEMANTICS.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from registry.errors import UnsupportedMethodError

MAX_RANK = 1 << 20  # far above any real layer; a larger request is a typo
MAX_SEED = (1 << 63) - 1


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    # A reason the value is refused, or None: checked before anything is read.
    problem: Callable[[Any], str | None] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    version: int
    summary: str
    peft_types: frozenset[str]
    # Linear methods compose across lineage levels (pem contents multiplies coefficients
    # along paths); others are opaque nodes. Non-linear methods end in an SVD, whose bits
    # depend on the LAPACK build and thread count: verify compares them by effect.
    linear: bool
    parameters: tuple[Parameter, ...] = ()
    # Earlier versions whose stored outputs the current arithmetic still checks by effect
    # (within the tolerance they recorded); any other version is a verify failure.
    checkable_versions: frozenset[int] = frozenset()

    def validate(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check parameters by name, type and range; returns every declared parameter with its value."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(k for k, v in given.items() if v is not None and k not in declared)
        if unknown:
            raise UnsupportedMethodError(
                f"method {self.name!r} takes no parameter {', '.join(unknown)}"
                + (f" (it takes: {', '.join(declared)})" if declared else "")
            )
        values: dict[str, Any] = {}
        for parameter in self.parameters:
            value = given.get(parameter.name)
            if value is None:
                if parameter.required:
                    raise UnsupportedMethodError(
                        f"method {self.name!r} needs --{_option(parameter.name)}: {parameter.help}"
                    )
                value = parameter.default
            values[parameter.name] = None if value is None else _checked(self.name, parameter, value)
        return values


def _option(name: str) -> str:
    return name.replace("_", "-")


def _checked(method: str, parameter: Parameter, value: Any) -> Any:
    if parameter.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, parameter.kind) or isinstance(value, bool) != (parameter.kind is bool):
        raise UnsupportedMethodError(f"method {method!r}: {parameter.name} must be {parameter.kind.__name__}")
    if parameter.choices and value not in parameter.choices:
        raise UnsupportedMethodError(
            f"method {method!r}: unknown {parameter.name} {value!r}: use one of {', '.join(parameter.choices)}"
        )
    reason = parameter.problem(value) if parameter.problem else None
    if reason:
        raise UnsupportedMethodError(f"method {method!r}: --{_option(parameter.name)} {reason}, got {value!r}")
    return value


def _rank_problem(value: int) -> str | None:
    return None if 1 <= value <= MAX_RANK else f"must be from 1 to {MAX_RANK}"


def _density_problem(value: float) -> str | None:
    return None if math.isfinite(value) and 0 < value <= 1 else "must lie in (0, 1]"


def _seed_problem(value: int) -> str | None:
    return None if 0 <= value <= MAX_SEED else f"must be from 0 to {MAX_SEED}"


RANK = Parameter("rank", int, "output rank (default: the largest input rank)", problem=_rank_problem)
DENSITY = Parameter("density", float, "the fraction of entries each input keeps, in (0, 1]", required=True,
                    problem=_density_problem)
SEED = Parameter("seed", int, "seeds DARE's random drop mask (the same seed gives the same result)", required=True,
                 problem=_seed_problem)
MAJORITY_SIGN = Parameter("majority_sign", str, "how TIES elects each entry's sign: total (sum of values) or "
                          "frequency (count of signs)", default="total", choices=("total", "frequency"))
SPACE = Parameter("space", str, "full: on the dense per-layer effects, as PEFT; core: on the small core matrices "
                  "of the stacked factors (Core Space merging)", default="full", choices=("full", "core"))

LORA = frozenset({"LORA"})


def _merge(name: str, summary: str, *parameters: Parameter) -> Method:
    return Method(name, 1, summary, LORA, linear=False, parameters=(RANK, *parameters, SPACE))


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
            LORA, linear=True,
        ),
        # Version 2 computes the truncation from the factors (thin bases of the stacked
        # factors and an SVD of the small core); version 1 took a dense SVD of every delta.
        # Both give the same B@A within float tolerance, so verify checks version 1 by effect.
        Method(
            "svd", 2,
            "exact sum of the effects, truncated to a rank by SVD (= PEFT's 'svd')",
            LORA, linear=False, parameters=(RANK,), checkable_versions=frozenset({1}),
        ),
        _merge("ties", "TIES: prune each effect by magnitude, elect signs, average the agreeing entries "
               "(= PEFT's 'ties_svd')", DENSITY, MAJORITY_SIGN),
        _merge("dare_linear", "DARE: drop entries at random and rescale, then a weighted sum "
               "(= PEFT's 'dare_linear_svd')", DENSITY, SEED),
        _merge("dare_ties", "DARE's random drop, then TIES's sign election (= PEFT's 'dare_ties_svd')",
               DENSITY, SEED, MAJORITY_SIGN),
        _merge("magnitude_prune", "prune each effect by magnitude, then a weighted sum "
               "(= PEFT's 'magnitude_prune_svd')", DENSITY),
    )
}
DEFAULT_METHOD = "module"


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnsupportedMethodError(f"unknown method {name!r}: use one of {', '.join(METHODS)}") from None
