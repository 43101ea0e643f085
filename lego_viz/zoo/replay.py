"""Adapter training that adds a skill to the zoo base instead of overwriting it.

Trained on its task alone, a zoo LoRA is free to change everything else the base does, and it does:
with one adapter applied the base forgot most of its own skills, and the exact sum of two adapters
lost both tasks. Real LoRAs on large pretrained models behave differently: their update is small
beside the base weights and leaves other inputs nearly untouched. Three ingredients give the zoo
adapters that behaviour, all recorded in `zoo_card.json`:

* **replay**: every batch also holds prompts the adapter must leave alone, answered as the *base*
  answers them: the base's pre-training tasks and the other zoo tasks' prompts (never their
  solutions: the adapter learns to keep the base's behaviour there, not another skill);
* **consistency**: on those replay rows, a penalty on the relative squared change of every layer's
  hidden states against the base (`‖h − h₀‖² / ‖h₀‖²`), so the adapter's update stays out of the
  directions other inputs use;
* **scale jitter** (optional): the LoRA scale is drawn anew each step, so the skill does not hinge
  on one exact update size;
* **norm penalty** (optional): `mean over modules of ‖ΔW‖²_F / ‖W0‖²_F`, computed on the factors,
  which keeps each update small beside the base weight, as a real adapter's is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lego_viz.zoo.data import encode_pairs
from lego_viz.zoo.evaluate import generate
from lego_viz.zoo.tasks import Task, get_task, training_example
from lego_viz.zoo.train import Batch

# The batch key that says how many of its last rows are replay rows.
REPLAY_ROWS = "replay_rows"
ReplayPool = dict[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class ReplayConfig:
    """How an adapter is kept from overwriting the base (see the module docstring).

    Attributes:
        rows: Replay rows added to every batch (0 trains on the task alone).
        pretrain_tasks: Replay the base's pre-training tasks.
        other_tasks: Replay the other zoo tasks' prompts (with the base's answers to them).
        consistency: Weight of the hidden-state consistency loss on replay rows (0: none).
        scale_jitter: `(low, high)`: each step multiplies the LoRA scale by a factor drawn uniformly
            from this range; None keeps the scale fixed.
        norm_penalty: Weight of the mean relative squared update norm `‖ΔW‖² / ‖W0‖²` (0: none).
        pool_size: Prompts per replay task, answered once by the base before training.
        pool_seed: Seed of the replay prompts.
    """

    rows: int = 32
    pretrain_tasks: bool = True
    other_tasks: bool = True
    consistency: float = 1.0
    scale_jitter: tuple[float, float] | None = None
    norm_penalty: float = 0.0
    pool_size: int = 256
    pool_seed: int = 0

    def __post_init__(self) -> None:
        if self.rows < 0 or self.pool_size < 1 or self.consistency < 0 or self.norm_penalty < 0:
            raise ValueError("rows, consistency and norm_penalty must be >= 0 and pool_size >= 1")
        if self.rows and not (self.pretrain_tasks or self.other_tasks):
            raise ValueError("replay rows need a source: pretrain_tasks, other_tasks or both")
        if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got {self.scale_jitter}")

    def sources(self, task: str, pretrain: Sequence[str], zoo: Sequence[str]) -> list[str]:
        """The tasks whose prompts are replayed while training the adapter of `task`."""
        if not self.rows:
            return []
        names = list(pretrain) if self.pretrain_tasks else []
        return names + ([name for name in zoo if name != task] if self.other_tasks else [])


def replay_pool(
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    size: int,
    seed: int = 0,
) -> ReplayPool:
    """Training prompts of `tasks` answered by the base model (greedy), drawn once.

    Args:
        base: The base model, before any adapter.
        tokenizer: The zoo tokenizer.
        tasks: Names of the tasks to draw prompts from (never their held-out prompts).
        size: Prompts per task (fewer when a task has fewer distinct inputs).
        seed: Seed of the prompts.

    Returns:
        `{task: ((prompt, base answer), ...)}`, in a fixed order.
    """
    rng = random.Random(seed)
    pool: ReplayPool = {}
    for name in tasks:
        task = get_task(name)
        prompts: dict[str, None] = {}
        for _ in range(20 * size):
            prompts.setdefault(training_example(task, rng)[0])
            if len(prompts) == size:
                break
        ordered = list(prompts)
        # Longer than any zoo answer: the base's answer to a task it does not know may ramble.
        answers = generate(base, tokenizer, ordered, max_new_tokens=24)
        pool[name] = tuple(zip(ordered, answers))
    return pool


def replay_batch(
    task: Task,
    n: int,
    rng: random.Random,
    tokenizer: PreTrainedTokenizerBase,
    pool: ReplayPool,
    sources: Sequence[str],
    rows: int,
    shard: tuple[int, int] | None = None,
) -> Batch:
    """`n` examples of `task` followed by `rows` replay rows drawn uniformly over `sources`.

    Args:
        task: The adapter's task.
        n: Task rows.
        rng: Source of randomness.
        tokenizer: The zoo tokenizer.
        pool: Replay prompts with the base's answers (`replay_pool`).
        sources: Tasks of `pool` to replay.
        rows: Replay rows (0 for none).
        shard: Data shard of the task rows (see `tasks.in_shard`).

    Returns:
        The tensors of `encode_pairs` plus `REPLAY_ROWS`, the number of trailing replay rows.
    """
    pairs = [training_example(task, rng, shard) for _ in range(n)]
    if rows and sources:
        pairs += [rng.choice(pool[rng.choice(sources)]) for _ in range(rows)]
    batch = encode_pairs(pairs, tokenizer)
    batch[REPLAY_ROWS] = torch.tensor(len(pairs) - n)
    return batch


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    # PEFT LoRA layers keep their scale per adapter in a `scaling` dict.
    return [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling]


class ReplayLoss:
    """The training loss of a replay batch: cross-entropy on every row plus consistency on replay rows.

    A `loss_fn` for `train.train_loop`: `ReplayLoss(config)(model, batch, rng)` with a PEFT model.
    With scale jitter, call `restore(model)` after training to put the LoRA scales back.
    """

    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self._base_scaling: dict[int, dict[str, float]] = {}

    def _jitter(self, model: torch.nn.Module, rng: random.Random) -> None:
        factor = rng.uniform(*self.config.scale_jitter)
        for layer in _lora_layers(model):
            base = self._base_scaling.setdefault(id(layer), dict(layer.scaling))
            for name, scale in base.items():
                layer.scaling[name] = scale * factor

    def _relative_norm(self, model: torch.nn.Module) -> torch.Tensor:
        """Mean over LoRA layers of ‖s·B A‖²_F / ‖W0‖²_F at the nominal scale, from r × r Gram products."""
        terms = []
        for layer in _lora_layers(model):
            for name, scale in self._base_scaling.get(id(layer), layer.scaling).items():
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, d_in), (d_out, r)
                squared = scale**2 * ((B.T @ B) * (A @ A.T)).sum()  # trace of the product of two symmetric matrices
                terms.append(squared / layer.base_layer.weight.detach().pow(2).sum())
        return torch.stack(terms).mean()

    def restore(self, model: torch.nn.Module) -> None:
        """Put back the LoRA scales that scale jitter changed."""
        for layer in _lora_layers(model):
            layer.scaling.update(self._base_scaling.get(id(layer), {}))

    def __call__(self, model: torch.nn.Module, batch: Batch, rng: random.Random) -> torch.Tensor:
        if self.config.scale_jitter is not None:
            self._jitter(model, rng)
        device = next(model.parameters()).device
        input_ids, replay = batch["input_ids"].to(device), int(batch.get(REPLAY_ROWS, 0))
        wants_consistency = replay > 0 and self.config.consistency > 0
        output = model(input_ids=input_ids, labels=batch["labels"].to(device), output_hidden_states=wants_consistency)
        loss = output.loss
        if self.config.norm_penalty > 0:
            loss = loss + self.config.norm_penalty * self._relative_norm(model)
        if not wants_consistency:
            return loss
        rows = slice(len(input_ids) - replay, None)
        with torch.no_grad(), model.disable_adapter():
            reference = model(input_ids=input_ids[rows], output_hidden_states=True).hidden_states
        mask = batch["attention_mask"][rows].to(device).unsqueeze(-1).float()  # (replay, seq, 1)
        # hidden_states[0] is the embedding output, which a LoRA on the projections cannot change.
        drift = [
            ((adapted[rows] - base) ** 2 * mask).sum() / ((base**2) * mask).sum()
            for adapted, base in zip(output.hidden_states[1:], reference[1:])
        ]
        return loss + self.config.consistency * torch.stack(drift).mean()
