"""The syntax tree of a composition expression.

Four frozen node types. Each carries ``start`` and ``end``, character offsets into the source
text (``text[start:end]`` is the node's own source, without the parentheses that enclose it;
a parent's span covers its operands' parentheses). Trees built in code may leave them at 0.

The functions here walk trees with an explicit stack, so a long chain such as
``a + a + ... + a`` (a left-nested tree as deep as it is long) never hits Python's recursion
limit. The dataclass ``==`` compares positions and number texts too; use :func:`same_tree`
to compare shapes and values only.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, TypeVar, Union

__all__ = [
    "BinOp",
    "Expr",
    "Neg",
    "Number",
    "Ref",
    "children",
    "fold",
    "references",
    "same_tree",
    "strip_positions",
]

OPERATORS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class Ref:
    """A module reference, exactly as written (``team/yelp``, ``team/yelp@2``, ``sha256:...``)."""

    text: str
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Number:
    """A number literal. ``value`` is exact; ``text`` is the source spelling ("" when built in code)."""

    value: Fraction
    text: str = ""
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.value, Fraction):
            object.__setattr__(self, "value", Fraction(self.value))


@dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: "Expr"
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class BinOp:
    """``left op right`` with ``op`` one of ``+ - * /``."""

    op: str
    left: "Expr"
    right: "Expr"
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}; expected one of + - * /")


Expr = Union[Ref, Number, Neg, BinOp]

R = TypeVar("R")


def children(node: Expr) -> tuple[Expr, ...]:
    """The operands of ``node``, left to right."""
    if isinstance(node, BinOp):
        return (node.left, node.right)
    if isinstance(node, Neg):
        return (node.operand,)
    return ()


def fold(root: Expr, visit: Callable[[Expr, list[R]], R]) -> R:
    """Post-order fold without recursion: ``visit(node, [results of its children])``.

    Children are visited left to right, that is in source order.
    """
    stack: list[tuple[Expr, bool]] = [(root, False)]
    results: list[R] = []
    while stack:
        node, expanded = stack.pop()
        if expanded:
            count = len(children(node))
            args = results[len(results) - count :] if count else []
            if count:
                del results[len(results) - count :]
            results.append(visit(node, args))
        else:
            stack.append((node, True))
            for child in reversed(children(node)):
                stack.append((child, False))
    return results[0]


def strip_positions(expr: Expr) -> Expr:
    """A copy of ``expr`` with every position set to 0 and every number text set to ""."""

    def visit(node: Expr, args: list[Expr]) -> Expr:
        if isinstance(node, Ref):
            return Ref(node.text)
        if isinstance(node, Number):
            return Number(node.value)
        if isinstance(node, Neg):
            return Neg(args[0])
        return BinOp(node.op, args[0], args[1])

    return fold(expr, visit)


def same_tree(left: Expr, right: Expr) -> bool:
    """Whether two trees have the same shape, operators, references and number values.

    Positions and number spellings are ignored (``0.50`` and ``.5`` are the same number).
    """
    stack: list[tuple[Expr, Expr]] = [(left, right)]
    while stack:
        a, b = stack.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, Ref):
            if a.text != b.text:  # type: ignore[union-attr]
                return False
        elif isinstance(a, Number):
            if a.value != b.value:  # type: ignore[union-attr]
                return False
        elif isinstance(a, Neg):
            stack.append((a.operand, b.operand))  # type: ignore[union-attr]
        else:
            assert isinstance(a, BinOp) and isinstance(b, BinOp)
            if a.op != b.op:
                return False
            stack.append((a.right, b.right))
            stack.append((a.left, b.left))
    return True


def references(expr: Expr) -> list[str]:
    """The distinct reference texts of ``expr``, in order of first appearance."""
    seen: dict[str, None] = {}
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, Ref):
            seen.setdefault(node.text, None)
        else:
            stack.extend(reversed(children(node)))
    return list(seen)


