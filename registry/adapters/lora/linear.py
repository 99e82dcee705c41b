"""LoRA's linear methods, ``module`` and ``exact`` (SEMANTICS.md section 3), with numpy.

The same operations in the same order and precision as the torch forms in compute.py
(inputs in canonical order, ``acc = acc + c * t`` with ``c`` rounded to the working dtype),
so the same composition gives the same bits whichever computes it (tests/test_compose_arrays.py
checks them against each other), and a composition with these methods never imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy

from registry.adapters.lora.plan import A_SUFFIX, B_SUFFIX
from registry.compose.arrays import scaled, widen

ARRAYS = "numpy"


def compute_layer(plan: Any, layer: str, loaded: list[dict[str, numpy.ndarray] | None], work: Any):
    """Output arrays of one layer, and additive statistics (none for these methods)."""
    terms = [(i, tensors) for i, tensors in zip(plan.inputs, loaded) if tensors is not None]
    if plan.method.name == "module":
        return _module(layer, terms, work), {}
    return _exact(layer, terms, work), {}


def _coefficient(module: Any, layer: str) -> float:
    """b_i * s_i: the signed coefficient times the layer's scaling, in double precision."""
    return float(module.b) * float(module.layers[layer]["scaling"])


def _module(layer: str, terms: list, work: Any) -> dict[str, numpy.ndarray]:
    # A = sum a_i * A_i ; B = sum b_i * s_i * B_i (negation flips B only).
    a_sum = b_sum = None
    for module, tensors in terms:
        a_term = scaled(tensors["lora_A"], float(module.a), work)
        b_term = scaled(tensors["lora_B"], _coefficient(module, layer), work)
        a_sum = a_term if a_sum is None else numpy.add(a_sum, a_term, out=a_sum)
        b_sum = b_term if b_sum is None else numpy.add(b_sum, b_term, out=b_sum)
    return {layer + A_SUFFIX: a_sum, layer + B_SUFFIX: b_sum}


def _exact(layer: str, terms: list, work: Any) -> dict[str, numpy.ndarray]:
    # A = concat_rows(b_i * s_i * A_i), B = concat_cols(B_i): B @ A = sum b_i s_i B_i A_i.
    a_rows = _scaled_rows([(tensors["lora_A"], _coefficient(module, layer)) for module, tensors in terms], work)
    # B is copied as it is; inputs of mixed dtypes are widened first (exactly, as torch.cat
    # promotes them).
    b_cols = [tensors["lora_B"] for _, tensors in terms]
    if len({b.dtype for b in b_cols}) > 1:
        b_cols = [widen(b, work) for b in b_cols]
    return {layer + A_SUFFIX: a_rows, layer + B_SUFFIX: numpy.concatenate(b_cols, axis=1)}


def _scaled_rows(parts: list[tuple[numpy.ndarray, float]], work: Any) -> numpy.ndarray:
    """concat_rows(c_i * A_i), each product computed straight into its rows of the output
    (the same operations as scaling then concatenating, without the copy)."""
    out = numpy.empty((sum(a.shape[0] for a, _ in parts), parts[0][0].shape[1]), dtype=work)
    row = 0
    for array, coefficient in parts:
        rows = out[row:row + array.shape[0]]
        if array.dtype == numpy.uint16 and work is numpy.float32:  # bfloat16 bits: widen in place
            numpy.left_shift(array, 16, out=rows.view(numpy.uint32), dtype=numpy.uint32)
            rows *= work(coefficient)
        else:
            numpy.multiply(widen(array, work), work(coefficient), out=rows)
        row += array.shape[0]
    return out


def finish(stats: dict[str, float]) -> dict[str, Any]:
    return {}
