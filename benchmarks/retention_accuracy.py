"""Does weight-space retention predict what a merge keeps of each task? Spearman ρ on the demo zoo.

    python -m benchmarks.retention_accuracy [--n 50] [--out benchmarks/retention_accuracy.md]

For every merge (all zoo adapters, and disjoint pairs of them; weights 1; each method at k = the
mean source rank and twice it, plus the exact ``linear``) and every merged task t, pairs the retention of adapter t,
``⟨ΔW_merge, ΔW_t⟩ / ‖ΔW_t‖²`` (mean over modules, from factors), with the merged model's exact-match
accuracy on task t (greedy, the first n held-out prompts). Reports Spearman's ρ over all points, by
group and by task, and writes the points as a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = (("linear", {}), ("svd", {}), ("lego", {}), ("lego", {"rescale": "lsq"}), ("core_space", {}), ("knots", {}))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get average ranks); nan when either side is constant."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="held-out prompts per task (default 50)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "retention_accuracy.md")
    args = parser.parse_args(argv)

    import torch

    from lego_viz.adapters import load_adapter
    from lego_viz.checks.retention import retention
    from lego_viz.export.folder import export_adapter
    from lego_viz.merge import merge
    from lego_viz.zoo.evaluate import evaluate
    from lego_viz.zoo.model import ZOO_DIR, adapter_dirs, load_adapted

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dirs = adapter_dirs(ZOO_DIR)
    adapters = [load_adapter(path, name=name) for name, path in dirs.items()]
    # All adapters at once, and disjoint pairs (the zoo is built so that pairs can merge, ARCHITECTURE §9).
    groups = [("all", adapters)] + [(f"{a.name}+{b.name}", [a, b]) for a, b in zip(adapters[::2], adapters[1::2])]
    rows = []  # (group, merge, task, retention, accuracy)
    with tempfile.TemporaryDirectory(prefix="retention_accuracy_") as scratch:
        for group, members in groups:
            mean_rank = round(sum(max(a.ranks) for a in members) / len(members))
            tasks = [a.name for a in members]
            for method, options in METHODS:
                for k in ((None,) if method == "linear" else (mean_rank, 2 * mean_rank)):
                    label = method + ("+lsq" if options.get("rescale") == "lsq" else "") + ("" if k is None else f" k={k}")
                    merged = merge(members, method=method, k=k, **options)
                    kept = retention(merged.modules, members, merged.weights)
                    folder = export_adapter(merged, Path(scratch) / f"{group}_{label}".replace(" ", "_").replace("+", "_"))
                    model, tokenizer = load_adapted(folder)
                    scores = evaluate(model, tokenizer, tasks, n=args.n)
                    for task in tasks:
                        rows.append((group, label, task, kept[task]["mean"], scores[task]))
                    print(f"  {group} · {label}: " + ", ".join(f"{t} {kept[t]['mean']:.2f}/{scores[t]:.0%}" for t in tasks),
                          file=sys.stderr)
    overall = spearman([r[3] for r in rows], [r[4] for r in rows])
    by_group = {g: spearman([r[3] for r in rows if r[0] == g], [r[4] for r in rows if r[0] == g]) for g, _ in groups}
    per_task = {t: spearman([r[3] for r in rows if r[2] == t], [r[4] for r in rows if r[2] == t]) for t in dirs}
    seconds = time.perf_counter() - started
    lines = [
        "# Weight-space retention vs task accuracy on the demo zoo",
        "",
        f"Written by `python -m benchmarks.retention_accuracy --n {args.n}` ({seconds:.0f} s, {args.threads} thread(s)). "
        f"Merges of all {len(adapters)} zoo adapters and of disjoint pairs, weights 1, each method at k = the group's "
        f"mean source rank and twice it, plus the exact `linear`; accuracy = exact match on the first {args.n} held-out "
        "prompts of each merged task. ρ is nan where accuracy does not vary.",
        "",
        f"**Spearman ρ (retention of adapter t, accuracy on task t), all {len(rows)} (merge, task) points: {overall:.3f}**",
        "",
        "By group: " + ", ".join(f"{g} {v:.3f}" for g, v in by_group.items()),
        "",
        "By task (across groups, methods and k): " + ", ".join(f"{t} {v:.3f}" for t, v in per_task.items()),
        "",
        "| group | merge | task | retention | accuracy |",
        "|---|---|---|---:|---:|",
        *[f"| {group} | {label} | {task} | {kept:.3f} | {acc:.3f} |" for group, label, task, kept, acc in rows],
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:9]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
