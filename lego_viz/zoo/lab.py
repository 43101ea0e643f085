"""The merge lab on the demo zoo: which method keeps the tasks, at which rank, and against what control.

Three experiments, each scored through the user's path by `lego_viz.zoo.harness.Scorer`:

* `accuracy_table` — every registry method at equal rank k ∈ {mean source rank, 2× it} (methods
  whose rank is fixed by the inputs once), zero-shot Arrow-style routing over the pooled units
  (`ROUTED`: k units per token, or the top adapters per token), the exact sum (`linear`), the base
  and each adapter alone; exact match per task with 95% Wilson intervals, retention (merged
  accuracy / the adapter's own), and the margin over the same merge of random controls
  (`lego_viz.adapters.control`).
* `retention_curve` — mean retention against the number of adapters merged (2 … T), over a few
  seeded subsets per size, per method.
* `k_sweep` — mean accuracy and the relative ΔW error against k for every method that takes k.

Methods are read from the registry, so methods added to `lego_viz.merge` appear without changes
here; a method that refuses the inputs (e.g. equal-rank-only on mixed ranks) is reported with its reason.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lego_viz.adapters import LoraAdapter, module_order, sha256_file
from lego_viz.adapters.control import random_like
from lego_viz.merge import MERGE_METHODS, PRESETS, MergedAdapter, MergeError, merge
from lego_viz.models.arrow import ArrowConfig, ArrowRouting, arrow_routing
from lego_viz.zoo.harness import Scorer, Tally, TaskScore, pooled
from lego_viz.zoo.model import ZOO_DIR
from lego_viz.zoo.tasks import TASKS

SHIPPED_JSON, SHIPPED_MD = "merge_lab.json", "merge_lab.md"
EXACT = "linear"
# Option settings worth a row of their own, kept only while the registry accepts them: the paper's
# published lego settings, and the data-free least-squares rescaling (issue 14.3) once it exists.
EXTRA_VARIANTS: Mapping[str, tuple[tuple[str, dict], ...]] = {
    "lego": (("paper preset", {"preset": "paper"}), ("rescale=lsq", {"rescale": "lsq"})),
}
# Zero-shot routing rows (granularity, top-k; None: the table's k units per token, the active rank of a
# static merge at rank k): Arrow over the source adapters as published, and over the pooled units.
ROUTED: tuple[tuple[str, int | None], ...] = (("adapter", 1), ("adapter", 2), ("unit", None))
ROUTED_NOTE = (
    "arrow = zero-shot routing, no training: per token, the top-k pooled units by |ã_i·x|/‖ã_i‖ (gate 1 each; "
    "top-k units is an update of rank k like a static merge at rank k), or the top-k source adapters by |v_t·x| "
    "(v_t the top right singular vector of ΔW_t) weighted by a softmax of those scores (Arrow)"
)
K_GRID = (1, 2, 4, 8, 16, 32, 64)  # doublings: the shape of the curve at a third of the cost of a finer grid
OnStep = Callable[[int, int, str], None]  # (done, total, what is being scored)


def _quiet(done: int, total: int, what: str) -> None:
    """The default progress callback: nothing."""


@dataclass(frozen=True)
class Variant:
    """A registry method with some options: one row of the table, one line of the figures."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()
    tag: str = ""

    @property
    def name(self) -> str:
        return f"{self.method} ({self.tag})" if self.tag else self.method

    @property
    def takes_k(self) -> bool:
        return MERGE_METHODS[self.method].takes_k

    def merge(self, adapters: Sequence[LoraAdapter], k: int | None, weights: Sequence[float] | None = None) -> MergedAdapter:
        return merge(adapters, self.method, k=k if self.takes_k else None, weights=weights, name=self.name, **dict(self.options))

    def label(self, k: int | None) -> str:
        """The table row's label at rank `k`."""
        if k is not None:
            return f"{self.name} k={k}"
        return f"{self.name} (exact)" if self.method == EXACT else self.name


