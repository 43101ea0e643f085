"""Routing statistics: forward hooks that record gates (off unless used) and pure summaries of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lego_viz.smora.inject import smora_layers


class RoutingRecorder:
    """Context manager that records the gates of SMoRA routers during forward passes.

    Nothing is hooked outside the `with` block, so a model that is not being inspected pays nothing.

    Args:
        model: A model with SMoRA layers.
        modules: Names of the SMoRA layers to record; default all.
        layers: The routed layers by name, when they are not SMoRA layers of `model` (e.g. the
            `ArrowRouting.layers` of zero-shot routing applied to it); each has a `router`.

    Example:
        >>> with RoutingRecorder(model, ["model.layers.0.self_attn.q_proj"]) as rec:
        ...     model(input_ids)
        >>> rec.gates["model.layers.0.self_attn.q_proj"][0].shape   # (batch, seq, r)
    """

    def __init__(self, model: nn.Module, modules: Iterable[str] | None = None, layers: Mapping[str, nn.Module] | None = None) -> None:
        layers = smora_layers(model) if layers is None else layers
        names = list(layers) if modules is None else list(modules)
        unknown = [n for n in names if n not in layers]
        if unknown:
            raise KeyError(f"no SMoRA layer named {unknown[0]!r}; known: {list(layers)[:5]} ...")
        self._routers = {name: layers[name].router for name in names}
        self._handles: list = []
        self.gates: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def __enter__(self) -> RoutingRecorder:
        for name, router in self._routers.items():
            self._handles.append(router.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple, gates: torch.Tensor) -> None:
            self.gates[name].append(gates.detach().float().cpu())

        return record


def selection_frequency(gates: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens that selected each rank: gates `(n_tokens, r)` → `(r,)`."""
    return (gates != 0).float().mean(0)


def selection_counts(gates: torch.Tensor) -> torch.Tensor:
    """Number of tokens that selected each rank (the load `c`): gates `(n_tokens, r)` → `(r,)`."""
    return (gates != 0).float().sum(0)


def source_share(gates: torch.Tensor, unit_source: torch.Tensor, n_sources: int) -> torch.Tensor:
    """Share of each token's gate mass that goes to units of each source adapter.

    Args:
        gates: Gates `(n_tokens, r)`.
        unit_source: Source index of each rank `(r,)`, in `[0, n_sources)`.
        n_sources: Number of source adapters.

    Returns:
        `(n_tokens, n_sources)`, rows summing to 1.
    """
    if unit_source.min() < 0 or unit_source.max() >= n_sources:
        raise ValueError(f"unit_source must lie in [0, {n_sources}); this layer's ranks have no sources")
    one_hot = torch.nn.functional.one_hot(unit_source.long(), n_sources).to(gates.dtype)  # (r, n_sources)
    mass = gates @ one_hot
    return mass / mass.sum(-1, keepdim=True)
