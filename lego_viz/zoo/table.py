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
    from lego_viz.export import export_adapter
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
