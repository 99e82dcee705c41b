"""The composition language: ``0.5*team/yelp + 0.5*team/amazon - 0.3*team/toxic``.

* :func:`parse` turns text into a tree of :class:`Ref`, :class:`Number`, :class:`Neg` and
  :class:`BinOp` nodes (raising :class:`~registry.errors.ExpressionSyntaxError`);
* :func:`flatten` type-checks a tree and reduces it to one :class:`Term` per distinct
  reference, with its unsigned and signed coefficients ``a`` and ``b`` (raising
  :class:`~registry.errors.ExpressionTypeError`); :func:`merge_terms` merges terms whose
  references resolve to the same module;
* :func:`canonical` prints a tree in normalized form.

Every error message shows the expression with carets under the culprit (:func:`caret`).
Whitespace is free, except that a reference may contain '-' and '.' and the lexer takes the
longest reference: put spaces around a binary minus that follows a name (``team/a - 2*team/b``),
and around a '/' between numbers (``1 / 3``; ``1/3`` reads as the module ``1/3``).
"""

from registry.language.flatten import Term, flatten, merge_terms
from registry.language.nodes import BinOp, Expr, Neg, Number, Ref, references, same_tree, strip_positions
from registry.language.parser import canonical, caret, number_text, parse

__all__ = [
    "BinOp",
    "Expr",
    "Neg",
    "Number",
    "Ref",
    "Term",
    "canonical",
    "caret",
    "flatten",
    "merge_terms",
    "number_text",
    "parse",
    "references",
    "same_tree",
    "strip_positions",
]
