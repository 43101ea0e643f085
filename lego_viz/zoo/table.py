"""The zoo merge-quality table: base, each task adapter, and merges of all adapters, on every task.

Each merge goes through the same path a user takes: `merge` → `export_adapter` (a PEFT folder)
→ `PeftModel.from_pretrained` → greedy decoding.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from lego_viz.zoo.evaluate import evaluate, with_mean
from lego_viz.zoo.model import ZOO_DIR, adapter_dirs, load_adapted, load_base
from lego_viz.zoo.tasks import TASKS

# (row label, merge method, k); lego and svd at k = 8 with default options, linear is exact (rank Σ r).
MERGE_ROWS = (("linear", "linear", None), ("svd k=8", "svd", 8), ("lego k=8", "lego", 8))


def merge_table(
    zoo_dir: Path = ZOO_DIR,
    n: int = 200,
    device: str | None = None,
    on_row: Callable[[str], None] | None = None,
) -> dict:
    """Accuracy per task of the base, each adapter alone, and the merges of all adapters.

    Args:
        zoo_dir: A built zoo.
        n: Held-out prompts per task.
        device: Where models run; `default_device()` when omitted.
        on_row: Called with each row label once that row is done (progress).

    Returns:
        `{"n_per_task", "tasks", "rows": {label: {task: accuracy, ..., "mean"}}, "merges": {...}}`,
        the merge entries holding method, options, ranks and timing.
    """
    from lego_viz.adapters import load_adapter
    from lego_viz.export.folder import export_adapter
    from lego_viz.merge import merge

    dirs = adapter_dirs(zoo_dir)
    if list(dirs) != list(TASKS):
        raise FileNotFoundError(f"{zoo_dir} has adapters for {list(dirs)}, not all of {list(TASKS)}; build the zoo first")
    done = on_row or (lambda label: None)
    rows: dict[str, dict[str, float]] = {}

    base, tokenizer = load_base(device=device, zoo_dir=zoo_dir)
    rows["base"] = with_mean(evaluate(base, tokenizer, n=n))
    done("base")
    for name, path in dirs.items():
        model, _ = load_adapted(path, device=device, zoo_dir=zoo_dir)
        rows[name] = with_mean(evaluate(model, tokenizer, n=n))
        done(name)

    adapters = [load_adapter(path, name=name) for name, path in dirs.items()]
    merges = {}
    with tempfile.TemporaryDirectory(prefix="zoo_merges_") as scratch:
        for label, method, k in MERGE_ROWS:
            merged = merge(adapters, method=method, k=k, name=label)
            folder = export_adapter(merged, Path(scratch) / method)
            model, _ = load_adapted(folder, device=device, zoo_dir=zoo_dir)
            rows[label] = with_mean(evaluate(model, tokenizer, n=n))
            merges[label] = {
                "method": method,
                "options": merged.options,
                "rank_per_module": sorted(set(merged.ranks.values())),
                "merge_seconds": round(merged.timings.get("total", float("nan")), 4),
            }
            done(label)
    return {"n_per_task": n, "tasks": list(TASKS), "rows": rows, "merges": merges}


def table_markdown(table: dict) -> str:
    """The table as GitHub markdown: one row per model, one column per task plus the mean, in % (one decimal)."""
    columns = [*table["tasks"], "mean"]
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, scores in table["rows"].items():
        cells = [f"{100 * scores[column]:.1f}" for column in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Targets of the card in the README's words: (key, label, what the number is).
_TARGET_ROWS = (
    ("own_task_min", "each adapter on its own task", "lowest accuracy", "≥"),
    ("base_skills_kept_min", "base skills kept with one adapter", "lowest mean of accuracy / base accuracy", "≥"),
    ("relative_update_norm_median_max", "‖ΔW‖ / ‖W0‖ per module", "median over all modules", "≤"),
    ("half_weight_retention_min", "one adapter at weight 0.5", "lowest retention", "≥"),
    ("pairwise_linear_retention_mean_min", "exact sum of two adapters", "mean retention over all pairs", "≥"),
    ("all_linear_retention_min", "exact sum of all six (stretch goal)", "mean retention", "≥"),
)


def targets_markdown(card: dict) -> str:
    """The zoo card's targets, retention by number of adapters and family merges as GitHub markdown.

    Args:
        card: A `zoo_card.json` written by `build_zoo`.

    Returns:
        Three tables: the targets (measured vs required), exact-sum retention by number of adapters
        merged, and the same-skill merges of each family.
    """
    targets = card["targets"]
    lines = ["| target | measured as | required | measured | met |", "|---|---|---:|---:|:---:|"]
    for key, label, how, sign in _TARGET_ROWS:
        measured = targets["measured"][key]
        text = f"{measured:.3f}" if key.startswith("relative") else f"{100 * measured:.1f}%"
        required = f"{sign} {targets['targets'][key]:g}" if key.startswith("relative") else f"{sign} {100 * targets['targets'][key]:g}%"
        lines.append(f"| {label} | {how} | {required} | {text} | {'yes' if targets['met'][key] else 'no'} |")
    by_count = targets["linear_retention_by_count"]
    lines += ["", "| adapters summed | subsets | mean retention | lowest |", "|---:|---:|---:|---:|"]
    for count, entry in by_count.items():
        lines.append(f"| {count} | {len(entry['subsets'])} | {100 * entry['mean']:.1f}% | {100 * entry['min']:.1f}% |")
    families = card.get("families", {})
    if families:
        labels = list(next(iter(families.values()))["merges"])
        lines += ["", "| family | " + " | ".join(["each alone", *labels]) + " |", "|---|" + "---:|" * (len(labels) + 1)]
        for family in families.values():
            alone = " / ".join(f"{100 * value:.1f}" for value in family["own"].values())
            cells = [f"{100 * family['merges'][label]['accuracy']:.1f}" for label in labels]
            lines.append(f"| {' + '.join(family['adapters'])} | " + " | ".join([alone, *cells]) + " |")
    return "\n".join(lines) + "\n"
