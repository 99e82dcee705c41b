"""LoRA arithmetic (SEMANTICS.md section 3), one layer at a time, in float32 at least.

The order and form of every operation is fixed (inputs in canonical order, ``acc = acc +
c * t``): the same composition gives the same bits. Changing it is a new method version.
"""

from __future__ import annotations

from typing import Any

import torch

from registry.adapters.lora.plan import A_SUFFIX, B_SUFFIX

SVD_THREADS = 1  # torch.linalg.svd differs between thread counts: pin it and record it
# Re-derivations of an svd module on another stack are accepted within this relative error of
# B@A; recorded in the provenance so that `pem verify` applies the tolerance it was made with.
SVD_VERIFY_TOLERANCE = 1e-4


def compute_layer(plan: Any, layer: str, loaded: list[dict[str, torch.Tensor] | None], work: torch.dtype):
    """Output tensors of one layer, and additive statistics (svd truncation error)."""
    terms = [
        (i, tensors) for i, tensors in zip(plan.inputs, loaded) if tensors is not None
    ]
    method = plan.method.name
    if method == "module":
        return _module(layer, terms, work), {}
    if method == "exact":
        return _exact(layer, terms, work), {}
    return _svd(plan, layer, terms, work)


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


def _svd(plan: Any, layer: str, terms: list, work: torch.dtype):
    delta = exact_delta(layer, terms, work)
    rank = plan.tensors[layer + A_SUFFIX][1][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(SVD_THREADS)
    try:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    b = u[:, :rank] * s[:rank]  # U_k @ diag(S_k)
    a = vh[:rank, :]
    error = torch.linalg.matrix_norm(delta - b @ a).item()
    norm = torch.linalg.matrix_norm(delta).item()
    stats = {"error_sq": error**2, "norm_sq": norm**2, f"layer:{layer}": error / norm if norm else 0.0}
    return {layer + A_SUFFIX: a, layer + B_SUFFIX: b}, stats


def deviation(plan: Any, layer: str, loaded: list, work: torch.dtype) -> tuple[float, float]:
    """(||dW_module - dW_exact||_F, ||dW_exact||_F) for one layer: how far the paper's
    arithmetic is from the exact sum of effects (cross terms B_i @ A_j)."""
    terms = [(i, t) for i, t in zip(plan.inputs, loaded) if t is not None]
    out = _module(layer, terms, work)
    approx = out[layer + B_SUFFIX] @ out[layer + A_SUFFIX]
    exact = exact_delta(layer, terms, work)
    return torch.linalg.matrix_norm(approx - exact).item(), torch.linalg.matrix_norm(exact).item()


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
