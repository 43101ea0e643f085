"""KnOTS (Stoica et al., ICLR 2025): align the adapters by one SVD, merge in the aligned space (ARCHITECTURE §5.2).

The concatenation ``[ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]`` is decomposed from the factors: with
``B = U_B C_B`` (QR + small SVD) and ``A_tᵀ = Q_t R_t``, it equals
``U_B · [C_B,t R_tᵀ]_t · blockdiag(Q_tᵀ)``, so the SVD of the small ``m × n`` middle matrix gives
``U`` and every ``Σ V_tᵀ`` (the authors put ``Σ`` on the V side). The per-adapter blocks
``Σ V_tᵀ`` (each ``m × d_in``) are merged entry by entry with TIES (or DARE then TIES), and
``U · merged`` is truncated to rank k. As in the authors' code, merged entries are disjoint means
and the adapters' weights enter before the SVD; unlike it, trimming is per module, not over the
whole model's vector at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.merge.base import MergeMethod, MethodOutput, Option
from lego_viz.merge.core_space import ties_merge
from lego_viz.merge.lowrank import balanced_truncation, block_slices, rows_basis, svd_basis
from lego_viz.merge.peft_style import peft_merge_utils
from lego_viz.units.msu import module_msus

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

KNOTS_OPTIONS = {
    "rule": Option("ties", "how the aligned V blocks merge: ties (trim + elected sign + disjoint mean) or "
                   "dare_ties (random drop with rescale, then sign + disjoint mean)", choices=("ties", "dare_ties")),
    # The paper's ViT settings keep the top 20% (topK=20) for TIES.
    "density": Option(0.2, "fraction of each block's entries kept (ties: largest magnitudes; dare_ties: random)",
                      kind=float, minimum=0.0, maximum=1.0),
    "majority_sign_method": Option("total", "how the majority sign is elected", choices=("total", "frequency")),
    "seed": Option(0, "seed of dare_ties' random drop mask", kind=int, minimum=0),
}


def aligned_blocks(B: torch.Tensor, A: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``U`` and the per-adapter blocks ``Σ V_tᵀ`` of the concatenation's SVD, from factors.

    Args:
        B: (d_out, n) weighted folded B's side by side; A: (n, d_in) folded A's stacked; ranks: block widths.

    Returns:
        ``U (d_out, m)`` with orthonormal columns and T blocks ``(m, d_in)`` with ``B_t A_t = U · block_t``.
    """
    U_B, C_B = svd_basis(B)
    middles, row_bases = [], []
    for blk in block_slices(list(ranks)):
        r_t, q_t = rows_basis(A[blk])  # A_t = R_t Q_tᵀ, Q_tᵀ with orthonormal rows
        middles.append(C_B[:, blk] @ r_t)
        row_bases.append(q_t)
    u, s, vh = torch.linalg.svd(torch.cat(middles, dim=1), full_matrices=False)
    widths = [m.shape[1] for m in middles]
    blocks = [(s[:, None] * vh[:, blk]) @ q for blk, q in zip(block_slices(widths), row_bases)]
    return U_B @ u, blocks


def merge_blocks(blocks: Sequence[torch.Tensor], rule: str, density: float, sign_method: str, seed: int) -> torch.Tensor:
    """TIES or DARE-TIES over the aligned blocks (PEFT's rules, unit weights)."""
    if rule == "ties":
        return ties_merge(blocks, density, sign_method)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT draws DARE's mask from the global RNG; fork it so the merge is seeded and the caller's RNG untouched.
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        torch.manual_seed(seed)
        return peft_merge_utils().dare_ties(list(blocks), torch.ones(len(blocks)), density, sign_method)


def knots(adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    out = MethodOutput(modules={})
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        B, A = table.factors()
        ranks = table.block_ranks()
        U, blocks = aligned_blocks(B, A, ranks)
        merged = merge_blocks(blocks, options["rule"], options["density"], options["majority_sign_method"], options["seed"])
        core, Vt = rows_basis(merged)  # merged = core · Vt
        B_k, A_k = balanced_truncation(U, core, Vt, k[name])
        out.modules[name] = LoraModule(A=A_k, B=B_k, scale=1.0, fan_in_fan_out=table.fan_in_fan_out)
    return out



KNOTS = MergeMethod(
    "knots",
    knots,
    "KnOTS (Stoica et al. 2025): SVD of the concatenated updates aligns them; TIES on the per-adapter V blocks; rank ≤ k.",
    options=KNOTS_OPTIONS,
    takes_k=True,
)
