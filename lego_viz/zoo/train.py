"""Seeded training loops: pre-training the zoo base and fitting one PEFT LoRA per task."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lego_viz.zoo.data import mixture_batch
from lego_viz.zoo.model import TARGET_MODULES, quiet_peft
from lego_viz.zoo.tasks import Task

Batch = dict[str, torch.Tensor]
# loss_fn(model, batch, rng) -> scalar loss; the default is the model's own causal-LM loss.
LossFn = Callable[[torch.nn.Module, Batch, random.Random], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: Batch, rng: random.Random) -> torch.Tensor:
    """Cross-entropy on the labelled tokens (the answer and `</s>`)."""
    device = next(model.parameters()).device
    # Batches are right-padded and attention is causal, so no real token ever sees a pad:
    # the attention mask can be left out, which keeps SDPA on its fast unmasked kernel.
    return model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training run (AdamW, linear warm-up then cosine decay)."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.weight_decay >= 0):
            raise ValueError("lr and grad_clip must be > 0 and weight_decay >= 0")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(
    model: torch.nn.Module,
    make_batch: Callable[[random.Random], Batch],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    loss_fn: LossFn = lm_loss,
) -> list[float]:
    """Train the parameters of `model` that require grad; returns the loss of every step.

    Args:
        model: A causal LM that takes `input_ids`, `attention_mask` and `labels`.
        make_batch: Draws one batch from a seeded `random.Random`.
        config: Optimiser settings (its seed drives both torch and the batch RNG).
        on_step: Called as `on_step(step, loss)` after each step (progress bars).
        loss_fn: The loss of one batch (`lm_loss` by default); it gets the same RNG as `make_batch`.

    Returns:
        The training loss at each step.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    model.train()
    losses = []
    for step in range(config.steps):
        loss = loss_fn(model, make_batch(rng), rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def pretrain(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[Task],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Pre-train all weights of `model` on a uniform mixture of `tasks`; returns the losses."""
    return train_loop(
        model, lambda rng: mixture_batch(tasks, config.batch_size, rng, tokenizer), config, on_step
    )


def lora_config(rank: int, alpha: float | None = None) -> LoraConfig:
    """The PEFT config of a zoo adapter: `rank` on all attention and MLP projections.

    Args:
        rank: LoRA rank `r`.
        alpha: `lora_alpha`; `2 * rank` when omitted, so every rank has scale 2.

    Returns:
        A `LoraConfig` for causal LM training.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base: torch.nn.Module,
    make_batch: Callable[[random.Random], Batch],
    peft_config: LoraConfig,
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    loss_fn: LossFn = lm_loss,
) -> tuple[PeftModel, list[float]]:
    """Wrap `base` with a fresh LoRA and train only the LoRA weights.

    The base is modified in place by PEFT; call `unload()` on the result (or reload the
    base) before training another adapter on it.

    Args:
        base: The pre-trained base model.
        make_batch: Draws one batch from a seeded `random.Random` (e.g. a `task_batch`).
        peft_config: LoRA settings (see `lora_config`).
        config: Optimiser settings.
        on_step: Progress callback, as in `train_loop`.
        loss_fn: The loss of one batch, as in `train_loop` (e.g. `replay.ReplayLoss`).

    Returns:
        `(peft_model, losses)`.
    """
    # Seed before PEFT draws the initial lora_A, so each adapter is reproducible.
    torch.manual_seed(config.seed)
    with quiet_peft():
        model = get_peft_model(base, peft_config)
    return model, train_loop(model, make_batch, config, on_step, loss_fn)
