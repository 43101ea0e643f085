"""Core Space merging (Panariello et al., NeurIPS 2025), in factored form (ARCHITECTURE §5.2).

All adapters of a module share one basis: the left singular vectors of the stacked ``B`` and the
right singular vectors of the stacked ``A`` (QR + a small SVD, as the authors' reference bases).
Adapter t becomes the small core ``M_t = U_Bᵀ B_t A_t V_A``; the cores are merged (task
arithmetic, TIES or TSV) and the merged core is truncated to rank k by its SVD. Nothing is lost by
the change of basis, so task arithmetic without truncation is exactly the weighted sum, and with
truncation it equals ``svd``; TIES and TSV act on core entries and directions, where the basis
matters.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.merge.base import MergeMethod, MethodOutput, Option
from lego_viz.merge.lowrank import balanced_truncation, block_slices, svd_basis
from lego_viz.merge.peft_style import peft_merge_utils
from lego_viz.units.msu import module_msus

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

CORE_MERGES = ("tsv", "ta", "ties")

CORE_SPACE_OPTIONS = {
    "merge": Option("tsv", "how the per-adapter cores combine: tsv (task singular vectors, the paper's best), "
                    "ta (task arithmetic: their sum), ties (trim, elect sign, disjoint mean)", choices=CORE_MERGES),
    # The authors' default topK=10 keeps the largest 10% of each core's entries.
    "density": Option(0.1, "ties: fraction of each core's entries kept (largest magnitudes)", kind=float, minimum=0.0, maximum=1.0),
    "majority_sign_method": Option("total", "ties: how the majority sign is elected", choices=("total", "frequency")),
}


def ties_merge(tensors: Sequence[torch.Tensor], density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES as PEFT defines it (magnitude trim per tensor, elected sign, disjoint mean), unit weights.

    The adapters' weights are already inside the tensors, so every tensor enters with weight 1.
    """
    with warnings.catch_warnings():  # density 1 means "no trim" here, not a mistake worth a warning
        warnings.filterwarnings("ignore", message="The density .* no pruning")
        return peft_merge_utils().ties(list(tensors), torch.ones(len(tensors)), density, majority_sign_method)


def tsv_merge(cores: Sequence[torch.Tensor], ranks: Sequence[int]) -> torch.Tensor:
    """Task Singular Vectors: keep each task's leading directions, then decorrelate across tasks.

    Each of the T cores keeps its top ``min(m // T, r_t)`` singular triplets (the authors keep
    ``m // T``; directions past the adapter's own rank have zero singular values and only disturb
    the orthogonalisation). The kept left and right vectors are replaced by their nearest
    orthonormal sets (polar factors, ``U Vᵀ`` of their SVDs) before the sum is rebuilt.

    Args:
        cores: T matrices (m, p).
        ranks: each adapter's rank r_t.
    """
    m = min(cores[0].shape)
    lefts, values, rights = [], [], []
    for core, r in zip(cores, ranks):
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        keep = max(1, min(m // len(cores), r))
        lefts.append(u[:, :keep])
        values.append(s[:keep])
        rights.append(vh[:keep])
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
    u_l, _, vh_l = torch.linalg.svd(left, full_matrices=False)
    u_r, _, vh_r = torch.linalg.svd(right, full_matrices=False)
    return (u_l @ vh_l) * torch.cat(values) @ (u_r @ vh_r)


def module_cores(B: torch.Tensor, A: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The shared basis and each adapter's core.

    Args:
        B: (d_out, n) weighted folded B's side by side; A: (n, d_in) folded A's stacked; ranks: block widths.

    Returns:
        ``U_B (d_out, m_b)``, cores ``M_t (m_b, m_a)`` and ``V_A (d_in, m_a)`` with
        ``B_t A_t = U_B M_t V_Aᵀ``.
    """
    U_B, C_B = svd_basis(B)  # B = U_B C_B
    V_A, C_A = svd_basis(A.T)  # Aᵀ = V_A C_A
    cores = [C_B[:, blk] @ C_A[:, blk].T for blk in block_slices(list(ranks))]
    return U_B, cores, V_A


def core_space(adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    out = MethodOutput(modules={})
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        B, A = table.factors()
        ranks = table.block_ranks()
        U_B, cores, V_A = module_cores(B, A, ranks)
        if options["merge"] == "ta":
            merged = torch.stack(cores).sum(dim=0)
        elif options["merge"] == "ties":
            merged = ties_merge(cores, options["density"], options["majority_sign_method"])
        else:
            merged = tsv_merge(cores, ranks)
        B_k, A_k = balanced_truncation(U_B, merged, V_A.T, k[name])
        out.modules[name] = LoraModule(A=A_k, B=B_k, scale=1.0, fan_in_fan_out=table.fan_in_fan_out)
    return out



CORE_SPACE = MergeMethod(
    "core_space",
    core_space,
    "Core Space (Panariello et al. 2025): cores in a shared SVD basis, merged (tsv/ta/ties), SVD-truncated to k.",
    options=CORE_SPACE_OPTIONS,
    takes_k=True,
)