@dataclass(frozen=True)
class RoutedVariant:
    """Zero-shot routing (`lego_viz.models.arrow`) as a row of the table: a dynamic merge, scored through its hooks.

    `top_k=None` takes the table's k (units per token); otherwise the top-k is fixed (e.g. adapters per token).
    """

    granularity: str
    top_k: int | None = None
    method = "arrow"

    @property
    def takes_k(self) -> bool:
        return self.top_k is None

    @property
    def options(self) -> tuple[tuple[str, Any], ...]:
        return (("granularity", self.granularity),) + ((("top_k", self.top_k),) if self.top_k else ())

    def merge(self, adapters: Sequence[LoraAdapter], k: int | None, weights: Sequence[float] | None = None) -> ArrowRouting:
        return arrow_routing(adapters, self.top_k or k, self.granularity, weights)

    def label(self, k: int | None) -> str:
        """`arrow (units, top-8)`, `arrow (adapter, top-1)`."""
        return ArrowConfig(self.granularity, self.top_k or k).label


def _accepts(method: str, options: Mapping[str, Any]) -> bool:
    spec = MERGE_METHODS[method]
    for key, value in options.items():
        if key == "preset":
            if method != "lego" or value not in PRESETS:
                return False
            continue
        if key not in spec.options:
            return False
        try:
            spec.options[key].validate(key, method, value)
        except MergeError:
            return False
    return True


def variants() -> list[Variant]:
    """Every registry method but the exact sum at its defaults, plus the accepted `EXTRA_VARIANTS`, in registry order."""
    found = []
    for method in MERGE_METHODS:
        if method == EXACT:
            continue
        found.append(Variant(method))
        for tag, options in EXTRA_VARIANTS.get(method, ()):
            if _accepts(method, options):
                found.append(Variant(method, tuple(sorted(options.items())), tag))
    return found


def lab_adapters(adapters: Sequence[LoraAdapter]) -> tuple[list[LoraAdapter], list[str]]:
    """The adapters named after a zoo task (one per task, first wins), and the names left out.

    Retention divides by each task adapter's own accuracy, so the lab merges only adapters whose task it
    knows; anything else (an upload, a second adapter of a task) is left out and named.
    """
    kept, left_out, seen = [], [], set()
    for adapter in adapters:
        if adapter.name in TASKS and adapter.name not in seen:
            kept.append(adapter)
            seen.add(adapter.name)
        else:
            left_out.append(adapter.name)
    if not kept:
        raise ValueError(f"the merge lab needs zoo task adapters ({', '.join(TASKS)}); load the demo zoo first")
    return kept, left_out


def _max_k(adapters: Sequence[LoraAdapter]) -> int:
    return min(sum(a.modules[m].r for a in adapters if m in a.modules) for m in module_order(adapters))


def mean_rank(adapters: Sequence[LoraAdapter]) -> int:
    """The mean source rank r̄ (each adapter's mean rank over its modules), rounded, at least 1."""
    return max(1, round(statistics.fmean(statistics.fmean(a.ranks) for a in adapters)))


def equal_ranks(adapters: Sequence[LoraAdapter]) -> list[int]:
    """The table's ranks: r̄ and 2·r̄, those every module can take (k ≤ its number of units)."""
    r = mean_rank(adapters)
    return [k for k in dict.fromkeys((r, 2 * r)) if k <= _max_k(adapters)]


def sweep_ks(adapters: Sequence[LoraAdapter]) -> list[int]:
    """The k-sweep's grid: `K_GRID` plus the table's ranks, up to the largest k every module takes."""
    top = _max_k(adapters)
    return sorted({k for k in (*K_GRID, *equal_ranks(adapters)) if k <= top})


def own_scores(adapters: Sequence[LoraAdapter], scorer: Scorer) -> dict[str, TaskScore]:
    """Each task adapter alone (weight 1) on its own task: the denominator of retention."""
    return {a.name: scorer.score(merge([a], EXACT, name=a.name), [a.name])[a.name] for a in adapters}


def retention(scores: Mapping[str, TaskScore], own: Mapping[str, TaskScore]) -> float | None:
    """Mean over tasks of merged accuracy / own accuracy (tasks the adapter itself never solves are left out; None if all are)."""
    ratios = [scores[t].tally.accuracy / own[t].tally.accuracy for t in scores if own[t].tally.accuracy > 0]
    return statistics.fmean(ratios) if ratios else None


# ----------------------------------------------------------------------------- the accuracy table


