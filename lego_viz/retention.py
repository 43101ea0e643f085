"""How much of each source adapter a merge keeps, in weight space (DESIGN §5b).

Retention of adapter t in module m is the projection coefficient
``⟨ΔW_merge, w_t ΔW_t⟩_F / ‖w_t ΔW_t‖_F²``: 1 when the merge contains the adapter's (weighted)
update exactly and nothing correlated with it, 0 when it is orthogonal to it. Inner products come
from the factors, ``⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ∘ (A₁A₂ᵀ)``, at ``O((d_in + d_out)·r₁·r₂)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lego_viz.adapters import LoraAdapter, LoraModule


def factored_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """``⟨B1 A1, B2 A2⟩_F`` without forming either product (float64).

    Args:
        B1: (d_out, r1); A1: (r1, d_in); B2: (d_out, r2); A2: (r2, d_in).
    """
    B1, A1, B2, A2 = (t.double() for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def _folded(module: LoraModule, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return module.B * (module.scale * weight), module.A


def module_retention(merged: LoraModule, source: LoraModule, weight: float = 1.0) -> float:
    """``⟨ΔW_merge, w ΔW_t⟩_F / ‖w ΔW_t‖_F²`` for one module (0 for a zero update)."""
    b_t, a_t = _folded(source, weight)
    norm = factored_inner(b_t, a_t, b_t, a_t)
    if norm <= 0.0:
        return 0.0
    return factored_inner(*_folded(merged), b_t, a_t) / norm


def retention(merged_modules: dict[str, LoraModule], adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> dict[str, dict]:
    """Per source adapter: the mean retention over its modules and each module's value.

    Args:
        merged_modules: the merge's modules (any scale).
        adapters: the sources, in the merge's order; weights: theirs.

    Returns:
        ``{adapter name: {"mean": float, "per_module": {module: float}}}``.
    """
    out = {}
    for adapter, weight in zip(adapters, weights):
        per_module = {name: module_retention(merged_modules[name], lora, weight)
                      for name, lora in adapter.modules.items() if name in merged_modules}
        mean = sum(per_module.values()) / len(per_module) if per_module else 0.0
        out[adapter.name] = {"mean": mean, "per_module": per_module}
    return out
