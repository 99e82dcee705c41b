"""LoRA arithmetic (SEMANTICS.md section 3), one layer at a time, in float32 at least.

The order and form of every operation is fixed (inputs in canonical order, ``acc = acc +
c * t``): the same composition gives the same bits. Changing it is a new method version.
"""

from __future__ import annotations

from typing import Any

import torch

from registry.adapters.lora.merging import BASIS_INVARIANT, MERGES, MergeInput
from registry.adapters.lora.plan import A_SUFFIX, B_SUFFIX
from registry.errors import IncompatibleModulesError

SVD_THREADS = 1  # torch.linalg.svd differs between thread counts: pin it and record it
# Re-derivations of an svd module on another stack are accepted within this relative error of
# B@A; recorded in the provenance so that `pem verify` applies the tolerance it was made with.
SVD_VERIFY_TOLERANCE = 1e-4


def compute_layer(plan: Any, layer: str, loaded: list[dict[str, torch.Tensor] | None], work: torch.dtype):
    """Output tensors of one layer, and additive statistics (truncation error)."""
    terms = [
        (i, tensors) for i, tensors in zip(plan.inputs, loaded) if tensors is not None
    ]
    method = plan.method.name
    if method == "module":
        return _module(layer, terms, work), {}
    if method == "exact":
        return _exact(layer, terms, work), {}
    return _truncated(plan, layer, terms, work)


def _scaled(module: Any, layer: str) -> float:
    """b_i * s_i: the signed coefficient times the layer's scaling, in double precision."""
    return float(module.b) * float(module.layers[layer]["scaling"])


def _module(layer: str, terms: list, work: torch.dtype) -> dict[str, torch.Tensor]:
    # A = sum a_i * A_i ; B = sum b_i * s_i * B_i (negation flips B only).
    a_sum = b_sum = None
    for module, tensors in terms:
        a_term = tensors["lora_A"].to(work) * float(module.a)
        b_term = tensors["lora_B"].to(work) * _scaled(module, layer)
        a_sum = a_term if a_sum is None else a_sum + a_term
        b_sum = b_term if b_sum is None else b_sum + b_term
    return {layer + A_SUFFIX: a_sum, layer + B_SUFFIX: b_sum}


def _exact(layer: str, terms: list, work: torch.dtype) -> dict[str, torch.Tensor]:
    # A = concat_rows(b_i * s_i * A_i), B = concat_cols(B_i): B @ A = sum b_i s_i B_i A_i.
    a_rows = [tensors["lora_A"].to(work) * _scaled(module, layer) for module, tensors in terms]
    # B is copied as it is: casting it to the working dtype and back would change no bit.
    b_cols = [tensors["lora_B"] for _, tensors in terms]
    return {layer + A_SUFFIX: torch.cat(a_rows, dim=0), layer + B_SUFFIX: torch.cat(b_cols, dim=1)}


def exact_delta(layer: str, terms: list, work: torch.dtype) -> torch.Tensor:
    """dW = sum b_i * s_i * B_i @ A_i."""
    delta = None
    for module, tensors in terms:
        term = (tensors["lora_B"].to(work) @ tensors["lora_A"].to(work)) * _scaled(module, layer)
        delta = term if delta is None else delta + term
    assert delta is not None
    return delta


