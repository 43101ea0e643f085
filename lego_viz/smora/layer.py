"""The SMoRA layer: a base linear plus rank-wise routed LoRA (ARCHITECTURE §6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.routing import route, route_counts


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """`(d_in, d_out, fan_in_fan_out)` of an `nn.Linear` or a GPT-2 `Conv1D` (weight stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out, True
    raise TypeError(f"SMoRA wraps nn.Linear or transformers Conv1D layers, got {type(layer).__name__}")


class SMoRARouter(nn.Module):
    """Router `W_g` (no bias) plus the balancing bias buffer `β`; returns per-rank gates.

    Kept as its own module so that a forward hook on it sees the gates at no extra cost.
    While training it counts how many tokens picked each route, for the balancing step;
    `count_mask` (e.g. the attention mask, set by the training loop) keeps padding out of the counts.
    """

    count_mask: torch.Tensor | None = None

    def __init__(self, d_in: int, config: SMoRAConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.k_routes = config.k_routes
        self.gate = config.gate
        self.partition = config.rank_partition
        self.weight = nn.Parameter(torch.empty(config.n_routes, d_in, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.register_buffer("bias", torch.zeros(config.n_routes, device=device, dtype=dtype))
        self.register_buffer("load", torch.zeros(config.n_routes, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.sigmoid(F.linear(x, self.weight))  # (..., n_routes)
        gates, top = route(sigma, self.bias, self.k_routes, self.gate, self.partition)
        if self.training:
            mask = self.count_mask
            if mask is not None:
                if mask.shape != top.shape[:-1]:
                    raise ValueError(f"count_mask shape {tuple(mask.shape)} != token shape {tuple(top.shape[:-1])}")
                top = top[mask.bool()]
            self.load += route_counts(top, self.weight.shape[0])
        return gates

    def take_load(self) -> torch.Tensor:
        """Token counts per route since the last call, then reset them."""
        counts = self.load.clone()
        self.load.zero_()
        return counts


class SMoRALinear(nn.Module):
    """`y = W0 x + (α / k) Σ_{i∈S} g_i · b_i (a_iᵀ x)` with `S` the top-k ranks chosen per token.

    Args:
        base_layer: The frozen `nn.Linear` or `Conv1D` to wrap.
        config: Ranks, k, α, gate mode and partition.
        lora_A: Optional initial `A`, shape `(r, d_in)`; default Kaiming-uniform as in PEFT.
        lora_B: Optional initial `B`, shape `(d_out, r)`; default zeros, so the layer starts as the base.
        unit_source: Optional source-adapter index of each rank, shape `(r,)`; -1 means "own rank".
    """

    def __init__(
        self,
        base_layer: nn.Module,
        config: SMoRAConfig,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        unit_source: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out, self.fan_in_fan_out = linear_shape(base_layer)
        self.base_layer = base_layer
        self.r, self.k = config.r, config.k
        self.scaling = config.lora_alpha / config.k
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(_initial(lora_A, (config.r, d_in), "lora_A", factory))
        self.lora_B = nn.Parameter(_initial(lora_B, (d_out, config.r), "lora_B", factory))
        if lora_A is None:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if lora_B is None:
            nn.init.zeros_(self.lora_B)
        self.router = SMoRARouter(d_in, config, **factory)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        source = torch.full((config.r,), -1, dtype=torch.long) if unit_source is None else unit_source
        if source.shape != (config.r,):
            raise ValueError(f"unit_source must have shape ({config.r},), got {tuple(source.shape)}")
        self.register_buffer("unit_source", source.to(device=factory["device"], dtype=torch.long).clone())

    @property
    def d_in(self) -> int:
        return self.lora_A.shape[1]

    @property
    def d_out(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        gates = self.router(x)  # (..., r), zero outside the top-k
        # Dense over r: for the small r of SMoRA a masked matmul beats gathering k columns per token.
        hidden = F.linear(self.dropout(x), self.lora_A) * gates  # (..., r)
        return result + F.linear(hidden, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, k={self.k}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def _initial(value: torch.Tensor | None, shape: tuple[int, int], name: str, factory: dict) -> torch.Tensor:
    if value is None:
        return torch.empty(shape, **factory)
    if tuple(value.shape) != shape:
        raise ValueError(f"initial {name} must have shape {shape}, got {tuple(value.shape)}")
    return value.detach().to(**factory).clone()
