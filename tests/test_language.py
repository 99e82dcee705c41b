"""The composition language: parsing, flattening (SEMANTICS.md §2), printing, and every error.

Expected coefficients are written by hand as exact fractions, never computed by the code under
test. The property tests compare against a small independent evaluator written here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction as F
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.errors import ExpressionError, ExpressionSyntaxError, ExpressionTypeError
from registry.language import (
    BinOp,
    Neg,
    Number,
    Ref,
    Term,
    canonical,
    caret,
    flatten,
    merge_terms,
    number_text,
    parse,
    references,
    same_tree,
    strip_positions,
)
from registry.refs import REFERENCE_PATTERN, parse_reference

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def coefficients(text: str) -> list[tuple[str, F, F]]:
    return [(t.ref, t.a, t.b) for t in flatten(parse(text), text)]


def N(value) -> Number:  # noqa: N802 - a tree-building shorthand
    return Number(F(value))


X, Y, Z = Ref("team/x"), Ref("team/y"), Ref("team/z")


# --- flattening: the coefficients a and b ------------------------------------------------------

FLATTEN_CASES = [
    # the examples of SEMANTICS.md §2
    ("team/x - 0.3*team/y", [("team/x", F(1), F(1)), ("team/y", F(3, 10), F(-3, 10))]),
    ("team/x + 0.5*(team/y - team/x)", [("team/x", F(3, 2), F(1, 2)), ("team/y", F(1, 2), F(1, 2))]),
    ("-0.3*team/y", [("team/y", F(3, 10), F(-3, 10))]),
    (
        "0.5*team/yelp + 0.5*team/amazon - 0.3*team/toxic",
        [("team/yelp", F(1, 2), F(1, 2)), ("team/amazon", F(1, 2), F(1, 2)), ("team/toxic", F(3, 10), F(-3, 10))],
    ),
    # a single module, scaled in various ways
    ("team/x", [("team/x", F(1), F(1))]),
    ("((team/x))", [("team/x", F(1), F(1))]),
    ("team/x/4", [("team/x", F(1, 4), F(1, 4))]),
    ("team/x/0.5", [("team/x", F(2), F(2))]),
    ("team/x/(2*3)", [("team/x", F(1, 6), F(1, 6))]),
    ("team/x/2 / 3", [("team/x", F(1, 6), F(1, 6))]),
    ("(team/x/2)/3", [("team/x", F(1, 6), F(1, 6))]),
    ("team/x/-4", [("team/x", F(1, 4), F(-1, 4))]),
    ("(2-3)*team/x", [("team/x", F(1), F(-1))]),
    ("(1 - 3)/4*team/x", [("team/x", F(1, 2), F(-1, 2))]),
    ("(2*3 - 6.5)*team/x", [("team/x", F(1, 2), F(-1, 2))]),
    ("(0.1 + 0.2)*team/x", [("team/x", F(3, 10), F(3, 10))]),
    ("2*(3*team/x)", [("team/x", F(6), F(6))]),
    ("2*team/x*3", [("team/x", F(6), F(6))]),
    ("team/x*2*3", [("team/x", F(6), F(6))]),
    ("team/x*-2", [("team/x", F(2), F(-2))]),
    ("-2*-team/x", [("team/x", F(2), F(2))]),
    ("--team/x", [("team/x", F(1), F(1))]),
    ("-(-(-team/x))", [("team/x", F(1), F(-1))]),
    ("1 / 3*team/x", [("team/x", F(1, 3), F(1, 3))]),
    ("0*team/x", [("team/x", F(0), F(0))]),
    # numbers in every spelling
    ("1e-3*team/x + 2.5E+2*team/y", [("team/x", F(1, 1000), F(1, 1000)), ("team/y", F(250), F(250))]),
    (
        ".5*team/x + 5.*team/y + 0.50*team/z",
        [("team/x", F(1, 2), F(1, 2)), ("team/y", F(5), F(5)), ("team/z", F(1, 2), F(1, 2))],
    ),
    ("1E2*team/x - 1.5e-1*team/y", [("team/x", F(100), F(100)), ("team/y", F(3, 20), F(-3, 20))]),
    ("12345678901234567890.5*team/x", [("team/x", F(24691357802469135781, 2), F(24691357802469135781, 2))]),
    # several occurrences of one module add up
    ("team/x + team/x - team/x", [("team/x", F(3), F(1))]),
    ("team/x - team/x", [("team/x", F(2), F(0))]),
    ("team/x - -team/y", [("team/x", F(1), F(1)), ("team/y", F(1), F(1))]),
    ("-(team/x - team/y)", [("team/x", F(1), F(-1)), ("team/y", F(1), F(1))]),
    (
        "2*(team/x - 3*(team/y + team/x/2))",
        [("team/x", F(5), F(-1)), ("team/y", F(6), F(-6))],
    ),
    (
        "team/y - 0.25*(team/x - (team/z - 2*team/y)) + team/x",
        [("team/y", F(3, 2), F(1, 2)), ("team/x", F(5, 4), F(3, 4)), ("team/z", F(1, 4), F(1, 4))],
    ),
    ("0*team/x + team/y", [("team/x", F(0), F(0)), ("team/y", F(1), F(1))]),
    # every form of reference; distinct texts are distinct terms
    (
        "sha256:0123abcd - 0.5*team/yelp@2 + team/yelp@prod + team/yelp",
        [
            ("sha256:0123abcd", F(1), F(1)),
            ("team/yelp@2", F(1, 2), F(-1, 2)),
            ("team/yelp@prod", F(1), F(1)),
            ("team/yelp", F(1), F(1)),
        ],
    ),
    ("sha256:0123ABCDef/4", [("sha256:0123ABCDef", F(1, 4), F(1, 4))]),
    (
        "0.5*my-org/model.v2-final + 0.5*org_1/a.b@v1.2-rc",
        [("my-org/model.v2-final", F(1, 2), F(1, 2)), ("org_1/a.b@v1.2-rc", F(1, 2), F(1, 2))],
    ),
    ("Team.A/B-2 - 1e0*Team.A/B-2", [("Team.A/B-2", F(2), F(0))]),
]


@pytest.mark.parametrize(("text", "expected"), FLATTEN_CASES, ids=[c[0] for c in FLATTEN_CASES])
def test_flatten(text, expected):
    assert coefficients(text) == expected


def test_terms_are_fractions_with_the_span_of_the_first_occurrence():
    text = "team/x + 2*team/y - (team/x)"
    assert flatten(parse(text), text) == [
        Term("team/x", F(2), F(0), 0, 6),
        Term("team/y", F(2), F(2), 11, 17),
    ]
    term = flatten(parse("0.1*team/x"))[0]
    assert isinstance(term.a, F) and isinstance(term.b, F) and term.a == F(1, 10)


@pytest.mark.parametrize(
    "text",
    [
        "0.5*team/yelp+0.5*team/amazon+-0.3*team/toxic",
        "0.5 * team/yelp + 0.5 * team/amazon - 0.3 * team/toxic",
        "  0.5*team/yelp\t+\n0.5*team/amazon -0.3*team/toxic  ",
        "(0.5)*(team/yelp) + (0.5*team/amazon) - (0.3*team/toxic)",
        ".5*team/yelp + 5e-1*team/amazon - 3E-1*team/toxic",
        "0.50*team/yelp + 0.5*team/amazon + -0.3*team/toxic",
    ],
)
def test_whitespace_and_spelling_variations_give_identical_results(text):
    assert coefficients(text) == [
        ("team/yelp", F(1, 2), F(1, 2)),
        ("team/amazon", F(1, 2), F(1, 2)),
        ("team/toxic", F(3, 10), F(-3, 10)),
    ]


def test_minus_glued_to_a_name_is_part_of_the_name():
    # documented: put spaces around a binary minus that follows a name
    assert parse("team/a-team") == Ref("team/a-team", 0, 11)
    assert same_tree(parse("team/a -team/b"), BinOp("-", Ref("team/a"), Ref("team/b")))
    assert same_tree(parse("team/a- team/b"), BinOp("-", Ref("team/a"), Ref("team/b")))
    assert same_tree(parse("team/a-2*team/b"), BinOp("*", Ref("team/a-2"), Ref("team/b")))


def test_a_slash_between_numbers_needs_spaces():
    assert parse("1/3") == Ref("1/3", 0, 3)
    assert same_tree(parse("1 / 3"), BinOp("/", N(1), N(3)))
    assert same_tree(parse("1/ 3"), BinOp("/", N(1), N(3)))


def test_flatten_of_a_tree_built_in_code():
    tree = BinOp("-", X, BinOp("*", Number(F(3, 10)), Y))
    assert flatten(tree) == [Term("team/x", F(1), F(1), 0, 0), Term("team/y", F(3, 10), F(-3, 10), 0, 0)]
    assert flatten(BinOp("*", Number(F(-1, 3)), X)) == [Term("team/x", F(1, 3), F(-1, 3), 0, 0)]


def test_long_and_deep_expressions_do_not_hit_the_recursion_limit():
    text = " + ".join(["team/x"] * 3000) + " - 0.5*team/y"
    assert coefficients(text) == [("team/x", F(3000), F(3000)), ("team/y", F(1, 2), F(-1, 2))]
    assert same_tree(parse(canonical(parse(text))), parse(text))
    nested = "(" * 2000 + "2*team/x" + ")" * 2000
    assert coefficients(nested) == [("team/x", F(2), F(2))]
    negated = "-" * 2001 + "team/x"
    assert coefficients(negated) == [("team/x", F(1), F(-1))]
    assert canonical(parse(negated)) == negated


# --- merge_terms -----------------------------------------------------------------------------


def test_merge_terms_adds_coefficients_keeping_first_order_and_span():
    text = "team/yelp + 0.5*team/yelp@3 - team/amazon - 2*sha256:0123abcd"
    terms = flatten(parse(text), text)
    digest = {"team/yelp": "d1", "team/yelp@3": "d1", "team/amazon": "d2", "sha256:0123abcd": "d2"}
    assert merge_terms(terms, digest.__getitem__) == [
        Term("team/yelp", F(3, 2), F(3, 2), 0, 9),
        Term("team/amazon", F(3), F(-3), 30, 41),
    ]
    assert merge_terms(terms, lambda ref: ref) == terms
    assert merge_terms([], str) == []


# --- the tree ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("team/x + team/y*2", BinOp("+", X, BinOp("*", Y, N(2)))),
        ("team/x - team/y - team/z", BinOp("-", BinOp("-", X, Y), Z)),
        ("team/x - (team/y - team/z)", BinOp("-", X, BinOp("-", Y, Z))),
        ("2 / 3 / 4", BinOp("/", BinOp("/", N(2), N(3)), N(4))),
        ("2*3 / 4*team/x", BinOp("*", BinOp("/", BinOp("*", N(2), N(3)), N(4)), X)),
        ("-team/x*2", BinOp("*", Neg(X), N(2))),
        ("-(team/x*2)", Neg(BinOp("*", X, N(2)))),
        ("-2*team/x", BinOp("*", Neg(N(2)), X)),
        ("team/x*-2", BinOp("*", X, Neg(N(2)))),
        ("team/x - -team/y", BinOp("-", X, Neg(Y))),
        ("--team/x", Neg(Neg(X))),
        ("2*(team/x + team/y)", BinOp("*", N(2), BinOp("+", X, Y))),
        ("team/x + team/y - team/z*2 / 4", BinOp("-", BinOp("+", X, Y), BinOp("/", BinOp("*", Z, N(2)), N(4)))),
        ("team/z*2/4", BinOp("*", Z, Ref("2/4"))),  # documented: '2/4' reads as a module
    ],
)
def test_precedence_and_associativity(text, tree):
    assert same_tree(parse(text), tree)


def test_positions_are_character_offsets_without_enclosing_parentheses():
    text = "(team/x)*(2) - -1e-3*sha256:0123abcd"
    tree = parse(text)
    left, right = tree.left, tree.right
    assert (tree.op, tree.start, tree.end) == ("-", 0, len(text))
    assert (left.start, left.end) == (0, 12)  # covers its operands' parentheses
    assert left.left == Ref("team/x", 1, 7)
    assert left.right == Number(F(2), "2", 10, 11)
    assert (right.op, right.start, right.end) == ("*", 15, len(text))
    assert right.left == Neg(Number(F(1, 1000), "1e-3", 16, 20), 15, 20)
    assert right.right == Ref("sha256:0123abcd", 21, 36)


def test_numbers_are_exact_fractions_with_their_text():
    spellings = [
        ("7", F(7)),
        ("0.1", F(1, 10)),
        (".5", F(1, 2)),
        ("5.", F(5)),
        ("1e-3", F(1, 1000)),
        ("2.5E+2", F(250)),
        ("3e2", F(300)),
        ("0.000", F(0)),
    ]
    for text, value in spellings:
        node = parse(f"{text}*team/x").left
        assert node == Number(value, text, 0, len(text))


def test_strip_positions_and_same_tree():
    a, b = parse("0.50*(team/x)"), parse(" .5 * team/x")
    assert a != b
    assert strip_positions(a) == strip_positions(b) == BinOp("*", Number(F(1, 2)), Ref("team/x"))
    assert same_tree(a, b)
    assert not same_tree(a, parse("0.5*team/y"))
    assert not same_tree(a, parse("0.6*team/x"))
    assert not same_tree(a, parse("0.5 / team/x"))
    assert not same_tree(parse("-team/x"), parse("team/x"))
    assert Number(2) == Number(F(2)) and isinstance(Number(2).value, F)
    with pytest.raises(ValueError):
        BinOp("^", X, Y)


def test_references_in_order_of_first_appearance():
    tree = parse("team/b + 2*(team/a - team/b) + sha256:0123abcd")
    assert references(tree) == ["team/b", "team/a", "sha256:0123abcd"]


REFERENCES = [
    "team/yelp",
    "team/yelp@2",
    "team/yelp@prod",
    "team/yelp@v1.2-rc",
    "sha256:0123abcd",
    "sha256:" + "0123456789abcdef" * 4,
    "my-org/model.v2-final",
    "a/b",
    "A1/B_2.x-y",
    "org_1/a.b@v1.2-rc",
]


@pytest.mark.parametrize("ref", REFERENCES)
def test_every_command_line_reference_is_one_reference(ref):
    parse_reference(ref)  # the command line accepts it
    assert re.fullmatch(REFERENCE_PATTERN, ref)
    assert parse(ref) == Ref(ref, 0, len(ref))
    assert coefficients(f"2*{ref} - 1*{ref}") == [(ref, F(3), F(1))]


def test_importing_the_package_does_not_import_lark():
    code = "import sys, registry.language; assert 'lark' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- canonical -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("team/a+team/b", "team/a + team/b"),
        ("  0.50 * team/a  -  .3*team/b", "0.5*team/a - 0.3*team/b"),
        ("team/a - (team/b - team/c)", "team/a - (team/b - team/c)"),
        ("team/a + (team/b + team/c)", "team/a + (team/b + team/c)"),
        ("(team/a - team/b) - team/c", "team/a - team/b - team/c"),
        ("((team/a))", "team/a"),
        ("2*(team/a + team/b)", "2*(team/a + team/b)"),
        ("(2*team/a) + (team/b*3)", "2*team/a + team/b*3"),
        ("team/a/(2*3)", "team/a/(2*3)"),
        ("(team/a/2)*3", "team/a/2*3"),
        ("team/a*(2*3)", "team/a*(2*3)"),
        ("team/a/(2/ 3)", "team/a/(2 / 3)"),
        ("-(team/a)", "-team/a"),
        ("-(2*team/a)", "-(2*team/a)"),
        ("(-2)*team/a", "-2*team/a"),
        ("team/a*(-2)", "team/a*-2"),
        ("team/a - (-team/b)", "team/a - -team/b"),
        ("-(-team/a)", "--team/a"),
        ("-(team/a + team/b)", "-(team/a + team/b)"),
        ("1e-3*team/a", "0.001*team/a"),
        ("2.5E+2*team/a", "250*team/a"),
        ("5.*team/a", "5*team/a"),
        ("1.50*team/a", "1.5*team/a"),
        ("0.0*team/a", "0*team/a"),
        ("100*team/a", "100*team/a"),
        ("1e30*team/a", "1e30*team/a"),
        ("1e-30*team/a", "1e-30*team/a"),
        ("123456789e-20*team/a", "0.00000000000123456789*team/a"),
        ("123456789e-30*team/a", "1.23456789e-22*team/a"),
        ("1e23*team/a", "100000000000000000000000*team/a"),
        ("1e24*team/a", "1e24*team/a"),
        ("(1 / 3)*team/a", "1 / 3*team/a"),
        ("team/a*(1 / 3)", "team/a*(1 / 3)"),
        ("2 / 3 / 4*team/a", "2 / 3 / 4*team/a"),
        ("sha256:0123abcd/2", "sha256:0123abcd/2"),
        ("team/yelp@prod - team/yelp@2", "team/yelp@prod - team/yelp@2"),
        ("team/a*team/b", "team/a*team/b"),  # ill-typed trees print too
    ],
)
def test_canonical(text, expected):
    assert canonical(parse(text)) == expected
    assert canonical(parse(expected)) == expected
    assert same_tree(parse(expected), parse(text))


def test_canonical_with_rename():
    tree = parse("0.5*team/yelp + team/amazon@prod - sha256:0123abcd")
    names = {"team/yelp": "team/yelp@3", "team/amazon@prod": "team/amazon@7", "sha256:0123abcd": "team/toxic@1"}
    assert canonical(tree, rename=names.__getitem__) == "0.5*team/yelp@3 + team/amazon@7 - team/toxic@1"


def test_canonical_of_trees_built_in_code():
    assert canonical(BinOp("*", Number(F(1, 3)), X)) == "(1 / 3)*team/x"
    assert canonical(BinOp("*", Number(F(-1, 4)), X)) == "-0.25*team/x"
    assert canonical(BinOp("*", X, Number(F(-2, 3)))) == "team/x*-(2 / 3)"
    # a '/' after a number and before a number or a name gets spaces: '2/3' would be a module
    tree = BinOp("/", BinOp("*", X, N(2)), N(3))
    assert canonical(tree) == "team/x*2 / 3"
    assert same_tree(parse(canonical(tree)), tree)
    tree = BinOp("/", N(2), X)
    assert canonical(tree) == "2 / team/x"
    assert same_tree(parse(canonical(tree)), tree)
    assert canonical(BinOp("/", X, N(2))) == "team/x/2"
    assert canonical(BinOp("/", N(2), BinOp("*", N(3), X))) == "2/(3*team/x)"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (F(0), "0"),
        (F(2), "2"),
        (F(-2), "-2"),
        (F(1, 4), "0.25"),
        (F(1, 8), "0.125"),
        (F(3, 10), "0.3"),
        (F(123456789, 1000), "123456.789"),
        (F(1, 3), "(1 / 3)"),
        (F(-22, 7), "-(22 / 7)"),
        (F(10) ** 30, "1e30"),
        (F(15) * F(10) ** 29, "1.5e30"),
        (F(1, 10**30), "1e-30"),
        (F(10) ** 23, "100000000000000000000000"),
        (F(10) ** 24, "1e24"),
        (F(-1, 10**30), "-1e-30"),
    ],
)
def test_number_text(value, text):
    assert number_text(value) == text


# --- syntax errors -----------------------------------------------------------------------------

OPERAND = "expected a number, a module or '('"
SYNTAX_ERRORS = [
    ("", "the expression is empty", "  \n  ^"),
    ("   ", "the expression is empty", "     \n     ^"),
    ("team/a +", f"unexpected end of expression; {OPERAND}", "  team/a +\n          ^"),
    ("team/a -", f"unexpected end of expression; {OPERAND}", "  team/a -\n          ^"),
    ("team/a-", f"unexpected end of expression; {OPERAND}", "  team/a-\n         ^"),
    ("team/a * * 2", f"unexpected '*'; {OPERAND}", "  team/a * * 2\n           ^"),
    ("*team/a", f"unexpected '*'; {OPERAND}", "  *team/a\n  ^"),
    ("+team/a", f"unexpected '+'; {OPERAND}", "  +team/a\n  ^"),
    ("2*/team/a", f"unexpected '/'; {OPERAND}", "  2*/team/a\n    ^"),
    ("()", f"unexpected ')'; {OPERAND}", "  ()\n   ^"),
    ("2*(team/a + )", f"unexpected ')'; {OPERAND}", "  2*(team/a + )\n              ^"),
    (
        "(team/a + team/b",
        "unexpected end of expression; expected an operator or ')'",
        "  (team/a + team/b\n                  ^",
    ),
    ("((team/a)", "unexpected end of expression; expected an operator or ')'", "  ((team/a)\n           ^"),
    ("team/a)", "unmatched ')'", "  team/a)\n        ^"),
    ("(team/a))*2", "unmatched ')'", "  (team/a))*2\n          ^"),
    ("team/a team/b", "unexpected 'team/b'; expected an operator", "  team/a team/b\n         ^^^^^^"),
    ("2 (team/a)", "unexpected '('; expected an operator", "  2 (team/a)\n    ^"),
    ("(2 3)*team/a", "unexpected '3'; expected an operator or ')'", "  (2 3)*team/a\n     ^"),
    ("1..2*team/a", "unexpected '.2'; expected an operator", "  1..2*team/a\n    ^^"),
    ("team/a@2@3", "unexpected character '@'", "  team/a@2@3\n          ^"),
    (
        "foo + 1",
        "unexpected 'foo': module references look like NS/NAME, NS/NAME@VERSION or sha256:HEX",
        "  foo + 1\n  ^",
    ),
    (
        "0.5*yelp",
        "unexpected 'yelp': module references look like NS/NAME, NS/NAME@VERSION or sha256:HEX",
        "  0.5*yelp\n      ^",
    ),
    (
        "2e*team/a",
        "unexpected 'e': module references look like NS/NAME, NS/NAME@VERSION or sha256:HEX",
        "  2e*team/a\n   ^",
    ),
    ("team/a $ 2", "unexpected character '$'", "  team/a $ 2\n         ^"),
    ("team/a\t+ 2^2", "unexpected character '^'", "  team/a + 2^2\n            ^"),
    ("team/a\n+ #", "unexpected character '#'", "  team/a + #\n           ^"),
    (
        "1e5000*team/a",
        "number out of range: '1e5000' (at most 100 characters, exponents from -1000 to 1000)",
        "  1e5000*team/a\n  ^^^^^^",
    ),
]


@pytest.mark.parametrize(("text", "problem", "carets"), SYNTAX_ERRORS, ids=[repr(c[0]) for c in SYNTAX_ERRORS])
def test_syntax_errors(text, problem, carets):
    with pytest.raises(ExpressionSyntaxError) as info:
        parse(text)
    assert str(info.value) == f"invalid expression: {problem}\n{carets}"


def test_an_overlong_number_is_a_syntax_error():
    text = "1" * 101 + "*team/a"
    with pytest.raises(ExpressionSyntaxError, match=r"^invalid expression: number out of range"):
        parse(text)
    assert coefficients("1" * 100 + "*team/a") == [("team/a", F(int("1" * 100)), F(int("1" * 100)))]


def test_syntax_errors_are_expression_errors():
    assert issubclass(ExpressionSyntaxError, ExpressionError)
    with pytest.raises(ExpressionError):
        parse("team/a +")


# --- type errors ---------------------------------------------------------------------------------

TYPE_ERRORS = [
    (
        "team/a*team/b",
        "cannot multiply two modules: 'team/a' and 'team/b' are both modules; "
        "a module can only be multiplied by a number",
        "  team/a*team/b\n  ^^^^^^^^^^^^^",
    ),
    (
        "0.5*team/a + 2*team/a * (team/b + team/c)",
        "cannot multiply two modules: '2*team/a' and 'team/b + team/c' are both modules; "
        "a module can only be multiplied by a number",
        "  0.5*team/a + 2*team/a * (team/b + team/c)\n               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    ),
    (
        "team/a-2*team/b",  # the glued '-2' belongs to the name
        "cannot multiply two modules: 'team/a-2' and 'team/b' are both modules; "
        "a module can only be multiplied by a number",
        "  team/a-2*team/b\n  ^^^^^^^^^^^^^^^",
    ),
    (
        "1/3*team/x",
        "cannot multiply two modules: '1/3' and 'team/x' are both modules; a module can only be "
        "multiplied by a number (note: '1/3' reads as a module name; write '1 / 3' to divide numbers)",
        "  1/3*team/x\n  ^^^^^^^^^^",
    ),
    (
        "team/a + 1",
        "cannot add a number to a module: '1' is a number and 'team/a' is a module",
        "  team/a + 1\n  ^^^^^^^^^^",
    ),
    (
        "0.5 + team/a",
        "cannot add a number to a module: '0.5' is a number and 'team/a' is a module",
        "  0.5 + team/a\n  ^^^^^^^^^^^^",
    ),
    (
        "team/b + (team/a - 2)*3",
        "cannot add a number to a module: '2' is a number and 'team/a' is a module",
        "  team/b + (team/a - 2)*3\n            ^^^^^^^^^^",
    ),
    (
        "2*(1 - team/a)",
        "cannot add a number to a module: '1' is a number and 'team/a' is a module",
        "  2*(1 - team/a)\n     ^^^^^^^^^^",
    ),
    (
        "team/a - 2*3",
        "cannot add a number to a module: '2*3' is a number and 'team/a' is a module",
        "  team/a - 2*3\n  ^^^^^^^^^^^^",
    ),
    (
        "2 / team/a",
        "cannot divide by a module: 'team/a' is a module; divide by a number",
        "  2 / team/a\n      ^^^^^^",
    ),
    (
        "team/a/(team/b - team/c)",
        "cannot divide by a module: 'team/b - team/c' is a module; divide by a number",
        "  team/a/(team/b - team/c)\n          ^^^^^^^^^^^^^^^",
    ),
    (
        "team/x/2/3",  # '2/3' reads as a module
        "cannot divide by a module: '2/3' is a module; divide by a number "
        "(note: '2/3' reads as a module name; write '2 / 3' to divide numbers)",
        "  team/x/2/3\n         ^^^",
    ),
    ("team/a/0", "division by zero: '0' is 0", "  team/a/0\n         ^"),
    ("team/a/(1 - 1)", "division by zero: '1 - 1' is 0", "  team/a/(1 - 1)\n          ^^^^^"),
    ("team/a/(0.0*2)", "division by zero: '0.0*2' is 0", "  team/a/(0.0*2)\n          ^^^^^"),
    ("1 / 0 + team/a", "division by zero: '0' is 0", "  1 / 0 + team/a\n      ^"),
    ("2*3", "expression has no module: it is the number 6", "  2*3\n  ^^^"),
    ("(1 - 1.5)", "expression has no module: it is the number -0.5", "  (1 - 1.5)\n   ^^^^^^^"),
    ("1 / 3", "expression has no module: it is the number (1 / 3)", "  1 / 3\n  ^^^^^"),
    ("-.5e1", "expression has no module: it is the number -5", "  -.5e1\n  ^^^^^"),
]


@pytest.mark.parametrize(("text", "problem", "carets"), TYPE_ERRORS, ids=[c[0] for c in TYPE_ERRORS])
def test_type_errors(text, problem, carets):
    tree = parse(text)
    with pytest.raises(ExpressionTypeError) as info:
        flatten(tree, text)
    assert str(info.value) == f"{problem}\n{carets}"
    assert isinstance(info.value, ExpressionError)


def test_type_errors_without_source_text_have_no_caret_lines():
    with pytest.raises(ExpressionTypeError) as info:
        flatten(BinOp("*", X, BinOp("+", Y, Z)))
    assert str(info.value) == (
        "cannot multiply two modules: 'team/x' and 'team/y + team/z' are both modules; "
        "a module can only be multiplied by a number"
    )
    with pytest.raises(ExpressionTypeError, match=r"^division by zero: '0' is 0$"):
        flatten(BinOp("/", X, N(0)))


def test_the_first_error_from_the_left_is_reported():
    text = "team/a/0 + team/b*team/c"
    with pytest.raises(ExpressionTypeError, match="^division by zero"):
        flatten(parse(text), text)


# --- caret -------------------------------------------------------------------------------------


def test_caret():
    assert caret("team/a + 1", 0, 10) == "  team/a + 1\n  ^^^^^^^^^^"
    assert caret("team/a + 1", 9, 10) == "  team/a + 1\n           ^"
    assert caret("team/a + 1", 3, 3) == "  team/a + 1\n     ^"  # at least one caret
    assert caret("team/a +", 8, 8) == "  team/a +\n          ^"  # one past the end
    assert caret("a\tb\nc", 4, 5) == "  a b c\n      ^"  # whitespace shown as single spaces


# --- properties ----------------------------------------------------------------------------------

REF_POOL = [
    "team/yelp",
    "team/amazon",
    "team/yelp@2",
    "team/yelp@prod",
    "sha256:0123abcd",
    "my-org/model.v2-final",
    "A1/b_2.c-3",
]

decimals = st.one_of(
    st.builds(lambda digits, places: F(digits, 10**places), st.integers(0, 10**6), st.integers(0, 6)),
    st.builds(lambda digits, places: F(digits) / F(10) ** places, st.integers(0, 10**30), st.integers(-10, 40)),
)
leaves = st.one_of(st.sampled_from(REF_POOL).map(Ref), decimals.map(Number))


def _extend(children):
    return st.one_of(
        children.map(Neg),
        st.builds(BinOp, st.sampled_from("+-*/"), children, children),
    )


trees = st.recursive(leaves, _extend, max_leaves=12)


def _oracle(node, absolute):
    """An independent evaluator: a module value is {ref: coefficient}; None when ill-typed.

    With ``absolute``, subtraction adds, negation is the identity and scalars scale by their
    absolute value, which gives the a coefficients; otherwise the b coefficients.
    """
    if isinstance(node, Ref):
        return {node.text: F(1)}
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Neg):
        inner = _oracle(node.operand, absolute)
        if inner is None:
            return None
        if isinstance(inner, dict):
            return inner if absolute else {k: -v for k, v in inner.items()}
        return -inner
    left, right = _oracle(node.left, absolute), _oracle(node.right, absolute)
    if left is None or right is None:
        return None
    modules = isinstance(left, dict), isinstance(right, dict)
    if node.op in "+-":
        if modules == (False, False):
            return left + right if node.op == "+" else left - right
        if modules != (True, True):
            return None
        sign = 1 if node.op == "+" or absolute else -1
        total = dict(left)
        for k, v in right.items():
            total[k] = total.get(k, F(0)) + sign * v
        return total
    if node.op == "*":
        if modules == (True, True):
            return None
        if modules == (False, False):
            return left * right
        module, scalar = (left, right) if modules[0] else (right, left)
        factor = abs(scalar) if absolute else scalar
        return {k: v * factor for k, v in module.items()}
    if modules[1] or right == 0:
        return None
    if not modules[0]:
        return left / right
    factor = abs(right) if absolute else right
    return {k: v / factor for k, v in left.items()}


@PROPERTY
@given(trees)
def test_flatten_agrees_with_an_independent_evaluator(tree):
    a, b = _oracle(tree, True), _oracle(tree, False)
    if not isinstance(b, dict):
        with pytest.raises(ExpressionTypeError):
            flatten(tree)
        return
    assert [(t.ref, t.a, t.b) for t in flatten(tree)] == [(k, a[k], b[k]) for k in b]


@PROPERTY
@given(trees)
def test_canonical_round_trip(tree):
    text = canonical(tree)
    reparsed = parse(text)
    assert same_tree(reparsed, tree), text
    assert canonical(reparsed) == text
    try:
        expected = [(t.ref, t.a, t.b) for t in flatten(tree)]
    except ExpressionTypeError:
        with pytest.raises(ExpressionTypeError):
            flatten(reparsed, text)
    else:
        assert [(t.ref, t.a, t.b) for t in flatten(reparsed, text)] == expected


@PROPERTY
@given(trees, st.lists(st.sampled_from([" ", "  ", "\t", "\n", " \n "]), min_size=1))
def test_other_whitespace_parses_the_same(tree, gaps):
    text = canonical(tree)
    pieces = text.split(" ")
    spaced = pieces[0] + "".join(gaps[i % len(gaps)] + piece for i, piece in enumerate(pieces[1:]))
    assert same_tree(parse(f"{gaps[0]}{spaced}{gaps[-1]}"), tree)


def _parse_and_flatten(text):
    try:
        tree = parse(text)
    except ExpressionSyntaxError as error:
        lines = str(error).split("\n")
        assert len(lines) == 3 and lines[0].startswith("invalid expression: ")
        assert lines[2].strip() and set(lines[2].strip()) == {"^"}
        return
    assert same_tree(parse(canonical(tree)), tree)
    try:
        flatten(tree, text)
    except ExpressionTypeError as error:
        assert len(str(error).split("\n")) == 3


@PROPERTY
@given(st.text(alphabet="team/yelp@2sha256:0123abcd .-+*/()eE5\t", max_size=40))
def test_random_text_raises_only_expression_errors(text):
    _parse_and_flatten(text)


@PROPERTY
@given(st.text(max_size=30))
def test_random_unicode_raises_only_expression_errors(text):
    _parse_and_flatten(text)