@dataclass
class Row:
    """One model of the accuracy table."""

    label: str
    method: str | None  # None for the base and for the adapters alone
    options: dict
    k: int | None
    rank: str  # the merged rank(s), as shown
    scores: dict[str, TaskScore]
    control: dict[str, TaskScore] | None = None

    @property
    def mean(self) -> Tally:
        return pooled(self.scores.values())

    @property
    def margin(self) -> float | None:
        """Mean accuracy minus that of the same merge of random controls (None without a control)."""
        return None if self.control is None else self.mean.accuracy - pooled(self.control.values()).accuracy


@dataclass
class LabTable:
    """The accuracy table: rows in display order, methods that refused, and each adapter's own score."""

    tasks: list[str]
    n: int
    ks: list[int]
    control_seed: int
    rows: list[Row]
    own: dict[str, TaskScore]
    refused: dict[str, str] = field(default_factory=dict)  # row label → the method's message

    def to_dict(self) -> dict:
        """JSON-able: per row, per task and mean counts with 95% intervals, retention, control and margin."""
        rows = []
        for row in self.rows:
            entry = {
                "label": row.label, "method": row.method, "options": row.options, "k": row.k, "rank": row.rank,
                "tasks": {t: s.tally.as_dict() for t, s in row.scores.items()}, "mean": row.mean.as_dict(),
                "retention": retention(row.scores, self.own) if row.method else None,
            }
            if row.control is not None:
                entry["control"] = {"tasks": {t: s.tally.as_dict() for t, s in row.control.items()}, "mean": pooled(row.control.values()).as_dict()}
                entry["margin"] = row.margin
            rows.append(entry)
        return {"tasks": self.tasks, "n_per_task": self.n, "k": self.ks, "control_seed": self.control_seed, "rows": rows, "refused": self.refused}


def _rank_text(merged: MergedAdapter | ArrowRouting) -> str:
    if isinstance(merged, ArrowRouting):
        return merged.active_rank()
    ranks = sorted(set(merged.ranks.values()))
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def table_plan(adapters: Sequence[LoraAdapter]) -> list[tuple[Variant | RoutedVariant, int | None]]:
    """The merges of the table in display order: exact sum; k-methods at r̄; fixed-rank methods; k-methods at 2·r̄.

    Zero-shot routing (`ROUTED`) follows the static merges: k units per token among the k-methods, the
    fixed top-k adapters among the fixed-rank methods.
    """
    ks = equal_ranks(adapters)
    found = [*variants(), *(RoutedVariant(granularity, top_k) for granularity, top_k in ROUTED)]
    with_k = [v for v in found if v.takes_k]
    plan: list[tuple[Variant | RoutedVariant, int | None]] = [(Variant(EXACT), None)]
    plan += [(v, ks[0]) for v in with_k]
    plan += [(v, None) for v in found if not v.takes_k]
    for k in ks[1:]:
        plan += [(v, k) for v in with_k]
    return plan


def accuracy_table(
    adapters: Sequence[LoraAdapter],
    scorer: Scorer,
    weights: Sequence[float] | None = None,
    control_seed: int = 0,
    on_step: OnStep = _quiet,
) -> LabTable:
    """Score the base, each adapter alone, and every method at equal rank, each beside its random control.

    Args:
        adapters: zoo task adapters (see `lab_adapters`).
        scorer: decodes the held-out prompts (its `n` is the table's n per task).
        weights: one per adapter (default 1), used by every merge and its control.
        control_seed: seed of the random controls (`random_like`).
        on_step: progress callback `(done, total, what)`.

    Returns:
        A `LabTable`; methods that refuse the inputs are in `refused` with their message.
    """
    adapters = list(adapters)
    tasks = [a.name for a in adapters]
    controls = [random_like(a, control_seed) for a in adapters]
    plan = table_plan(adapters)
    total, done = 1 + len(adapters) + 2 * len(plan), 0

    def step(what: str) -> None:
        nonlocal done
        on_step(done, total, what)
        done += 1

    step("base")
    rows = [Row("base", None, {}, None, "0", scorer.score(None, tasks))]
    step("each adapter alone")
    own = own_scores(adapters, scorer)
    done += len(adapters) - 1
    rows.append(Row("each adapter alone", None, {}, None, _rank_text_of(adapters), own))
    refused: dict[str, str] = {}
    for variant, k in plan:
        label = variant.label(k)
        step(label)
        try:
            merged = variant.merge(adapters, k, weights)
        except MergeError as exc:
            refused[label] = str(exc)
            done += 1
            continue
        scores = scorer.score(merged, tasks)
        step(f"{label}, random control")
        control = scorer.score(variant.merge(controls, k, weights), tasks)
        rows.append(Row(label, variant.method, dict(variant.options), k, _rank_text(merged), scores, control))
    on_step(total, total, "done")
    return LabTable(tasks, scorer.n, equal_ranks(adapters), control_seed, rows, own, refused)


