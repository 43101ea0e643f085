"""Loss-free balancing step over all SMoRA layers of a model (run after each optimiser step)."""

from __future__ import annotations

import torch
from torch import nn

from lego_viz.smora.inject import smora_layers
from lego_viz.smora.routing import balance_update, load_balance


@torch.no_grad()
def balance_step(model: nn.Module, gamma: float) -> dict[str, torch.Tensor]:
    """Update every router's `β` from the token counts gathered since the last step, then reset them.

    Args:
        model: A model with SMoRA layers that ran forward passes in training mode.
        gamma: Balancing step; 0 only collects the counts (balancing off).

    Returns:
        The route counts `c` of each layer, shape `(n_routes,)`, for the load-balance record.
    """
    counts = {}
    for name, layer in smora_layers(model).items():
        c = layer.router.take_load()
        if gamma > 0 and c.sum() > 0:
            layer.router.bias.copy_(balance_update(layer.router.bias, c, gamma))
        counts[name] = c.cpu()
    return counts


def mean_load_balance(counts: dict[str, torch.Tensor]) -> float:
    """Mean over layers of `max(c) / mean(c)`, skipping layers that routed no token."""
    values = [load_balance(c) for c in counts.values() if c.sum() > 0]
    if not values:
        raise ValueError("no SMoRA layer routed any token: run a training-mode forward pass first")
    return sum(values) / len(values)
