"""Measure the merge lab on the demo zoo and store it in assets/zoo/merge_lab.json and merge_lab.md.

    python scripts/merge_lab_table.py                 # table n=200; curve and k-sweep n=100
    python scripts/merge_lab_table.py --n 20 --curve-n 10 --no-write   # a quick look

Writes every registry method at equal rank k ∈ {r̄, 2·r̄} (fixed-rank methods once), the exact sum,
the base and each adapter alone, each beside the same merge of random controls, with 95% Wilson
intervals; mean retention against the number of adapters merged (a few seeded subsets per size);
and the k-sweep of every method that takes k. The README's merge-lab tables are copied from the .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lego_viz.adapters import load_adapter
from lego_viz.merge import MERGE_METHODS
from lego_viz.zoo import lab
from lego_viz.zoo.harness import Scorer
from lego_viz.zoo.model import ZOO_DIR, adapter_dirs, load_base


def _progress(name: str):
    started = time.perf_counter()

    def report(done: int, total: int, what: str) -> None:
        print(f"  [{name} {done}/{total} {time.perf_counter() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    return report


def render(result: dict) -> str:
    """The markdown file: the accuracy table, the retention curve and how they were measured."""
    table, curve = result["table"], result["retention_curve"]
    header, rows = lab.table_cells(table)
    lines = [
        "# Merge lab on the demo zoo",
        "",
        f"Exact match (%) on {table['n_per_task']} held-out prompts per task; weights 1; default options; "
        f"equal rank k ∈ {{{', '.join(map(str, table['k']))}}} (mean source rank r̄ and 2·r̄); fixed-rank methods once. "
        "Mean over tasks with its 95% Wilson interval; retention = accuracy / the adapter's own accuracy, mean over tasks; "
        f"control = the same merge of random adapters with the same shapes and unit norms (seed {table['control_seed']}); "
        "margin = mean − control, in points.",
        "",
        lab.markdown(header, rows).rstrip("\n"),
        "",
    ]
    if table["refused"]:
        lines += ["Methods that refuse these adapters:", ""]
        lines += [f"* `{label}`: {reason}" for label, reason in table["refused"].items()]
        lines.append("")
    lines += [
        f"Retention (%) against the number of adapters merged: mean ± sd over up to {curve['per_size']} seeded subsets "
        f"per size (seed {curve['seed']}), {curve['n_per_task']} held-out prompts per task, k = each subset's r̄.",
        "",
        lab.markdown(*lab.curve_cells(curve)).rstrip("\n"),
        "",
        f"Measured by `scripts/merge_lab_table.py` in {result['seconds']['total']:.0f} s "
        f"({result['torch_threads']} torch thread(s), {result['device']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help=f"zoo folder (default {ZOO_DIR})")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts per task for the table (default 200)")
    parser.add_argument("--curve-n", type=int, default=100, help="held-out prompts per task for the curve and the k-sweep (default 100)")
    parser.add_argument("--per-size", type=int, default=3, help="subsets per number of adapters (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave assets/zoo as it is")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_base(device="cpu", zoo_dir=args.zoo)
    adapters, _ = lab.lab_adapters([load_adapter(path, name=name) for name, path in adapter_dirs(args.zoo).items()])
    seconds = {}
    clock = time.perf_counter()
    table = lab.accuracy_table(adapters, Scorer.from_model(base, tokenizer, args.n), on_step=_progress("table"))
    seconds["table"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    curve_scorer = Scorer.from_model(base, tokenizer, args.curve_n)
    curve = lab.retention_curve(adapters, curve_scorer, per_size=args.per_size, on_step=_progress("curve"))
    seconds["retention_curve"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    sweep = lab.k_sweep(adapters, curve_scorer, on_step=_progress("k-sweep"))
    seconds["k_sweep"] = round(time.perf_counter() - clock, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    result = {
        "adapters": {a.name: {"sha256": a.sha256, "ranks": sorted(set(a.ranks))} for a in adapters},
        "methods": list(MERGE_METHODS),
        "table": table.to_dict(),
        "retention_curve": curve,
        "k_sweep": sweep,
        "seconds": seconds,
        "torch_threads": args.threads,
        "device": f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__},
    }
    markdown = render(result)
    if not args.no_write:
        (args.zoo / lab.SHIPPED_JSON).write_text(json.dumps(result, indent=1) + "\n")
        (args.zoo / lab.SHIPPED_MD).write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
