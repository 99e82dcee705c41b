"""The expression parser is loaded from tables built ahead of time (registry/language/_tables.py)
instead of being built from the grammar in every process. The stored tables must be those of
the current grammar and lark, and the loaded parser must parse exactly as one built from
the grammar."""

from __future__ import annotations

import pytest

from registry.language import parser

EXPRESSIONS = [
    "team/a",
    "0.5*team/a + 0.5*team/b - 0.3*team/toxic",
    "-(team/a@2 - 2 * sha256:0123abcd) / 3",
    "1e-3*team/a-b.c + (team/x)",
    "team/a +",
    "* team/a",
    "team/a team/b",
    "(team/a",
    "team/a $ team/b",
]


def test_the_stored_tables_are_those_of_the_current_grammar() -> None:
    """Fails after an edit of grammar.lark or a lark upgrade until `write_tables()` is run (the
    tables themselves differ from run to run: lark numbers LALR states in set order)."""
    import lark

    from registry.language import _tables

    assert _tables.GRAMMAR == parser._digest(parser._grammar_text())
    assert _tables.LARK_VERSION == lark.__version__


def test_the_stored_tables_are_what_the_parser_loads() -> None:
    parser._lark_parser.cache_clear()
    try:
        loaded = parser._lark_parser()
        assert loaded.source_path == "<deserialized>"  # not built from the grammar
    finally:
        parser._lark_parser.cache_clear()


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_the_loaded_parser_parses_as_the_one_built_from_the_grammar(text: str) -> None:
    from lark import Token
    from lark.exceptions import UnexpectedInput

    built = parser._build_parser(parser._grammar_text())
    loaded = parser._lark_parser()

    def outcome(lark_parser):
        try:
            tree = lark_parser.parse(text)
        except UnexpectedInput as exc:
            return type(exc).__name__, getattr(exc, "pos_in_stream", None)
        if isinstance(tree, Token):  # a lone reference or number
            return tree.type, str(tree), tree.start_pos, tree.end_pos
        spans = [(t.data, t.meta.start_pos, t.meta.end_pos) for t in tree.iter_subtrees()]
        return tree, spans

    assert outcome(loaded) == outcome(built)
