"""Training SMoRA adapters: the zoo's seeded loop plus loss-free balancing after every step."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lego_viz.smora.balance import balance_step, mean_load_balance
from lego_viz.smora.inject import smora_layers
from lego_viz.zoo.train import Batch, TrainConfig, train_loop

__all__ = ["TrainConfig", "TrainHistory", "count_real_tokens", "train_smora"]


@dataclass
class TrainHistory:
    """Per-step record: loss, and for SMoRA models the mean over layers of `max(c)/mean(c)`."""

    loss: list[float] = field(default_factory=list)
    load_balance: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)


@contextlib.contextmanager
def count_real_tokens(model: nn.Module) -> Iterator[None]:
    """While active, routers count only tokens whose `attention_mask` is 1 (padding is not load)."""
    routers = [layer.router for layer in smora_layers(model).values()]

    def set_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        for router in routers:
            router.count_mask = kwargs.get("attention_mask")

    handle = model.register_forward_pre_hook(set_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for router in routers:
            router.count_mask = None


def train_smora(
    model: nn.Module,
    make_batch: Callable[[random.Random], Batch],
    config: TrainConfig,
    gamma: float | None = None,
    desc: str = "smora",
    progress: bool = True,
) -> TrainHistory:
    """Train the SMoRA parameters of `model`, updating every router's `β` after each optimiser step.

    Args:
        model: A model with SMoRA layers (see `inject_smora`), on its device; batches are
            keyword arguments of its forward (`input_ids`, `attention_mask`, `labels`).
        make_batch: Draws one batch from a seeded `random.Random`.
        config: Optimiser settings (the zoo's `TrainConfig`; its seed drives torch and the batches).
        gamma: Balancing step; default `model.smora_config.gamma`; 0 trains without balancing
            (the counts are still recorded).
        desc: Progress-bar label.
        progress: Show a tqdm bar.

    Returns:
        The loss and load-balance history, one entry per step.
    """
    if not smora_layers(model):
        raise ValueError("model has no SMoRA layers: call inject_smora or load_smora first")
    gamma = model.smora_config.gamma if gamma is None else gamma
    history = TrainHistory()
    bar = tqdm(total=config.steps, desc=desc, disable=not progress, leave=False)

    def after_step(step: int, loss: float) -> None:
        history.loss.append(loss)
        history.load_balance.append(mean_load_balance(balance_step(model, gamma)))
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", balance=f"{history.load_balance[-1]:.2f}")

    with count_real_tokens(model):
        train_loop(model, make_batch, config, on_step=after_step)
    bar.close()
    return history


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
