"""A small training loop for SMoRA adapters (and dense PEFT baselines) with loss-free balancing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lego_viz.smora.balance import balance_step, mean_load_balance
from lego_viz.smora.inject import smora_layers

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training run.

    Args:
        steps: Optimiser steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: Max gradient norm, or None for no clipping.
        seed: Seeds torch (dropout) at the start of training.
    """

    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass
class TrainHistory:
    """Per-step record: loss, and for SMoRA models the mean over layers of `max(c)/mean(c)`."""

    loss: list[float] = field(default_factory=list)
    load_balance: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)


@contextlib.contextmanager
def count_only(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Let the routers count only real tokens (not padding) during one forward pass."""
    routers = [layer.router for layer in smora_layers(model).values()]
    for router in routers:
        router.count_mask = attention_mask
    try:
        yield
    finally:
        for router in routers:
            router.count_mask = None


def train(
    model: nn.Module,
    next_batch: Callable[[int], Batch],
    config: TrainConfig,
    gamma: float | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainHistory:
    """Train the parameters of `model` that require grad on causal-LM batches.

    SMoRA models get a loss-free balancing step after every optimiser step; other models
    (e.g. a PEFT LoRA) are trained plainly.

    Args:
        model: A model whose forward takes the batch keys and returns `.loss`; on its device.
        next_batch: Returns the batch for a step index.
        config: Optimiser settings.
        gamma: Balancing step; default the model's `smora_config.gamma`; 0 disables balancing.
        desc: Progress-bar label.
        progress: Show a tqdm bar.

    Returns:
        The loss and load-balance history.
    """
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters: inject SMoRA or a PEFT adapter first")
    is_smora = bool(smora_layers(model))
    if gamma is None:
        gamma = model.smora_config.gamma if is_smora else 0.0
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history = TrainHistory()
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = {key: value.to(device) for key, value in next_batch(step).items()}
        with count_only(model, batch.get("attention_mask")):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        history.loss.append(float(loss.detach()))
        if is_smora:
            history.load_balance.append(mean_load_balance(balance_step(model, gamma)))
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
    model.eval()
    return history
