"""How much of each source adapter a merge keeps, and how far the merge is from the exact sum (ARCHITECTURE §5.2).

Retention of adapter t in module m is the projection coefficient
``⟨ΔW_merge, w_t ΔW_t⟩_F / ‖w_t ΔW_t‖_F²``: 1 when the merge contains the adapter's (weighted)
update exactly and nothing correlated with it, 0 when it is orthogonal to it. Inner products come
from the factors, ``⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ)``, at ``O((d_in + d_out)·r₁·r₂)``.

The report's error ``‖ΔW_merge − Σ_t w_t ΔW_t‖ / ‖Σ_t w_t ΔW_t‖`` needs the same cross products
(expand the square), so :func:`report_scores` computes both from one set of products per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.checks.factored import (
    Factored,
    array_relative_error,
    expanded_relative_error,
    low_rank_relative_error,
)

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch


def factored_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``⟨B1 A1, B2 A2⟩_F`` without forming either product (float64).

    Args:
        B1: (d_out, r1); A1: (r1, d_in); B2: (d_out, r2); A2: (r2, d_in).
    """
    B1, A1, B2, A2 = (t.double() for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def _hadamard_sum(left: torch.Tensor | np.ndarray, right: torch.Tensor | np.ndarray) -> float:
    """``Σ left ∘ right`` of two small float32 products, summed in float64."""
    if isinstance(left, np.ndarray):
        return float((left.astype(np.float64) * right.astype(np.float64)).sum())
    return float((left.double() * right.double()).sum())


def _float32(factor: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    # numpy factors (the merge command's) stay numpy: no torch
    return factor.astype(np.float32, copy=False) if isinstance(factor, np.ndarray) else factor.float()


def module_products(merged: LoraModule, sources: Sequence[tuple[LoraModule, float]]) -> tuple[list[float], list[float], float]:
    """The inner products a module's report needs, from its factors (no dense ΔW), torch or numpy.

    Float32 products of the factors (``(k, r)`` and ``(r, r)`` blocks, one pass over each source's
    factors), summed in float64: within ~1e-6 of the float64 products, and several times faster,
    as a CPU reads float32 once instead of converting every factor to float64 first.

    Args:
        merged: the merged module (any scale).
        sources: each source module with its merge weight.

    Returns:
        ``(cross, source_sq, merged_sq)``: ``⟨ΔW_merge, w_t ΔW_t⟩`` and ``‖w_t ΔW_t‖²`` per
        source, and ``‖ΔW_merge‖²``.
    """
    b_m, a_m = _float32(merged.B), _float32(merged.A)  # (d_out, k), (k, d_in)
    cross, source_sq = [], []
    for lora, weight in sources:
        b_t, a_t = _float32(lora.B), _float32(lora.A)  # (d_out, r), (r, d_in)
        s = lora.scale * weight
        cross.append(merged.scale * s * _hadamard_sum(b_m.T @ b_t, a_m @ a_t.T))
        source_sq.append(s * s * _hadamard_sum(b_t.T @ b_t, a_t @ a_t.T))
    merged_sq = merged.scale**2 * _hadamard_sum(b_m.T @ b_m, a_m @ a_m.T)
    return cross, source_sq, merged_sq


@dataclass(frozen=True)
class ReportProducts:
    """A merged module's report products, as :func:`module_products` returns them, made by the merge
    from what it had computed anyway (lego: its Gram matrices), so the report reads no weights.

    They hold for ``module`` only: :func:`report_scores` uses them when the module it scores is
    that very object, and computes them from the factors otherwise.
    """

    module: LoraModule
    cross: list[float]
    source_sq: list[float]
    merged_sq: float


def _present(name: str, adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> list[tuple[int, LoraModule, float]]:
    return [(t, a.modules[name], w) for t, (a, w) in enumerate(zip(adapters, weights)) if name in a.modules]


def _exact_error(merged: LoraModule, present: list[tuple[int, LoraModule, float]], reference_sq: float | None,
                 cross: float, merged_sq: float) -> float:
    """``‖ΔW_merge − Σ_t w_t ΔW_t‖ / ‖Σ_t w_t ΔW_t‖`` by the QR route: on numpy arrays (the merge command's
    factors) without torch, on tensors through :func:`lego_viz.checks.factored.low_rank_relative_error`."""
    if all(isinstance(m.A, np.ndarray) and isinstance(m.B, np.ndarray) for m in (merged, *(lora for _, lora, _ in present))):
        return array_relative_error([(lora.B, lora.A, lora.scale * w) for _, lora, w in present],
                                    [(merged.B, merged.A, merged.scale)])
    reference = Factored.concat([Factored.of(lora, w) for _, lora, w in present])
    return low_rank_relative_error(reference, Factored.of(merged), reference_sq, cross=cross, candidate_sq=merged_sq)


def report_scores(
    merged_modules: Mapping[str, LoraModule],
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    reference_sq_norms: Mapping[str, float | None] | None = None,
    products: Mapping[str, ReportProducts] | None = None,
    errors: bool = True,
) -> tuple[dict[str, float], dict[str, dict]]:
    """Per module the relative error to the weighted sum, and per adapter its retention, in one pass.

    Args:
        merged_modules: the merge's modules.
        adapters, weights: the sources in the merge's order and their weights.
        reference_sq_norms: ``‖Σ_t w_t ΔW_t‖²`` per module where the merge had it (saves an
            ``O((d_in + d_out)·n²)`` product); computed from the factors where missing.
        products: the merge's own :class:`ReportProducts` per module, used where they belong to
            the module being scored.
        errors: False computes retention only.

    Returns:
        ``(errors, retention)``: errors as in :func:`lego_viz.export.folder.reconstruction_errors`,
        retention as in :func:`retention`.
    """
    reference_sq_norms, products = reference_sq_norms or {}, products or {}
    result_errors: dict[str, float] = {}
    per_adapter: list[dict[str, float]] = [{} for _ in adapters]
    for name, merged in merged_modules.items():
        present = _present(name, adapters, weights)
        if not present:
            continue
        known = products.get(name)
        if known is not None and known.module is merged and len(known.cross) == len(present):
            cross, source_sq, merged_sq = known.cross, known.source_sq, known.merged_sq
        else:
            cross, source_sq, merged_sq = module_products(merged, [(lora, w) for _, lora, w in present])
        for (t, _, _), inner, norm in zip(present, cross, source_sq):
            per_adapter[t][name] = inner / norm if norm > 0.0 else 0.0
        if errors:
            reference_sq = reference_sq_norms.get(name)
            error = None if reference_sq is None else expanded_relative_error(reference_sq, sum(cross), merged_sq)
            if error is None:  # the factors themselves only where the expansion cannot answer
                error = _exact_error(merged, present, reference_sq, sum(cross), merged_sq)
            result_errors[name] = error
    kept = {}
    for adapter, per_module in zip(adapters, per_adapter):
        mean = sum(per_module.values()) / len(per_module) if per_module else 0.0
        kept[adapter.name] = {"mean": mean, "per_module": per_module}
    return result_errors, kept


def retention(merged_modules: dict[str, LoraModule], adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> dict[str, dict]:
    """Per source adapter: the mean retention over its modules and each module's value.

    Args:
        merged_modules: the merge's modules (any scale).
        adapters: the sources, in the merge's order; weights: theirs.

    Returns:
        ``{adapter name: {"mean": float, "per_module": {module: float}}}``.
    """
    return report_scores(merged_modules, adapters, weights, errors=False)[1]
