"""(IA)^3 arithmetic on offsets from the neutral vector: ``l = 1 + sum_i b_i * (l_i - 1)``.

This one formula gives every case of the paper's code: a weighted merge (weights summing to
1), negation ``2 - l``, scaled negation ``1 - lambda * (l - 1)`` and the analogy. A layer an
input does not adapt is ``l = 1`` for it: its offset is zero.

Element-wise, so computed with numpy (registry/compose/arrays.py): the same operations in
the same order and precision as the torch form it replaced (``(l - 1.0) * b``, summed in
canonical order, then ``+ 1.0``), so the same bits and digests.
"""

from __future__ import annotations

from typing import Any

import numpy

from registry.adapters.ia3.plan import L_SUFFIX
from registry.compose.arrays import widen

ARRAYS = "numpy"


def compute_layer(plan: Any, layer: str, loaded: list[dict[str, numpy.ndarray] | None], work: Any):
    offset = None
    one = work(1.0)
    for module, tensors in zip(plan.inputs, loaded):
        if tensors is None:
            continue
        term = numpy.subtract(widen(tensors["ia3_l"], work), one)
        term *= work(float(module.b))
        offset = term if offset is None else numpy.add(offset, term, out=offset)
    assert offset is not None
    offset += one
    return {layer + L_SUFFIX: offset}, {}


def finish(stats: dict[str, float]) -> dict[str, Any]:
    return {}
