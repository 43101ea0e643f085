"""How the zoo adapters behave under merging, measured against the targets of ARCHITECTURE §9.

Every number comes from greedy exact match on held-out prompts, with the adapters applied to the
base through forward hooks on their factors (`invariance.lora_hooks`): several hooked adapters add
up, which is exactly the `linear` merge (the exact sum Σ w_t ΔW_t), without a d_out × d_in matrix.
Retention = accuracy on a task in the merge / accuracy of that task's adapter alone.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.checks.invariance import lora_hooks
from lego_viz.zoo.evaluate import evaluate
from lego_viz.zoo.tasks import PRETRAIN_TASKS

# The targets of the zoo regime (ARCHITECTURE §9, issue 13); the six-way one is the stretch goal.
TARGETS = {
    "own_task_min": 0.95,
    "base_skills_kept_min": 0.95,
    "relative_update_norm_median_max": 0.1,
    "half_weight_retention_min": 0.9,
    "pairwise_linear_retention_mean_min": 0.85,
    "all_linear_retention_min": 0.5,
}
# Merges of two adapters of one task (a family), each with default options and weights 1 as in the
# app, plus the average of the two updates (linear at weights 0.5).
FAMILY_MERGES = (
    ("linear", "linear", None),
    ("linear, weights 0.5", "linear", (0.5, 0.5)),
    ("peft_linear", "peft_linear", None),
    ("ties", "ties", None),
    ("dare_linear", "dare_linear", None),
    ("svd k=r", "svd", None),
    ("lego k=r", "lego", None),
)


def scaled(modules: Mapping[str, LoraModule], weight: float) -> dict[str, LoraModule]:
    """The LoRA modules of an adapter at merge weight `weight` (its update times `weight`)."""
    return {name: replace(module, scale=module.scale * weight) for name, module in modules.items()}


def relative_update_norms(adapter: LoraAdapter, base: torch.nn.Module) -> list[float]:
    """‖ΔW‖_F / ‖W0‖_F of every module of `adapter` on `base`, from the factors.

    ‖s·B A‖_F² = s²·trace((BᵀB)(A Aᵀ)), two r × r products: no d_out × d_in matrix.
    """
    weights = dict(base.named_modules())
    norms = []
    for name, module in adapter.modules.items():
        gram = (module.B.T @ module.B) @ (module.A @ module.A.T)  # (r, r)
        delta = abs(module.scale) * gram.trace().clamp_min(0).sqrt()
        norms.append(float(delta / weights[name].weight.detach().float().norm()))
    return norms


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else 0.0


class _Scorer:
    """Accuracy of the base with some adapters hooked on, one evaluation per call."""

    def __init__(self, base: torch.nn.Module, tokenizer, n: int, tick: Callable[[str], None]) -> None:
        self.base, self.tokenizer, self.n, self.tick = base, tokenizer, n, tick

    def __call__(self, tasks: Sequence[str], *module_sets: Mapping[str, LoraModule]) -> dict[str, float]:
        with lora_hooks(self.base, *module_sets):
            scores = evaluate(self.base, self.tokenizer, list(tasks), n=self.n)
        self.tick("measure")
        return scores


def _subsets(names: Sequence[str], per_count: int, seed: int) -> dict[int, list[tuple[str, ...]]]:
    """Every pair, every full set, and `per_count` seeded subsets of each size in between."""
    rng = random.Random(seed)
    out = {}
    for size in range(2, len(names) + 1):
        combos = list(itertools.combinations(names, size))
        out[size] = combos if size == 2 or len(combos) <= per_count else sorted(rng.sample(combos, per_count))
    return out


def measure_targets(
    base: torch.nn.Module,
    tokenizer,
    adapters: Mapping[str, LoraAdapter],
    n: int,
    subsets_per_count: int = 4,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Measure the zoo targets for task adapters named by their task.

    Args:
        base: The zoo base model (left unchanged).
        tokenizer: The zoo tokenizer.
        adapters: `{task: adapter}`, one adapter per zoo task.
        n: Held-out prompts per task.
        subsets_per_count: Seeded subsets measured for each merge size strictly between 2 and all.
        seed: Seed of those subsets.
        on_step: Called after every evaluation (progress).

    Returns:
        JSON-able: per-adapter accuracies and ratios, pairwise and by-count exact-sum retention,
        the targets and whether each is met.
    """
    score = _Scorer(base, tokenizer, n, on_step or (lambda label: None))
    names = list(adapters)
    modules = {name: adapters[name].modules for name in names}
    pretrain = list(PRETRAIN_TASKS)

    base_skills = score(pretrain)
    own = {name: score([name], modules[name])[name] for name in names}
    kept, half = {}, {}
    for name in names:
        with_adapter = score(pretrain, modules[name])
        kept[name] = statistics.mean(_ratio(with_adapter[t], base_skills[t]) for t in pretrain)
        half[name] = _ratio(score([name], scaled(modules[name], 0.5))[name], own[name])
    norms = {name: relative_update_norms(adapters[name], base) for name in names}

    by_count = {}
    for size, subsets in _subsets(names, subsets_per_count, seed).items():
        rows = []
        for subset in subsets:
            accuracy = score(subset, *(modules[name] for name in subset))
            retention = {name: _ratio(accuracy[name], own[name]) for name in subset}
            rows.append({"adapters": list(subset), "accuracy": accuracy, "retention": statistics.mean(retention.values())})
        values = [row["retention"] for row in rows]
        by_count[str(size)] = {"mean": statistics.mean(values), "min": min(values), "subsets": rows}

    pair_values = [row["retention"] for row in by_count["2"]["subsets"]]
    every_norm = [value for values in norms.values() for value in values]
    summary = {
        "own_task_min": min(own.values()),
        "base_skills_kept_min": min(kept.values()),
        "relative_update_norm_median_max": statistics.median(every_norm),
        "half_weight_retention_min": min(half.values()),
        "pairwise_linear_retention_mean_min": statistics.mean(pair_values),
        "all_linear_retention_min": by_count[str(len(names))]["mean"],
    }
    met = {
        key: (value <= TARGETS[key]) if key.endswith("_max") else (value >= TARGETS[key]) for key, value in summary.items()
    }
    return {
        "n_per_task": n,
        "targets": TARGETS,
        "measured": summary,
        "met": met,
        "own_task": own,
        "base_on_pretrain_tasks": base_skills,
        "base_skills_kept": kept,
        "half_weight_retention": half,
        "relative_update_norm": {
            "median": statistics.median(every_norm),
            "max": max(every_norm),
            "median_per_adapter": {name: statistics.median(values) for name, values in norms.items()},
        },
        "linear_retention_by_count": by_count,
    }


def measure_family(
    base: torch.nn.Module,
    tokenizer,
    task: str,
    members: Sequence[LoraAdapter],
    n: int,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Accuracy on `task` of each member of a family and of their merges (`FAMILY_MERGES`).

    Args:
        base: The zoo base model.
        tokenizer: The zoo tokenizer.
        task: The task every member was trained on.
        members: Adapters of that task (another seed and data shard each).
        n: Held-out prompts.
        on_step: Called after every evaluation.

    Returns:
        `{"adapters", "own": {adapter: accuracy}, "merges": {label: {"accuracy", "retention"}}}`,
        retention against the mean accuracy of the members.
    """
    from lego_viz.merge import merge

    score = _Scorer(base, tokenizer, n, on_step or (lambda label: None))
    own = {adapter.name: score([task], adapter.modules)[task] for adapter in members}
    reference = statistics.mean(own.values())
    merges = {}
    for label, method, weights in FAMILY_MERGES:
        merged = merge(list(members), method=method, weights=weights, name=label)
        accuracy = score([task], merged.modules)[task]
        merges[label] = {"method": method, "accuracy": accuracy, "retention": _ratio(accuracy, reference)}
    return {"task": task, "adapters": [adapter.name for adapter in members], "own": own, "merges": merges}
