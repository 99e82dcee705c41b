"""Merges of per-input tensors into one, after PEFT's ``merge_utils`` (SEMANTICS.md section 3).

Each function takes the inputs' tensors *without* their coefficients (``dW_i = s_i B_i A_i`` in
full space, or the cores ``M_i`` in core space), the signed coefficients ``b_i`` as weights,
and the method's parameters, and returns the merged tensor. They are PEFT's definitions
written to hold one extra tensor at a time rather than stacking every input (a 7B layer's
delta is 180 MB in float32): the same values, up to the order of floating-point sums.

A new merge is one function here and one entry in :data:`MERGES` (and one row in
``registry/methods.py``); it runs in both spaces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class MergeInput:
    tensors: list[torch.Tensor]  # one per input present at the layer; may be modified in place
    weights: list[float]  # b_i
    positions: list[int]  # each input's index in the plan (canonical order): keys DARE's masks
    layer: str
    parameters: dict[str, Any]


def task_arithmetic(x: MergeInput) -> torch.Tensor:
    return _weighted_sum(x.tensors, x.weights)


def magnitude_prune(x: MergeInput) -> torch.Tensor:
    return _weighted_sum([prune_by_magnitude(t, x.parameters["density"]) for t in x.tensors], x.weights)


def ties(x: MergeInput) -> torch.Tensor:
    pruned = [prune_by_magnitude(t, x.parameters["density"]) for t in x.tensors]
    return disjoint_merge(pruned, x.weights, x.parameters["majority_sign"])


def dare_linear(x: MergeInput) -> torch.Tensor:
    return _weighted_sum(_dropped(x), x.weights)


def dare_ties(x: MergeInput) -> torch.Tensor:
    return disjoint_merge(_dropped(x), x.weights, x.parameters["majority_sign"])


MERGES: dict[str, Callable[[MergeInput], torch.Tensor]] = {
    "svd": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}


# Merges whose result does not depend on the basis of core space (linear ones).
BASIS_INVARIANT = {"svd"}


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = None
    for tensor, weight in zip(tensors, weights):
        term = tensor * weight
        total = term if total is None else total + term
    assert total is not None
    return total


def prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (in place).
    PEFT takes ``topk`` indices; a threshold at the k-th largest magnitude keeps the same
    entries unless magnitudes tie exactly at the threshold."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    if keep == 0:
        return tensor.zero_()
    magnitude = tensor.abs()
    threshold = magnitude.view(-1).kthvalue(tensor.numel() - keep + 1).values
    return tensor.mul_(magnitude >= threshold)


def dare_mask(
    seed: int, layer: str, position: int, shape: torch.Size, density: float, dtype: torch.dtype
) -> torch.Tensor:
    """DARE's keep mask (1 with probability ``density``) for one input at one layer. Its
    generator is seeded from the recorded seed, the layer and the input's position, so a
    layer's mask does not depend on which layers were computed before it."""
    key = hashlib.sha256(f"{seed}:{layer}:{position}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.bernoulli(torch.full(shape, density, dtype=dtype), generator=generator)


def _dropped(x: MergeInput) -> list[torch.Tensor]:
    """PEFT's random pruning with rescaling: ``t * mask / density``."""
    density, seed = x.parameters["density"], x.parameters["seed"]
    if density >= 1:
        return x.tensors
    return [
        t.mul_(dare_mask(seed, x.layer, position, t.shape, density, t.dtype)).div_(density)
        for t, position in zip(x.tensors, x.positions)
    ]


def disjoint_merge(tensors: list[torch.Tensor], weights: list[float], majority_sign: str) -> torch.Tensor:
    """TIES's sign election and disjoint mean: per entry, the sign of the sum of the (unweighted)
    values ("total") or of their signs ("frequency"), ties going to +; then the mean of the
    weighted values whose sign agrees, over how many agree (at least 1)."""
    signs = [t.sign().to(torch.int8) for t in tensors]  # a quarter of the memory of float signs
    if majority_sign == "total":
        votes = _weighted_sum(tensors, [1.0] * len(tensors))
    else:
        votes = _weighted_sum((s.to(torch.int32) for s in signs), [1] * len(signs))  # type: ignore[arg-type]
    elected = torch.where(votes >= 0, 1, -1).to(torch.int8)
    del votes
    mixed = count = None
    for tensor, sign, weight in zip(tensors, signs, weights):
        agrees = sign == elected
        term = tensor * weight * agrees
        mixed = term if mixed is None else mixed + term
        count = agrees.to(torch.int32) if count is None else count + agrees
    assert mixed is not None and count is not None
    return mixed / torch.clamp(count, min=1).to(mixed.dtype)
