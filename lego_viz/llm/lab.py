"""The merge question on a real LLM: does a merge of two skill LoRAs keep both skills?

For a pair (or a larger set) of compatible skills, every merge method runs at equal rank k (the rank of
one source, 8) and the merged model answers the held-out prompts greedily; a prompt counts when the
answer satisfies *every* merged skill's rule. Rows, each with a 95% Wilson interval:

* `exact sum` (`linear`, rank Σ r: the reference every rank-k method approximates);
* `lego` (default options) and `lego rescale=lsq`, `svd`, `core_space`, `knots` at rank k;
* PEFT's `ties` and `peft_linear` (rank fixed by the inputs: r);
* `arrow units`: zero-shot routing, per token the top-k pooled units (an update of rank k);
* `random control`: the exact sum of random adapters with the same per-unit norms
  (:func:`lego_viz.adapters.control.random_like`), so the size of the update alone is controlled for.

Merges are applied to the base with forward hooks (:func:`lego_viz.checks.invariance.lora_hooks`), so
the base is never modified and no adapter folder is written.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from lego_viz.adapters import LoraAdapter
from lego_viz.adapters.control import random_like
from lego_viz.checks.invariance import lora_hooks
from lego_viz.llm.generate import greedy
from lego_viz.llm.skills import SKILLS
from lego_viz.merge import MERGE_METHODS, merge
from lego_viz.models.arrow import arrow_routing

__all__ = ["LAB_ROWS", "LabRow", "both_rules", "lab_rows", "score_set", "wilson"]

# (label, registry method, options); "arrow" and "control" are handled apart.
LAB_ROWS: tuple[tuple[str, str, dict], ...] = (
    ("exact sum", "linear", {}),
    ("lego", "lego", {}),
    ("lego rescale=lsq", "lego", {"rescale": "lsq"}),
    ("svd", "svd", {}),
    ("core_space", "core_space", {}),
    ("knots", "knots", {}),
    ("ties", "ties", {}),
    ("peft_linear", "peft_linear", {}),
    ("arrow units", "arrow", {}),
    ("random control", "control", {}),
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def both_rules(outputs: Sequence[str], skills: Sequence[str]) -> int:
    """How many outputs satisfy every rule of ``skills``."""
    return sum(all(SKILLS[s].rule(o) for s in skills) for o in outputs)


@dataclass
class LabRow:
    label: str
    skills: list[str]
    k: int | None
    held: int
    n: int
    seconds: float
    per_rule: dict[str, int] = field(default_factory=dict)
    refused: str = ""

    def as_dict(self) -> dict:
        low, high = wilson(self.held, self.n)
        return dict(label=self.label, skills=self.skills, k=self.k, rate=round(self.held / max(1, self.n), 4),
                    ci=[low, high], held=self.held, n=self.n, per_rule=self.per_rule,
                    seconds=round(self.seconds, 1), refused=self.refused)


def _applied(label: str, method: str, options: dict, adapters: Sequence[LoraAdapter], k: int,
             seed: int) -> Callable[[object], contextlib.AbstractContextManager]:
    """A factory: model → context in which the model runs as this row's merge."""
    if method == "arrow":
        routing = arrow_routing(adapters, top_k=k, granularity="unit")
        return routing.applied
    if method == "control":
        merged = merge([random_like(a, seed) for a in adapters], "linear", name=label)
    else:
        takes_k = MERGE_METHODS[method].takes_k
        merged = merge(adapters, method, k=k if takes_k else None, name=label, **options)
    return lambda model: lora_hooks(model, merged.modules)


def score_set(model, tokenizer, adapters: Sequence[LoraAdapter], prompts: Sequence[str], *, k: int = 8,
              rows: Sequence[tuple[str, str, dict]] = LAB_ROWS, max_new_tokens: int = 40, seed: int = 0,
              on_step: Callable[[str, list[str]], None] | None = None) -> Iterator[LabRow]:
    """Run every row on one set of skills (adapters named after their skills); yields a row as each ends."""
    skills = [a.name for a in adapters]
    for label, method, options in rows:
        started = time.perf_counter()
        try:
            applied = _applied(label, method, options, adapters, k, seed)
        except ValueError as exc:  # MergeError / RoutingError: the method refuses these inputs
            yield LabRow(label, skills, k, 0, 0, 0.0, refused=str(exc))
            continue
        with applied(model):
            outs = greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
        row = LabRow(label, skills, None if method in ("linear", "control") else k, both_rules(outs, skills),
                     len(prompts), time.perf_counter() - started, {s: both_rules(outs, [s]) for s in skills})
        if on_step:
            on_step(label, outs)
        yield row


def lab_rows(pair_rows: Sequence[LabRow]) -> list[dict]:
    return [r.as_dict() for r in pair_rows]
