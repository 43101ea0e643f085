"""Score merges on the zoo tasks the way a user would run them, with 95% intervals and a cache.

Every merge goes through the user's path: `export_adapter` (a PEFT folder) →
`PeftModel.from_pretrained` on a copy of the base → greedy decoding of the fixed held-out prompts.
A dynamic merge (zero-shot routing, `lego_viz.models.arrow`), which no PEFT folder can hold, runs
through its own forward hooks on the base instead (removed after the decoding).
The base is loaded once and copied per merge (the copy costs ~40 ms; decoding 200 prompts per task
costs ~1 s per task on one CPU thread), so scores are cached by content: the same merged tensors on
the same base are decoded once per task and n, whichever experiment asks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lego_viz.merge import MergedAdapter

if TYPE_CHECKING:
    from lego_viz.models.arrow import ArrowRouting
from lego_viz.zoo.evaluate import task_hits
from lego_viz.zoo.tasks import N_HELD_OUT, TASKS

Z95 = 1.959963984540054  # the standard normal quantile of 0.975
_CACHE_ENTRIES = 4096  # one entry is a few hundred bools

# Scores by (base, merge, task, n), shared by every Scorer of the process (the app's users included:
# a key is a content hash, so a hit is the same computation, never another user's data).
_CACHE: OrderedDict[tuple, TaskScore] = OrderedDict()
_LOCK = threading.Lock()

Borrow = Callable[[], contextlib.AbstractContextManager[tuple[torch.nn.Module, object]]]


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct / n` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%, which
    is where merged accuracies often sit.

    Args:
        correct: successes, 0 ≤ correct ≤ n.
        n: trials, ≥ 1.
        z: the normal quantile of the coverage.

    Returns:
        `(low, high)` in [0, 1].
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 ≤ correct ≤ n and n ≥ 1, got correct={correct}, n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Tally:
    """Exact-match counts with their accuracy and 95% Wilson interval."""

    correct: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def as_dict(self) -> dict:
        low, high = self.interval
        return {"correct": self.correct, "n": self.n, "accuracy": self.accuracy, "low": low, "high": high}


@dataclass(frozen=True)
class TaskScore:
    """Per-prompt exact match of one model on the first `n` held-out prompts of one task."""

    task: str
    hits: tuple[bool, ...]

    @property
    def tally(self) -> Tally:
        return Tally(sum(self.hits), len(self.hits))


def pooled(scores: Iterable[TaskScore]) -> Tally:
    """All prompts of several tasks counted together: with equal n per task, the mean accuracy over tasks."""
    tallies = [s.tally for s in scores]
    if not tallies:
        raise ValueError("no task scores to pool")
    return Tally(sum(t.correct for t in tallies), sum(t.n for t in tallies))


def _fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], *extra: object) -> str:
    digest = hashlib.sha1(repr(extra).encode())
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def merge_fingerprint(merged: MergedAdapter | ArrowRouting | None) -> str:
    """A content hash of what an export of `merged` holds (None: no adapter, the base alone)."""
    if merged is None:
        return "base"
    if not isinstance(merged, MergedAdapter):
        return "routed:" + merged.fingerprint()
    pieces = []
    for name in sorted(merged.modules):
        lora = merged.modules[name]
        pieces += [(f"{name}.A", lora.A), (f"{name}.B", lora.B)]
    flags = sorted((name, lora.scale, lora.fan_in_fan_out) for name, lora in merged.modules.items())
    return _fingerprint(pieces, flags, merged.template_config.get("task_type"))


class Scorer:
    """Scores merged adapters on zoo tasks with one base model; results are cached across instances.

    Args:
        borrow: a context manager factory lending `(base model, tokenizer)` for one evaluation (the
            app's model pool, or `Scorer.from_model` for a script); the base itself is never modified.
        n: held-out prompts per task, 1 ≤ n ≤ 500.
    """

    def __init__(self, borrow: Borrow, n: int) -> None:
        if not 1 <= int(n) <= N_HELD_OUT:
            raise ValueError(f"n must be in [1, {N_HELD_OUT}] held-out prompts per task, got {n}")
        self.borrow = borrow
        self.n = int(n)
        self.decoded = 0  # tasks decoded by this scorer (cache misses), for progress and tests

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, n: int) -> Scorer:
        """A scorer on a base model the caller owns (scripts, tests)."""

        @contextlib.contextmanager
        def lend() -> Iterator[tuple[torch.nn.Module, object]]:
            yield model, tokenizer

        return cls(lend, n)

    def score(self, merged: MergedAdapter | ArrowRouting | None, tasks: Sequence[str]) -> dict[str, TaskScore]:
        """Exact match per task of the base plus `merged` (None: the base alone), through a PEFT export.

        Args:
            merged: a merge of adapters for the zoo base (or of one adapter: `merge([a], "linear")`), or a
                dynamic merge (`arrow_routing(...)`), applied with its hooks.
            tasks: zoo task names.

        Returns:
            `{task: TaskScore}` in the order of `tasks`.
        """
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown zoo task(s) {unknown}; known: {', '.join(TASKS)}")
        key = merge_fingerprint(merged)
        with self.borrow() as (model, tokenizer):
            base_key = _base_fingerprint(model)
            found = {t: _lookup((base_key, key, t, self.n)) for t in tasks}
            missing = [t for t, score in found.items() if score is None]
            if missing:
                with _adapted(model, merged) as adapted:
                    for task in missing:
                        found[task] = TaskScore(task, tuple(task_hits(adapted, tokenizer, task, self.n)))
                        _store((base_key, key, task, self.n), found[task])
                        self.decoded += 1
        return {t: found[t] for t in tasks}


def _lookup(key: tuple) -> TaskScore | None:
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    return None


def _store(key: tuple, value: TaskScore) -> None:
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_ENTRIES:
            _CACHE.popitem(last=False)


def _base_fingerprint(model: torch.nn.Module) -> str:
    # Hashed on every call (~10 ms for the zoo base): cheaper to trust than an identity cache.
    return _fingerprint(sorted(model.state_dict().items()))


@contextlib.contextmanager
def _adapted(model: torch.nn.Module, merged: MergedAdapter | ArrowRouting | None) -> Iterator[torch.nn.Module]:
    """A copy of `model` with `merged` exported and loaded by PEFT, in eval mode (the model itself when None,
    routed by its hooks for a dynamic merge)."""
    if not isinstance(merged, MergedAdapter):
        was_training = model.training
        routed = contextlib.nullcontext() if merged is None else merged.applied(model)
        try:
            with routed:
                yield model.eval()
        finally:
            model.train(was_training)
        return
    from peft import PeftModel

    from lego_viz.export.folder import export_adapter
    from lego_viz.zoo.model import quiet_peft

    with tempfile.TemporaryDirectory(prefix="lego_lab_") as scratch:
        folder = export_adapter(merged, Path(scratch) / "merged")
        with quiet_peft():
            adapted = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    try:
        yield adapted
    finally:
        del adapted
