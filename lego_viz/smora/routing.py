"""Rank routing and loss-free balancing as pure functions on tensors (ARCHITECTURE §6)."""

from __future__ import annotations

import torch

# A sum of selected affinities at or below this is degenerate (possible only with the authors' gates once
# β has drifted far below -σ); clamping keeps the gates finite instead of dividing by ~0.
_MIN_GATE_MASS = 1e-6


def route(
    sigma: torch.Tensor, beta: torch.Tensor, k_routes: int, gate: str = "authors", partition: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the top-k routes per token and compute rank gates.

    Args:
        sigma: Router affinities `sigmoid(W_g x)`, shape `(..., n_routes)`.
        beta: Balancing bias, shape `(n_routes,)`; it shifts the selection `top_k(σ + β)`.
        k_routes: Number of routes selected per token.
        gate: `"authors"` normalises `σ + β` over the selection, `"sigma"` normalises `σ`.
        partition: Ranks per route (`rank_partition`); each route gate is repeated this many times.

    Returns:
        `(gates, top)`: gates of shape `(..., n_routes * partition)`, zero outside the selection and
        summing to `k_routes * partition` per token; `top` the selected route indices `(..., k_routes)`.
    """
    z = sigma + beta
    top = z.topk(k_routes, dim=-1).indices
    score = z if gate == "authors" else sigma
    chosen = score.gather(-1, top)  # (..., k_routes)
    chosen = k_routes * chosen / chosen.sum(-1, keepdim=True).clamp_min(_MIN_GATE_MASS)
    gates = torch.zeros_like(sigma).scatter(-1, top, chosen)
    if partition > 1:
        gates = gates.repeat_interleave(partition, dim=-1)
    return gates, top


def route_counts(top: torch.Tensor, n_routes: int) -> torch.Tensor:
    """Number of tokens that selected each route, shape `(n_routes,)`, float32."""
    return torch.bincount(top.reshape(-1), minlength=n_routes).to(torch.float32)


def balance_update(beta: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss-free balancing: `β_i + γ · sign(mean(c) − c_i)` (under-used routes get a higher bias)."""
    return beta + gamma * torch.sign(counts.mean() - counts).to(beta.dtype)


def load_balance(counts: torch.Tensor) -> float:
    """The load-balance figure `max(c) / mean(c)`: 1 is perfectly even, `n_routes / k` the worst."""
    mean = counts.float().mean()
    if mean <= 0:
        raise ValueError("no tokens were routed: load balance is undefined")
    return float(counts.float().max() / mean)
