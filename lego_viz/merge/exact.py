"""Exact and low-rank-exact baselines: ``linear`` (concatenation) and factored ``svd`` (ARCHITECTURE §5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.merge.base import MergeError, MergeMethod, MethodOutput
from lego_viz.units.msu import module_msus, table_to_module

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch


def linear(adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    out = MethodOutput(modules={})
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        out.modules[name] = table_to_module(table)
        out.unit_owner[name] = table.adapter_index
    return out




LINEAR = MergeMethod(
    "linear",
    linear,
    "Exact weighted sum Σ w_t ΔW_t by concatenating all units (rank Σ r_t; PEFT 'cat').",
    options={},
    takes_k=False,
)
def truncated_svd_factors(
    B: torch.Tensor, A: torch.Tensor, k: int, singular_values: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of ``B A`` without forming it.

    QR of both factors leaves a small core ``R_B R_Aᵀ`` whose SVD is the SVD of ``B A``.
    Singular values go on the B side, as PEFT's ``svd`` combination does.

    Args:
        B: (d_out, n); A: (n, d_in).
        singular_values: if given, all singular values of ``B A`` are appended to it.

    Returns:
        ``(B_k (d_out, k), A_k (k, d_in))``.
    """
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    if singular_values is not None:
        singular_values.append(s)
    k_eff = min(k, s.shape[0])
    B_k = (q_b @ u[:, :k_eff]) * s[:k_eff]
    A_k = vh[:k_eff] @ q_a.T
    if k_eff < k:  # the update has lower rank than asked for: pad with zero units
        B_k = torch.cat([B_k, B_k.new_zeros(B_k.shape[0], k - k_eff)], dim=1)
        A_k = torch.cat([A_k, A_k.new_zeros(k - k_eff, A_k.shape[1])], dim=0)
    return B_k, A_k


def svd(adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    out = MethodOutput(modules={})
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        rank = k[name]
        limit = min(table.d_in, table.d_out)
        if rank > limit:
            raise MergeError(f"k={rank} exceeds min(d_in, d_out)={limit} of module {name}; a rank-{rank} SVD does not exist.")
        spectrum: list[torch.Tensor] = []
        B_k, A_k = truncated_svd_factors(*table.factors(), rank, spectrum)
        out.reference_sq_norms[name] = float(spectrum[0].double().square().sum())  # ‖B A‖_F² = Σ s²
        out.modules[name] = LoraModule(A=A_k.contiguous(), B=B_k.contiguous(), scale=1.0, fan_in_fan_out=table.fan_in_fan_out)
    return out




SVD = MergeMethod(
    "svd",
    svd,
    "Best rank-k approximation of the weighted sum, computed on the factors (equals PEFT 'svd').",
    options={},
    takes_k=True,
)
