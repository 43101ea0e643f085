"""Put SMoRA layers into a model (transformers or any nn.Module) and find them again."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.layer import SMoRALinear

LayerInit = Mapping[str, torch.Tensor]  # optional "lora_A", "lora_B", "unit_source" for one module


def matches_target(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's list rule: the module name equals a target or ends with `.target`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: SMoRAConfig) -> list[str]:
    """Names of the linear / `Conv1D` modules of `model` that `config.target_modules` selects."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)]
    if config.target_modules == ("all-linear",):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name in linear if head is None or model.get_submodule(name) is not head]
    return [name for name in linear if matches_target(name, config.target_modules)]


def inject_smora(
    model: nn.Module, config: SMoRAConfig, init: Mapping[str, LayerInit] | None = None
) -> dict[str, SMoRALinear]:
    """Replace the target layers of `model` (in place) by SMoRA layers and freeze everything else.

    Args:
        model: The base model; its own parameters end up with `requires_grad=False`.
        config: SMoRA settings; `target_modules` picks the layers.
        init: Optional initial tensors per module name (`lora_A`, `lora_B`, `unit_source`), e.g. the
            concatenated MSUs of several adapters. Names must be targets of `config`.

    Returns:
        The new layers by module name.
    """
    if smora_layers(model):
        raise ValueError("model already has SMoRA layers; load it fresh before injecting again")
    names = find_targets(model, config)
    if not names:
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches target_modules={list(config.target_modules)}"
        )
    init = init or {}
    stray = sorted(set(init) - set(names))
    if stray:
        raise ValueError(f"initial tensors given for modules that are not targets: {stray[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = SMoRALinear(getattr(parent, child), config, **dict(init.get(name, {})))
        layer.lora_A.requires_grad_(config.train_lora)
        layer.lora_B.requires_grad_(config.train_lora)
        setattr(parent, child, layer)
        layers[name] = layer
    model.smora_config = config
    return layers


def smora_layers(model: nn.Module) -> dict[str, SMoRALinear]:
    """All SMoRA layers of `model` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SMoRALinear)}


def smora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable SMoRA parameters (routers, and `A`/`B` unless frozen)."""
    return [p for layer in smora_layers(model).values() for p in layer.parameters() if p.requires_grad]
