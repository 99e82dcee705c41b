"""Parsing composition expressions, and the caret lines every expression error shows.

The grammar is ``grammar.lark`` (LALR, basic lexer). Whitespace is free, with two caveats
that come from module references being allowed to contain ``-`` and ``.``: the lexer always
takes the longest reference, so

* put spaces around a binary minus that follows a name: ``team/a - 2*team/b``, not
  ``team/a-2*team/b`` (that reads as the module ``team/a-2`` times ``team/b``);
* put spaces around a ``/`` between two numbers: ``1 / 3``, not ``1/3`` (that reads as the
  module ``1/3``, since ``1`` is a valid namespace and ``3`` a valid name).

The lark parser is built on first use and cached, so importing this module is cheap.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from registry.errors import ExpressionSyntaxError
from registry.language.nodes import BinOp, Expr, Neg, Number, Ref, fold
from registry.refs import REFERENCE_PATTERN

__all__ = ["canonical", "caret", "number_text", "parse"]

# Number literals beyond these bounds are refused rather than turned into gigantic integers.
MAX_NUMBER_LENGTH = 100
MAX_EXPONENT = 1000

_GRAMMAR_FILE = Path(__file__).with_name("grammar.lark")
_EXPONENT_RE = re.compile(r"[eE]([+-]?[0-9]+)$")
_WORD_RE = re.compile(r"[A-Za-z0-9_.:@-]+")
_REFERENCE_HINT = "module references look like NS/NAME, NS/NAME@VERSION or sha256:HEX"


def caret(text: str, start: int, end: int) -> str:
    """Two lines: ``text`` indented by two spaces, and ``^`` under ``text[start:end]``.

    At least one caret is drawn (``start == end == len(text)`` points one past the end).
    Whitespace characters such as tabs and newlines are shown as single spaces so that the
    carets line up.
    """
    shown = "".join(" " if ch.isspace() else ch for ch in text)
    start = max(0, min(start, len(text)))
    end = max(start + 1, min(end, len(text)))
    return f"  {shown}\n  {' ' * start}{'^' * (end - start)}"


def syntax_error(text: str, problem: str, start: int, end: int) -> ExpressionSyntaxError:
    """An :class:`ExpressionSyntaxError` with the standard three-line message."""
    error = ExpressionSyntaxError(f"invalid expression: {problem}\n{caret(text, start, end)}")
    error.expression = text  # type: ignore[attr-defined]
    error.start, error.end = start, max(end, start + 1)  # type: ignore[attr-defined]
    return error


@lru_cache(maxsize=None)
def _lark_parser() -> Any:
    from lark import Lark

    grammar = _GRAMMAR_FILE.read_text(encoding="utf-8")
    # In a lark regular expression literal, '/' is written '\/'.
    grammar = grammar.replace("%REFERENCE_PATTERN%", REFERENCE_PATTERN.replace("/", r"\/"))
    return Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True, maybe_placeholders=False)


def parse(text: str) -> Expr:
    """Parse ``text`` into a syntax tree (see :mod:`registry.language.nodes`).

    Raises :class:`ExpressionSyntaxError` when ``text`` is empty or does not parse; its
    message names the problem and points at it with a caret.
    """
    from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    if not isinstance(text, str):
        raise TypeError(f"expected an expression string, got {type(text).__name__}")
    if not text.strip():
        raise syntax_error(text, "the expression is empty", len(text), len(text))
    try:
        tree = _lark_parser().parse(text)
    except UnexpectedToken as exc:
        raise _unexpected_token(text, exc) from None
    except UnexpectedCharacters as exc:
        raise _unexpected_character(text, exc.pos_in_stream) from None
    except UnexpectedInput as exc:  # pragma: no cover - LALR raises only the two above
        position = getattr(exc, "pos_in_stream", None) or len(text)
        raise syntax_error(text, "cannot parse", position, position + 1) from None
    return _build(text, tree)


# --- syntax errors ------------------------------------------------------------------------------

_OPERAND_TERMINALS = {"NUMBER", "REF", "LPAR"}
_OPERATOR_TERMINALS = {"PLUS", "MINUS", "STAR", "SLASH"}


def _expected(expected: set[str]) -> str:
    if expected & _OPERAND_TERMINALS:
        return "expected a number, a module or '('"
    wanted = []
    if expected & _OPERATOR_TERMINALS:
        wanted.append("an operator")
    if "RPAR" in expected:
        wanted.append("')'")
    return f"expected {' or '.join(wanted)}" if wanted else ""


def _unexpected_token(text: str, exc: Any) -> ExpressionSyntaxError:
    token = exc.token
    expected = set(exc.expected or ())
    try:  # LALR merges lookaheads; ask the parser which terminals it would really accept
        expected = set(exc.interactive_parser.accepts())
    except Exception:  # pragma: no cover - keep lark's own (wider) set
        pass
    if token.type == "$END":
        what, start, end = "end of expression", len(text), len(text)
    else:
        start = token.start_pos
        end = token.end_pos if token.end_pos is not None else start + len(token)
        if token.type == "RPAR" and not expected & _OPERAND_TERMINALS and "RPAR" not in expected:
            return syntax_error(text, "unmatched ')'", start, end)
        what = f"'{token}'"
    hint = _expected(expected)
    return syntax_error(text, f"unexpected {what}" + (f"; {hint}" if hint else ""), start, end)


def _unexpected_character(text: str, position: int) -> ExpressionSyntaxError:
    word = _WORD_RE.match(text, position)
    if word and text[position].isalnum():
        problem = f"unexpected '{word.group()}': {_REFERENCE_HINT}"
    else:
        problem = f"unexpected character {text[position]!r}"
    return syntax_error(text, problem, position, position + 1)


# --- from lark's tree to ours -----------------------------------------------------------------


def _number(text: str, token: Any) -> Number:
    literal = str(token)
    start, end = token.start_pos, token.end_pos
    exponent = _EXPONENT_RE.search(literal)
    if len(literal) > MAX_NUMBER_LENGTH or (exponent and abs(int(exponent.group(1))) > MAX_EXPONENT):
        raise syntax_error(
            text,
            f"number out of range: '{literal}' (at most {MAX_NUMBER_LENGTH} characters, "
            f"exponents from -{MAX_EXPONENT} to {MAX_EXPONENT})",
            start,
            end,
        )
    return Number(Fraction(literal), literal, start, end)


def _build(text: str, tree: Any) -> Expr:
    """Turn lark's tree into ours, without recursion.

    Each intermediate result is ``(node, outer_start, outer_end)``: the outer span includes
    the parentheses around the node, so that a parent's span covers them.
    """
    from lark import Token

    stack: list[tuple[Any, bool]] = [(tree, False)]
    results: list[tuple[Expr, int, int]] = []
    while stack:
        item, expanded = stack.pop()
        if isinstance(item, Token):
            if item.type == "NUMBER":
                node: Expr = _number(text, item)
            elif item.type == "REF":
                node = Ref(str(item), item.start_pos, item.end_pos)
            else:
                continue  # operator and parenthesis tokens are read from their parents
            results.append((node, node.start, node.end))
            continue
        if not expanded:
            stack.append((item, True))
            stack.extend((child, False) for child in reversed(item.children))
            continue
        kind, parts = item.data, item.children
        if kind == "binop":
            (left, left_start, _), (right, _, right_end) = results[-2], results[-1]
            del results[-2:]
            node = BinOp(str(parts[1]), left, right, left_start, right_end)
            results.append((node, left_start, right_end))
        elif kind == "neg":
            operand, _, operand_end = results.pop()
            node = Neg(operand, parts[0].start_pos, operand_end)
            results.append((node, node.start, node.end))
        elif kind == "group":
            inner, _, _ = results.pop()
            results.append((inner, parts[0].start_pos, parts[2].end_pos))
        else:  # pragma: no cover - the grammar has no other rule
            raise AssertionError(f"unexpected rule {kind!r}")
    assert len(results) == 1
    return results[0][0]


# --- printing -----------------------------------------------------------------------------------

_SUM, _PRODUCT, _UNARY, _ATOM = 1, 2, 3, 4
_MAX_POSITIONAL = 24


def number_text(value: Fraction) -> str:
    """The canonical spelling of a number; ``parse`` reads it back as exactly ``value``.

    Integers print as ``2``, other terminating decimals as the shortest decimal (``0.25``),
    switching to scientific notation (``1e-30``) when the decimal would be longer than 24
    characters and the scientific form is shorter. Other fractions print as ``(1 / 3)``.
    Negative numbers get a leading ``-`` (which parses as a negation).
    """
    sign = "-" if value < 0 else ""
    value = abs(value)
    denominator, twos, fives = value.denominator, 0, 0
    while denominator % 2 == 0:
        denominator //= 2
        twos += 1
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    if denominator != 1:
        return f"{sign}({value.numerator} / {value.denominator})"
    places = max(twos, fives)
    scaled = value.numerator * 10**places // value.denominator  # exact
    digits = str(scaled)
    if places:
        digits = digits.rjust(places + 1, "0")
        positional = f"{digits[:-places]}.{digits[-places:]}"
    else:
        positional = digits
    if len(positional) <= _MAX_POSITIONAL or scaled == 0:
        return sign + positional
    mantissa, exponent = scaled, -places
    while mantissa % 10 == 0:
        mantissa //= 10
        exponent += 1
    significant = str(mantissa)
    exponent += len(significant) - 1
    head = significant[0] + (f".{significant[1:]}" if len(significant) > 1 else "")
    scientific = f"{head}e{exponent}"
    return sign + (scientific if len(scientific) < len(positional) else positional)


def canonical(expr: Expr, rename: Callable[[str], str] | None = None) -> str:
    """The normalized spelling of ``expr``.

    Single spaces around binary ``+`` and ``-``; ``*`` and ``/`` without spaces, except a ``/``
    between a number and a following number or name (``1 / 3``, because ``1/3`` reads as a
    module); ``-x`` for negation; only the parentheses that precedence and left-associativity
    require (``a - (b - c)``, ``2*(a + b)``, ``a/(2*3)``, ``-(2*a)``); numbers as in
    :func:`number_text`; references as written, or as ``rename(text)`` when given.

    ``parse(canonical(e))`` is :func:`same_tree` to ``e`` (given numbers with terminating
    decimal expansions, which every parsed number has), and ``canonical`` of it is the same text.
    """
    # Each result: (text, precedence level, starts with a letter or digit, ends with a number)
    Printed = tuple[str, int, bool, bool]

    def wrap(printed: Printed, level: int) -> Printed:
        if printed[1] >= level:
            return printed
        return (f"({printed[0]})", _ATOM, False, False)

    def visit(node: Expr, args: list[Printed]) -> Printed:
        if isinstance(node, Ref):
            text = rename(node.text) if rename is not None else node.text
            return (text, _ATOM, text[:1].isalnum(), False)
        if isinstance(node, Number):
            text = number_text(node.value)
            if text.startswith("-"):
                return (text, _UNARY, False, text[-1].isalnum())
            return (text, _ATOM, text[0].isalnum(), text[-1].isalnum())
        if isinstance(node, Neg):
            operand = wrap(args[0], _UNARY)
            return (f"-{operand[0]}", _UNARY, False, operand[3])
        if node.op in "+-":
            left, right = wrap(args[0], _SUM), wrap(args[1], _PRODUCT)
            return (f"{left[0]} {node.op} {right[0]}", _SUM, left[2], right[3])
        left, right = wrap(args[0], _PRODUCT), wrap(args[1], _UNARY)
        operator = node.op
        if operator == "/" and left[3] and right[2]:
            operator = " / "
        return (f"{left[0]}{operator}{right[0]}", _PRODUCT, left[2], right[3])

    return fold(expr, visit)[0]
