"""Type-checking and flattening an expression into one term per module (SEMANTICS.md §2).

The language is linear: a scalar times a scalar is a scalar, a module may be multiplied or
divided by a scalar, modules add to and subtract from modules. So every well-typed expression
is ``sum_i b_i * module_i``, and :func:`flatten` returns, per distinct reference text:

* ``b``, the signed coefficient: the product of the scalars on the path from the root to the
  module (a negation or the right side of a binary minus multiplies by -1), summed over every
  occurrence;
* ``a``, the unsigned coefficient: the same with every scalar and negation taken by absolute
  value, summed over every occurrence. A scalar subexpression such as ``(2-3)`` is evaluated
  first, and its absolute value is used.

``x - 0.3*y`` gives x: (a=1, b=1), y: (a=3/10, b=-3/10); ``x + 0.5*(y - x)`` gives
x: (a=3/2, b=1/2), y: (a=1/2, b=1/2). All arithmetic is exact (:class:`fractions.Fraction`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable, Hashable, Iterable, Union

from registry.errors import ExpressionTypeError
from registry.language.nodes import BinOp, Expr, Neg, Number, Ref, fold
from registry.language.parser import canonical, caret, number_text

__all__ = ["Term", "flatten", "merge_terms"]


@dataclass(frozen=True)
class Term:
    """One distinct module of a flattened expression.

    ``start`` and ``end`` locate its first occurrence in the source text.
    """

    ref: str
    a: Fraction
    b: Fraction
    start: int
    end: int


class _Module:
    """Marks a subexpression whose value is a module (a linear combination of modules)."""

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "MODULE"


_MODULE = _Module()
_Value = Union[Fraction, _Module]

_NUMBER = r"(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMERIC_REFERENCE = re.compile(rf"({_NUMBER})/({_NUMBER})")


def flatten(expr: Expr, source_text: str | None = None) -> list[Term]:
    """The terms of ``expr``, one per distinct reference text, in order of first appearance.

    ``source_text`` is the text ``expr`` was parsed from; error messages quote it and point
    into it with carets (without it, they quote the canonical form and have no caret lines).

    Raises :class:`ExpressionTypeError` when two modules are multiplied, a number is added to
    (or subtracted from) a module, something is divided by a module or by zero, or the
    expression has no module at all.
    """
    values: dict[int, _Value] = {}

    def show(node: Expr) -> str:
        if source_text is not None and 0 <= node.start < node.end <= len(source_text):
            return source_text[node.start : node.end]
        return canonical(node)

    def fail(problem: str, node: Expr, *suspects: Expr) -> ExpressionTypeError:
        problem += _numeric_reference_hint(suspects)
        if source_text is None:
            return ExpressionTypeError(problem)
        return ExpressionTypeError(f"{problem}\n{caret(source_text, node.start, node.end)}")

    def visit(node: Expr, args: list[_Value]) -> _Value:
        value: _Value
        if isinstance(node, Ref):
            value = _MODULE
        elif isinstance(node, Number):
            value = node.value
        elif isinstance(node, Neg):
            value = args[0] if args[0] is _MODULE else -args[0]  # type: ignore[operator]
        else:
            value = _combine(node, args[0], args[1], show, fail)
        values[id(node)] = value
        return value

    root = fold(expr, visit)
    if root is not _MODULE:
        raise fail(f"expression has no module: it is the number {number_text(root)}", expr)  # type: ignore[arg-type]
    return _collect(expr, values)


def _combine(
    node: BinOp,
    left: _Value,
    right: _Value,
    show: Callable[[Expr], str],
    fail: Callable[..., ExpressionTypeError],
) -> _Value:
    """The value of ``left op right``, or the type error it is."""
    op = node.op
    if op in "+-":
        if left is _MODULE and right is _MODULE:
            return _MODULE
        if left is _MODULE or right is _MODULE:
            number, module = (node.right, node.left) if left is _MODULE else (node.left, node.right)
            raise fail(
                f"cannot add a number to a module: '{show(number)}' is a number and "
                f"'{show(module)}' is a module",
                node,
            )
        return left + right if op == "+" else left - right  # type: ignore[operator]
    if op == "*":
        if left is _MODULE and right is _MODULE:
            raise fail(
                f"cannot multiply two modules: '{show(node.left)}' and '{show(node.right)}' are "
                f"both modules; a module can only be multiplied by a number",
                node,
                node.left,
                node.right,
            )
        if left is _MODULE or right is _MODULE:
            return _MODULE
        return left * right  # type: ignore[operator]
    # op == "/"
    if right is _MODULE:
        raise fail(
            f"cannot divide by a module: '{show(node.right)}' is a module; divide by a number",
            node.right,
            node.right,
        )
    if right == 0:
        raise fail(f"division by zero: '{show(node.right)}' is 0", node.right)
    return _MODULE if left is _MODULE else left / right  # type: ignore[operator]


def _collect(expr: Expr, values: dict[int, _Value]) -> list[Term]:
    """Walk the module part of the tree top-down, multiplying the scalars on each path."""
    one = Fraction(1)
    terms: dict[str, list] = {}  # ref -> [a, b, start, end]
    stack: list[tuple[Expr, Fraction, Fraction]] = [(expr, one, one)]
    while stack:
        node, a, b = stack.pop()
        if isinstance(node, Ref):
            term = terms.get(node.text)
            if term is None:
                terms[node.text] = [a, b, node.start, node.end]
            else:
                term[0] += a
                term[1] += b
        elif isinstance(node, Neg):
            stack.append((node.operand, a, -b))
        elif isinstance(node, BinOp):
            if node.op in "+-":
                # the right side is pushed first so that the left one is visited first
                stack.append((node.right, a, b if node.op == "+" else -b))
                stack.append((node.left, a, b))
            elif node.op == "*":
                if values[id(node.left)] is _MODULE:
                    module, scalar = node.left, values[id(node.right)]
                else:
                    module, scalar = node.right, values[id(node.left)]
                stack.append((module, a * abs(scalar), b * scalar))  # type: ignore[arg-type, operator]
            else:
                scalar = values[id(node.right)]
                stack.append((node.left, a / abs(scalar), b / scalar))  # type: ignore[arg-type, operator]
        # a Number is never reached: only subtrees whose value is a module are pushed
    return [Term(ref, a, b, start, end) for ref, (a, b, start, end) in terms.items()]


def merge_terms(terms: Iterable[Term], key: Callable[[str], Hashable]) -> list[Term]:
    """Merge the terms whose ``key(term.ref)`` is equal, adding their ``a`` and ``b``.

    The merged term keeps the reference text and span of the first of them, and its place in
    the order of first appearance. Typical ``key``: the digest a reference resolves to, so
    that ``team/yelp`` and ``team/yelp@3`` count as one module.
    """
    merged: dict[Hashable, Term] = {}
    for term in terms:
        k = key(term.ref)
        first = merged.get(k)
        merged[k] = term if first is None else replace(first, a=first.a + term.a, b=first.b + term.b)
    return list(merged.values())


def _numeric_reference_hint(suspects: Iterable[Expr]) -> str:
    for node in suspects:
        if isinstance(node, Ref):
            match = _NUMERIC_REFERENCE.fullmatch(node.text)
            if match:
                return (
                    f" (note: '{node.text}' reads as a module name; write "
                    f"'{match.group(1)} / {match.group(2)}' to divide numbers)"
                )
    return ""
