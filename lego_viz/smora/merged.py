"""A router over merged MSUs: the units of several adapters, frozen, picked top-k per token.

Concatenating the folded units of T adapters gives one LoRA of rank n = Σ r_t that is exactly their sum
(ARCHITECTURE §3.2). Here those n units become the ranks of a SMoRA layer whose factors stay frozen; only the
router (and β) learns which k units each token should use — dynamic composition of the same units that
static merges (linear, svd, lego at rank k) combine once for all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from lego_viz.adapters import LoraAdapter, check_compatible, module_order
from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.inject import LayerInit, inject_smora
from lego_viz.smora.layer import SMoRALinear
from lego_viz.units.msu import module_msus


def concatenated_units(adapters: Sequence[LoraAdapter]) -> tuple[dict[str, LayerInit], list[str]]:
    """The folded units of every module of `adapters`, concatenated, as SMoRA layer initialisers.

    Args:
        adapters: Compatible LoRA adapters; every module must end up with the same number of units
            (one SMoRA `r` for the whole model).

    Returns:
        `(init, names)`: per module `lora_A (n, d_in)`, `lora_B (d_out, n)` and `unit_source (n,)`
        (the adapter index of each unit), and the adapter names.
    """
    check_compatible(list(adapters))
    init, sizes = {}, {}
    for module in module_order(adapters):
        table = module_msus(adapters, module)
        init[module] = {"lora_A": table.a, "lora_B": table.b.T, "unit_source": table.adapter_index}
        sizes[module] = table.n
    if len(set(sizes.values())) > 1:
        counts = sorted(set(sizes.values()))
        raise ValueError(
            f"modules have different numbers of units {counts} (e.g. {next(iter(sizes))}: "
            f"{next(iter(sizes.values()))}); a router over merged units needs the same total rank in every module"
        )
    return init, [a.name for a in adapters]


def merged_router_config(adapters: Sequence[LoraAdapter], k: int, **options) -> SMoRAConfig:
    """The SMoRA config of a router over the concatenated units of `adapters`, `k` active per token.

    `lora_alpha = k` so the scale `α/k` is 1: a selected unit with gate 1 adds exactly its own folded
    update, and with `k = n` and unit gates the layer is the sum of all adapters.

    Args:
        adapters: The source adapters.
        k: Active units per token.
        **options: Other `SMoRAConfig` fields (`gamma`, `gate`, ...).
    """
    modules = module_order(adapters)
    n = sum(a.modules[modules[0]].r for a in adapters if modules[0] in a.modules)
    config = SMoRAConfig(
        r=n,
        k=k,
        lora_alpha=float(k),
        target_modules=tuple(modules),
        train_lora=False,
        sources=tuple(a.name for a in adapters),
        base_model=adapters[0].base_model,
    )
    return replace(config, **options) if options else config


def inject_merged_router(
    model: nn.Module, adapters: Sequence[LoraAdapter], k: int, **options
) -> dict[str, SMoRALinear]:
    """Put a router over the merged units of `adapters` into `model` (in place); only routers train.

    Args:
        model: The base model the adapters were trained on.
        adapters: The source adapters.
        k: Active units per token.
        **options: Other `SMoRAConfig` fields.

    Returns:
        The SMoRA layers by module name.
    """
    init, _ = concatenated_units(adapters)
    return inject_smora(model, merged_router_config(adapters, k, **options), init=init)
