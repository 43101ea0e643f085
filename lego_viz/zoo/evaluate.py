"""Batched greedy decoding and exact-match accuracy on the fixed held-out sets."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lego_viz.zoo.tasks import TASKS, get_task, held_out

DEFAULT_EVAL_N = 200


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 256
) -> list[str]:
    """Greedy-decode a completion for each prompt (left-padded batches, stops at `</s>`).

    Args:
        model: A causal LM (plain or `PeftModel`) for the zoo tokenizer.
        tokenizer: The zoo tokenizer (left padding, adds `<s>`).
        prompts: Prompts such as `"reverse: abc="`.
        max_new_tokens: Longest completion.
        batch_size: Prompts per forward batch.

    Returns:
        The completions (special tokens removed), in prompt order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        encoded = tokenizer(chunk, padding=True, return_tensors="pt").to(device)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


def _as_model(model_or_merged, tokenizer):
    """A model and tokenizer from a model, a PEFT folder or an in-memory merge of zoo adapters."""
    from lego_viz.zoo.model import ZOO_DIR, load_adapted

    if isinstance(model_or_merged, str | Path):
        model, loaded = load_adapted(model_or_merged)
        return model, tokenizer or loaded
    if hasattr(model_or_merged, "method") and hasattr(model_or_merged, "modules") and not callable(model_or_merged):
        # A MergedAdapter: go through the user's path, export then PeftModel.from_pretrained.
        from lego_viz.export.folder import export_adapter

        with tempfile.TemporaryDirectory(prefix="zoo_eval_") as scratch:
            model, loaded = load_adapted(export_adapter(model_or_merged, Path(scratch) / "merged"))
        return model, tokenizer or loaded
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "base")
    return model_or_merged, tokenizer


def evaluate(
    model, tokenizer=None, tasks: Iterable[str] | None = None, n: int = DEFAULT_EVAL_N
) -> dict[str, float]:
    """Exact-match accuracy per task with greedy decoding on the first `n` held-out prompts.

    Args:
        model: A causal LM for the zoo tokenizer (the base, a `PeftModel`, ...), a PEFT adapter
            folder for the shipped base, or a `MergedAdapter` of zoo adapters (exported and loaded
            with `PeftModel.from_pretrained`, as a user would).
        tokenizer: The zoo tokenizer; loaded from the shipped base when omitted.
        tasks: Task names; all of `TASKS` when omitted.
        n: Held-out prompts per task (the same prompts for every model).

    Returns:
        `{task: accuracy in [0, 1]}` in the order of `tasks`.
    """
    model, tokenizer = _as_model(model, tokenizer)
    names = list(TASKS) if tasks is None else list(tasks)
    scores: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for name in names:
        hits = task_hits(model, tokenizer, name, n)
        scores[name] = sum(hits) / len(hits)
    model.train(was_training)
    return scores


def task_hits(model, tokenizer, task: str, n: int = DEFAULT_EVAL_N) -> list[bool]:
    """Whether the greedy completion of each of the first `n` held-out prompts of `task` is exactly right.

    Args:
        model: A causal LM for the zoo tokenizer, in eval mode.
        tokenizer: The zoo tokenizer.
        task: A task name.
        n: Held-out prompts (the same prompts for every model).

    Returns:
        One bool per prompt, in held-out order.
    """
    pairs = held_out(get_task(task).name, n)
    longest = max(len(answer) for _, answer in pairs)
    predictions = generate(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens=longest + 1)
    return [p == answer for p, (_, answer) in zip(predictions, pairs)]


def with_mean(scores: dict[str, float]) -> dict[str, float]:
    """`scores` plus a `"mean"` entry (the unweighted mean over tasks)."""
    if not scores:
        raise ValueError("no scores to average")
    return {**scores, "mean": sum(scores.values()) / len(scores)}
