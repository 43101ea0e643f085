"""Small factored-SVD helpers shared by the merge-lab methods (ARCHITECTURE §5.2).

Every routine works on thin factors — QR of a tall ``(d, n)`` matrix and SVDs of ``n×n`` cores —
so no ``d_out×d_in`` matrix is ever formed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch


def svd_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of a tall matrix and its coordinates in them, via QR + a small SVD.

    Args:
        X: (d, n).

    Returns:
        ``U (d, m)`` with orthonormal columns ordered by singular value, and ``C (m, n)`` with
        ``X = U C`` (``C = Σ Vᵀ``), ``m = min(d, n)``.
    """
    q, r = torch.linalg.qr(X)
    u, _, _ = torch.linalg.svd(r)
    return q @ u, u.T @ r


def balanced_truncation(
    U: torch.Tensor, core: torch.Tensor, Vt: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k LoRA factors of ``U core Vt`` (orthonormal ``U`` columns and ``Vt`` rows).

    The SVD of the small core gives the SVD of the product; ``S^½`` goes to both sides so the
    two factors have equal norms per rank, as a trained LoRA's roughly do. Missing ranks (the
    update has rank < k) are zero units, so the output always has exactly k ranks.

    Args:
        U: (d_out, m); core: (m, p); Vt: (p, d_in); k: target rank.

    Returns:
        ``(B (d_out, k), A (k, d_in))``.
    """
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = min(k, s.shape[0])
    root = s[:keep].sqrt()
    B = (U @ u[:, :keep]) * root
    A = root[:, None] * (vh[:keep] @ Vt)
    if keep < k:
        B = torch.cat([B, B.new_zeros(B.shape[0], k - keep)], dim=1)
        A = torch.cat([A, A.new_zeros(k - keep, A.shape[1])], dim=0)
    return B.contiguous(), A.contiguous()


def rows_basis(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``V (m, d) = C Qᵀ`` with ``Qᵀ (p, d)`` orthonormal rows and ``C (m, p)``: the row-space twin of :func:`svd_basis`."""
    q, r = torch.linalg.qr(V.T)
    return r.T, q.T


def block_slices(ranks: list[int]) -> list[slice]:
    """Column slices of consecutive blocks of the given widths."""
    out, start = [], 0
    for r in ranks:
        out.append(slice(start, start + r))
        start += r
    return out
