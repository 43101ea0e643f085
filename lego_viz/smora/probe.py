"""Run a SMoRA model on texts and summarise its routing as plain tensors (what the app plots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lego_viz.smora.inject import smora_layers
from lego_viz.smora.stats import RoutingRecorder, selection_counts


@dataclass
class TokenRouting:
    """Gates of one text, per recorded module.

    Attributes:
        tokens: The text's tokens as strings (special tokens included).
        gates: Per module, `(n_tokens, r)`; 0 where a rank is inactive.
    """

    tokens: list[str]
    gates: dict[str, torch.Tensor]


@dataclass
class TaskRouting:
    """How often each rank is selected, per task, over real (unpadded) tokens.

    Attributes:
        tasks: Task names, the rows.
        counts: Per module, `(n_tasks, r)` selection counts.
        tokens: Real tokens per task, `(n_tasks,)`.
    """

    tasks: list[str]
    counts: dict[str, torch.Tensor]
    tokens: torch.Tensor

    def frequency(self, module: str) -> torch.Tensor:
        """Fraction of each task's tokens that selected each rank, `(n_tasks, r)`."""
        return self.counts[module] / self.tokens[:, None]

    def load(self, module: str) -> torch.Tensor:
        """Total selection counts per rank over all tasks (the load `c`), `(r,)`."""
        return self.counts[module].sum(0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _modules(model: nn.Module, modules: Sequence[str] | None, layers: Mapping[str, nn.Module] | None) -> list[str]:
    if modules is not None:
        return list(modules)
    return list(smora_layers(model) if layers is None else layers)


@torch.no_grad()
def token_routing(
    model: nn.Module, tokenizer, text: str, modules: Sequence[str] | None = None, layers: Mapping[str, nn.Module] | None = None
) -> TokenRouting:
    """Gates of every token of `text` in the given SMoRA layers (default all).

    Args:
        model: A model with SMoRA layers (or with zero-shot routing applied: pass its `layers`).
        tokenizer: Its tokenizer (special tokens are added as for training).
        text: One text, e.g. a prompt followed by the model's answer.
        modules: SMoRA layer names to record.
        layers: Routed layers that are not SMoRA layers of `model` (`ArrowRouting.layers`).

    Returns:
        The tokens and their gates.
    """
    encoded = tokenizer([text], return_tensors="pt").to(_device(model))
    with RoutingRecorder(model, _modules(model, modules, layers), layers) as recorder:
        model(input_ids=encoded["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    return TokenRouting(tokens=tokens, gates={name: g[0][0] for name, g in recorder.gates.items()})


@torch.no_grad()
def task_routing(
    model: nn.Module,
    tokenizer,
    texts_by_task: Mapping[str, Sequence[str]],
    modules: Sequence[str] | None = None,
    layers: Mapping[str, nn.Module] | None = None,
) -> TaskRouting:
    """Selection counts of each rank over the texts of each task.

    Args:
        model: A model with SMoRA layers (or with zero-shot routing applied: pass its `layers`).
        tokenizer: Its tokenizer; texts of one task run as one padded batch.
        texts_by_task: Texts per task (e.g. held-out prompts with their answers).
        modules: SMoRA layer names to record (default all).
        layers: Routed layers that are not SMoRA layers of `model` (`ArrowRouting.layers`).

    Returns:
        Counts per module and task, and the number of real tokens per task.
    """
    names = _modules(model, modules, layers)
    counts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    n_tokens = []
    for texts in texts_by_task.values():
        if not texts:
            raise ValueError("every task needs at least one text")
        encoded = tokenizer(list(texts), padding=True, return_tensors="pt").to(_device(model))
        mask = encoded["attention_mask"]
        # positions count real tokens only, so a left-padded text routes as it would alone
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with RoutingRecorder(model, names, layers) as recorder:
            model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions)
        real = mask.bool().cpu()
        for name in names:
            counts[name].append(selection_counts(recorder.gates[name][0][real]))
        n_tokens.append(real.sum())
    return TaskRouting(
        tasks=list(texts_by_task),
        counts={name: torch.stack(rows) for name, rows in counts.items()},
        tokens=torch.stack(n_tokens).float(),
    )