def _rank_text_of(adapters: Sequence[LoraAdapter]) -> str:
    ranks = sorted({r for a in adapters for r in a.ranks})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def _percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}"


def _with_interval(tally: Mapping) -> str:
    return f"{100 * tally['accuracy']:.1f} ({100 * tally['low']:.1f}–{100 * tally['high']:.1f})"


TABLE_HEADER_TAIL = ("mean (95% CI)", "retention", "control (95% CI)", "margin")


def table_cells(table: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table (`LabTable.to_dict()`) as text: accuracies in %, intervals in brackets, margin in points."""
    # The summary columns first: in the app the per-task columns may need a scroll.
    header = ["model", "rank", *TABLE_HEADER_TAIL, *table["tasks"]]
    rows = []
    for row in table["rows"]:
        control = row.get("control")
        margin = row.get("margin")
        rows.append([
            row["label"], row["rank"], _with_interval(row["mean"]), _percent(row["retention"]),
            "–" if control is None else _with_interval(control["mean"]), "–" if margin is None else f"{100 * margin:+.1f}",
            *(_percent(row["tasks"][t]["accuracy"]) for t in table["tasks"]),
        ])
    return header, rows


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- retention vs number of adapters


def subsets(names: Sequence[str], sizes: Iterable[int], per_size: int, seed: int = 0) -> dict[int, list[tuple[str, ...]]]:
    """Up to `per_size` distinct subsets of each size (all of them when there are fewer), seeded.

    Args:
        names: adapter names, in their order.
        sizes: subset sizes, each in [1, len(names)].
        per_size: the most subsets drawn per size.
        seed: the same seed gives the same subsets.
    """
    chosen = {}
    for size in sizes:
        if not 1 <= size <= len(names):
            raise ValueError(f"subset size {size} is out of range for {len(names)} adapters")
        combos = list(itertools.combinations(names, size))
        if len(combos) > per_size:
            combos = sorted(random.Random(seed * 1009 + size).sample(combos, per_size), key=combos.index)
        chosen[size] = combos
    return chosen


def retention_curve(
    adapters: Sequence[LoraAdapter],
    scorer: Scorer,
    sizes: Sequence[int] | None = None,
    per_size: int = 3,
    seed: int = 0,
    on_step: OnStep = _quiet,
) -> dict:
    """Mean retention against the number of adapters merged, per method (weights 1).

    Each subset is merged with every method (k = the subset's r̄ for methods that take k) and scored on
    its own tasks; retention is averaged over the subset's tasks, then over the subsets of a size.

    Returns:
        `{"n_per_task", "per_size", "seed", "subsets": {size: [[names]]},
        "methods": {name: {"sizes", "mean", "sd", "runs"}}, "refused": {name: message}}`;
        `sd` is the standard deviation over the subsets of a size (0 for a single subset).
    """
    adapters = list(adapters)
    by_name = {a.name: a for a in adapters}
    sizes = list(sizes or range(2, len(adapters) + 1))
    drawn = subsets(list(by_name), sizes, per_size, seed)
    plan = [Variant(EXACT), *variants()]
    total, done = len(plan) * sum(len(s) for s in drawn.values()) + 1, 0
    on_step(0, total, "each adapter alone")
    own = own_scores(adapters, scorer)
    methods: dict[str, dict] = {}
    refused: dict[str, str] = {}
    for variant in plan:
        series = {"sizes": [], "mean": [], "sd": [], "runs": []}
        for size, groups in drawn.items():
            runs = []
            for group in groups:
                done += 1
                on_step(done, total, f"{variant.name}: {' + '.join(group)}")
                members = [by_name[name] for name in group]
                try:
                    merged = variant.merge(members, mean_rank(members))
                except MergeError as exc:
                    refused.setdefault(variant.name, str(exc))
                    continue
                kept = retention(scorer.score(merged, list(group)), own)
                if kept is not None:
                    runs.append(kept)
            if runs:
                series["sizes"].append(size)
                series["mean"].append(statistics.fmean(runs))
                series["sd"].append(statistics.pstdev(runs) if len(runs) > 1 else 0.0)
                series["runs"].append(runs)
        if series["sizes"]:
            methods[variant.name] = series
    on_step(total, total, "done")
    subsets_json = {str(size): [list(g) for g in groups] for size, groups in drawn.items()}
    return {"n_per_task": scorer.n, "per_size": per_size, "seed": seed, "subsets": subsets_json, "methods": methods, "refused": refused}


def curve_cells(curve: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the retention curve as text: mean ± sd over subsets, in % of each adapter's own accuracy."""
    sizes = sorted({size for series in curve["methods"].values() for size in series["sizes"]})
    header = ["method", *(f"{size} adapters" for size in sizes)]
    rows = []
    for name, series in curve["methods"].items():
        cells = dict(zip(series["sizes"], zip(series["mean"], series["sd"])))
        rows.append([name, *(f"{100 * cells[s][0]:.1f} ± {100 * cells[s][1]:.1f}" if s in cells else "–" for s in sizes)])
    return header, rows


# ----------------------------------------------------------------------------- k-sweep


def k_sweep(
    adapters: Sequence[LoraAdapter],
    scorer: Scorer,
    weights: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    on_step: OnStep = _quiet,
) -> dict:
    """Mean accuracy (with its 95% interval) and relative ΔW error against k, for every method that takes k.

    Returns:
        `{"n_per_task", "ks", "methods": {name: {"k", "accuracy", "low", "high", "error"}}, "refused": {...}}`;
        `error` is the mean over modules of ‖ΔW_merge − Σ w·ΔW‖_F / ‖Σ w·ΔW‖_F.
    """
    from lego_viz.export.folder import reconstruction_errors

    adapters = list(adapters)
    tasks = [a.name for a in adapters]
    ks = list(ks or sweep_ks(adapters))
    plan = [v for v in variants() if v.takes_k]
    total, done = len(plan) * len(ks), 0
    methods: dict[str, dict] = {}
    refused: dict[str, str] = {}
    for variant in plan:
        series = {"k": [], "accuracy": [], "low": [], "high": [], "error": []}
        for k in ks:
            on_step(done, total, f"{variant.name}, k={k}")
            done += 1
            try:
                merged = variant.merge(adapters, k, weights)
            except MergeError as exc:
                refused.setdefault(f"{variant.name} k={k}", str(exc))
                continue
            errors = reconstruction_errors(merged, adapters)
            mean = pooled(scorer.score(merged, tasks).values())
            low, high = mean.interval
            series["k"].append(k)
            series["accuracy"].append(mean.accuracy)
            series["low"].append(low)
            series["high"].append(high)
            series["error"].append(statistics.fmean(errors.values()) if errors else math.nan)
        if series["k"]:
            methods[variant.name] = series
    on_step(total, total, "done")
    return {"n_per_task": scorer.n, "ks": ks, "methods": methods, "refused": refused}


# ----------------------------------------------------------------------------- the shipped measurement


def shipped_results(zoo_dir: Path = ZOO_DIR) -> dict | None:
    """The measurement `scripts/merge_lab_table.py` stored beside the zoo, or None if absent or of other adapters.

    Args:
        zoo_dir: the zoo folder holding `merge_lab.json` and `adapters/`.

    Returns:
        The stored results when every adapter they name still has the same weights file (sha256).
    """
    path = Path(zoo_dir) / SHIPPED_JSON
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    for name, info in results.get("adapters", {}).items():
        weights = Path(zoo_dir) / "adapters" / name / "adapter_model.safetensors"
        if not weights.is_file() or sha256_file(weights) != info.get("sha256"):
            return None
    return results