def _truncated(plan: Any, layer: str, terms: list, work: torch.dtype):
    """Every truncating method: merge the inputs in full or core space, truncate by SVD."""
    merge = MERGES[plan.method.name]
    parameters = plan.parameters
    rank = plan.tensors[layer + A_SUFFIX][1][0]
    if plan.method.name == "svd" or parameters.get("space") == "core":
        core = CoreSpace(terms, work, layer, singular_bases=plan.method.name not in BASIS_INVARIANT)
        merged = _finite(merge(_merge_input(plan, layer, terms, core.cores)), plan, layer)
        u, s, vh = _pinned_svd(merged)
        b, a = core.expand(u[:, :rank] * s[:rank], vh[:rank, :])
    else:
        effects = [_effect(module, tensors, layer, work) for module, tensors in terms]
        merged = _finite(merge(_merge_input(plan, layer, terms, effects)), plan, layer)
        del effects
        u, s, vh = _pinned_svd(merged)
        del merged
        b, a = u[:, :rank] * s[:rank], vh[:rank, :]  # U_k @ diag(S_k), Vh_k
    # The bases are orthonormal, so the error of the truncation is in the dropped singular values.
    norm_sq = float(torch.sum(s.double() ** 2))
    error_sq = float(torch.sum(s[rank:].double() ** 2))
    relative = (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0
    stats = {"error_sq": error_sq, "norm_sq": norm_sq, f"layer:{layer}": relative}
    return {layer + A_SUFFIX: a, layer + B_SUFFIX: b}, stats


def _finite(merged: torch.Tensor, plan: Any, layer: str) -> torch.Tensor:
    """The merge, refused before its SVD when not finite: values the magnitude bounds do not
    cover (the merges rescale), or DARE's 1/density beyond the working dtype."""
    if not bool(torch.isfinite(merged).all()):
        hint = "a larger --density or smaller coefficients" if "density" in plan.parameters else "smaller coefficients"
        raise IncompatibleModulesError([f"the merge is not finite (NaN or Inf) at {layer}: use {hint}"])
    return merged


def _merge_input(plan: Any, layer: str, terms: list, tensors: list[torch.Tensor]) -> MergeInput:
    position = {id(module): n for n, module in enumerate(plan.inputs)}
    return MergeInput(
        tensors=tensors, weights=[float(module.b) for module, _ in terms],
        positions=[position[id(module)] for module, _ in terms], layer=layer, parameters=plan.parameters,
    )


def _effect(module: Any, tensors: dict[str, torch.Tensor], layer: str, work: torch.dtype) -> torch.Tensor:
    """dW_i = s_i * B_i @ A_i, without the coefficient (PEFT's get_delta_weight)."""
    return (tensors["lora_B"].to(work) @ tensors["lora_A"].to(work)) * float(module.layers[layer]["scaling"])


class CoreSpace:
    """Core Space (Panariello et al., NeurIPS 2025): dW_i = U_B @ M_i @ V_A.T exactly.

    U_B (out x p) is the left singular basis of the stacked B_cat = concat_cols(B_i), V_A
    (in x q) that of A_cat^T = concat_rows(A_i)^T; each core M_i = s_i (U_B^T B_i)(A_i V_A) is
    p x q, with p, q at most the sum of the ranks R. The bases are never formed: a thin QR
    (Householder reflectors, ``geqrf``) of each stack, B_cat = Q_B R_B, and the SVD of the small
    R_B = U' S' V'^T give U_B = Q_B U' and U_B^T B_cat = S' V'^T; ``expand`` applies Q_B to the
    truncated result only. O((m + n) R^2) per layer instead of the O(mn min(m, n)) of a dense SVD.

    An entry-wise merge (TIES, DARE, pruning) depends on the basis, so it gets the paper's
    singular bases; a linear one does not (``singular_bases=False``: U_B = Q_B, the cores in R_B
    coordinates), which spares two small SVDs per layer.
    """

    def __init__(self, terms: list, work: torch.dtype, layer: str, singular_bases: bool = True):
        # B_cat^T and A_cat built row by row, so that their transposes are the column-major
        # tall matrices LAPACK factors without another copy.
        b_rows = torch.cat([tensors["lora_B"].to(work).T for _, tensors in terms], dim=0)
        a_rows = torch.cat([tensors["lora_A"].to(work) for _, tensors in terms], dim=0)
        self.left, coords_b = _thin_basis(b_rows.T, singular_bases)
        self.right, coords_a = _thin_basis(a_rows.T, singular_bases)
        self.cores, start = [], 0
        for module, tensors in terms:
            end = start + tensors["lora_A"].shape[0]
            scaling = float(module.layers[layer]["scaling"])
            self.cores.append((coords_b[:, start:end] @ coords_a[:, start:end].T) * scaling)
            start = end

    def expand(self, b_core: torch.Tensor, a_core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_B @ b_core, a_core @ V_A.T): factors in core coordinates back to the layer's."""
        return _apply_basis(self.left, b_core), _apply_basis(self.right, a_core.T).T


Basis = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # Householder reflectors, tau, U'


def _thin_basis(tall: torch.Tensor, singular: bool) -> tuple[Basis, torch.Tensor]:
    """For an m x R matrix X: (a basis U, implicit), and X in its coordinates U^T X (p x R):
    U = Q U' and S' V'^T when ``singular``, else U = Q and R."""
    reflectors, tau = torch.geqrf(tall)
    triangle = reflectors[: min(tall.shape), :].triu()
    if not singular:
        return (reflectors, tau, None), triangle
    u, s, vh = _pinned_svd(triangle)
    return (reflectors, tau, u), s[:, None] * vh


def _apply_basis(basis: Basis, coords: torch.Tensor) -> torch.Tensor:
    """U @ coords (m x k) for a basis from :func:`_thin_basis`: Q (U' coords), Q applied by its reflectors."""
    reflectors, tau, u = basis
    padded = coords.new_zeros((reflectors.shape[0], coords.shape[1]))
    padded[: min(reflectors.shape)] = coords if u is None else u @ coords
    return torch.ormqr(reflectors, tau, padded, left=True, transpose=False)


def _pinned_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(SVD_THREADS)
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def deviation(plan: Any, layer: str, loaded: list, work: torch.dtype) -> tuple[float, float]:
    """(||dW_method - dW_exact||_F, ||dW_exact||_F) for one layer: how far the method's effect
    is from the plain weighted sum of effects (cross terms for ``module``; pruning, sign
    election and truncation for the others)."""
    terms = [(i, t) for i, t in zip(plan.inputs, loaded) if t is not None]
    out, _ = compute_layer(plan, layer, loaded, work)
    approx = out[layer + B_SUFFIX].to(work) @ out[layer + A_SUFFIX].to(work)
    exact = exact_delta(layer, terms, work)
    # Norms in float64: the squares of float32 values above about 1e19 overflow to inf (inf/inf: nan).
    return torch.linalg.matrix_norm((approx - exact).double()).item(), torch.linalg.matrix_norm(exact.double()).item()


def finish(stats: dict[str, float]) -> dict[str, Any]:
    """Results recorded in the provenance, from the summed statistics."""
    if "norm_sq" not in stats:
        return {}
    per_layer = {k.removeprefix("layer:"): v for k, v in stats.items() if k.startswith("layer:")}
    worst = max(per_layer.items(), key=lambda kv: kv[1]) if per_layer else ("", 0.0)
    return {
        "relative_truncation_error": (stats["error_sq"] / stats["norm_sq"]) ** 0.5 if stats["norm_sq"] else 0.0,
        "worst_layer": worst[0],
        "worst_layer_relative_error": worst[1],
        "svd_threads": SVD_THREADS,
        "verify_tolerance": SVD_VERIFY_TOLERANCE,
    }
