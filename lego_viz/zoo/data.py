"""Training batches for the zoo: token tensors with the loss restricted to the answer."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from lego_viz.zoo.tasks import Task, training_example

IGNORE_INDEX = -100  # what transformers' causal-LM loss skips


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Encode `(prompt, answer)` pairs as `<s> prompt answer </s>`, right-padded.

    Args:
        pairs: Prompt/answer strings.
        tokenizer: The zoo tokenizer (one token per character).

    Returns:
        `input_ids`, `attention_mask` and `labels`, each `(n, longest)`; `labels` is
        `IGNORE_INDEX` everywhere except on the answer and the closing `</s>`, so a model
        learns to answer, not to predict random inputs.
    """
    if not pairs:
        raise ValueError("encode_pairs needs at least one (prompt, answer) pair")
    rows, answer_starts = [], []
    for prompt, answer in pairs:
        prompt_ids = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(list(prompt))]
        answer_ids = [*tokenizer.convert_tokens_to_ids(list(answer)), tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        answer_starts.append(len(prompt_ids))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, answer_starts)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def task_batch(
    task: Task,
    n: int,
    rng: random.Random,
    tokenizer: PreTrainedTokenizerBase,
    shard: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """A training batch of `n` examples of one task (never from its held-out set).

    Args:
        task: A zoo task.
        n: Batch size.
        rng: Source of randomness (seed it for reproducible training).
        tokenizer: The zoo tokenizer.
        shard: `(index, count)`: only prompts of that data shard (see `tasks.in_shard`).

    Returns:
        The tensors of `encode_pairs`.
    """
    return encode_pairs([training_example(task, rng, shard) for _ in range(n)], tokenizer)


def mixture_batch(
    tasks: Sequence[Task], n: int, rng: random.Random, tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """A training batch of `n` examples, each from a task drawn uniformly from `tasks`.

    Use it to pre-train on `PRETRAIN_TASKS` or to train one adapter on several zoo tasks.

    Args:
        tasks: The tasks to mix.
        n: Batch size.
        rng: Source of randomness.
        tokenizer: The zoo tokenizer.

    Returns:
        The tensors of `encode_pairs`.
    """
    if not tasks:
        raise ValueError("mixture_batch needs at least one task")
    return encode_pairs([training_example(rng.choice(tasks), rng) for _ in range(n)], tokenizer)
