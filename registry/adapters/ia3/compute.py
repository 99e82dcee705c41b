"""(IA)^3 arithmetic on offsets from the neutral vector: ``l = 1 + sum_i b_i * (l_i - 1)``.

This one formula gives every case of the paper's code: a weighted merge (weights summing to
1), negation ``2 - l``, scaled negation ``1 - lambda * (l - 1)`` and the analogy. A layer an
input does not adapt is ``l = 1`` for it: its offset is zero.
"""

from __future__ import annotations

from typing import Any

import torch

from registry.adapters.ia3.plan import L_SUFFIX


def compute_layer(plan: Any, layer: str, loaded: list[dict[str, torch.Tensor] | None], work: torch.dtype):
    offset = None
    for module, tensors in zip(plan.inputs, loaded):
        if tensors is None:
            continue
        term = (tensors["ia3_l"].to(work) - 1.0) * float(module.b)
        offset = term if offset is None else offset + term
    assert offset is not None
    return {layer + L_SUFFIX: offset + 1.0}, {}


def finish(stats: dict[str, float]) -> dict[str, Any]:
    return {}
