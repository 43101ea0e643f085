"""Measure the merge lab on the demo zoo and store it in assets/zoo/merge_lab.json and merge_lab.md.

    python scripts/merge_lab_table.py                 # table n=200; curve and k-sweep n=50
    python scripts/merge_lab_table.py --n 20 --curve-n 10 --no-write   # a quick look

Writes every registry method at equal rank k ∈ {r̄, 2·r̄} (fixed-rank methods once), zero-shot Arrow-style
routing (k units per token, or the top-1 / top-2 source adapters per token), the exact sum,
the base and each adapter alone, each beside the same merge of random controls, with 95% Wilson
intervals; mean retention against the number of adapters merged (a few seeded subsets per size);
and the k-sweep of every method that takes k. The README's merge-lab tables are copied from the .md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import sys
import tempfile
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


PARTS = ("table", "retention_curve", "k_sweep")


def render(result: dict) -> str:
    """The markdown file: the accuracy table, the retention curve (when measured) and how they were measured."""
    table = result["table"]
    header, rows = lab.table_cells(table)
    lines = [
        "# Merge lab on the demo zoo",
        "",
        f"Exact match (%) on {table['n_per_task']} held-out prompts per task; weights 1; default options; "
        f"equal rank k ∈ {{{', '.join(map(str, table['k']))}}} (mean source rank r̄ and 2·r̄); fixed-rank methods once. "
        "Mean over tasks with its 95% Wilson interval; retention = accuracy / the adapter's own accuracy, mean over tasks; "
        f"control = the same merge of random adapters with the same shapes and unit norms (seed {table['control_seed']}); "
        "margin = mean − control, in points." + (f" {lab.ROUTED_NOTE[0].upper()}{lab.ROUTED_NOTE[1:]}." if _routed(table) else ""),
        "",
        lab.markdown(header, rows).rstrip("\n"),
        "",
    ]
    if table["refused"]:
        lines += ["Methods that refuse these adapters:", ""]
        lines += [f"* `{label}`: {reason}" for label, reason in table["refused"].items()]
        lines.append("")
    curve = result.get("retention_curve")
    if curve:
        lines += [
            f"Retention (%) against the number of adapters merged: mean ± sd over up to {curve['per_size']} seeded subsets "
            f"per size (seed {curve['seed']}), {curve['n_per_task']} held-out prompts per task, k = each subset's r̄.",
            "",
            lab.markdown(*lab.curve_cells(curve)).rstrip("\n"),
            "",
        ]
    timing = ", ".join(f"{part.replace('_', ' ')} {result['seconds'][part]:.0f} s" for part in PARTS if part in result["seconds"])
    lines += [
        f"Measured by `scripts/merge_lab_table.py` ({timing}; {result['torch_threads']} torch thread(s), {result['device']}).",
        "",
    ]
    return "\n".join(lines)


def _routed(table: dict) -> bool:
    """Whether the table has zero-shot routing rows (tables measured before they existed have none)."""
    return any(row["method"] == "arrow" for row in table["rows"])


def _stored(zoo: Path, adapters) -> dict:
    """The parts already measured on exactly these adapters (kept when only some parts are re-run)."""
    path = zoo / lab.SHIPPED_JSON
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text(encoding="utf-8"))
    same = stored.get("adapters") == {a.name: {"sha256": a.sha256, "ranks": sorted(set(a.ranks))} for a in adapters}
    return stored if same else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=ZOO_DIR, help=f"zoo folder (default {ZOO_DIR})")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts per task for the table (default 200)")
    parser.add_argument("--curve-n", type=int, default=50, help="held-out prompts per task for the curve and the k-sweep (default 50)")
    parser.add_argument("--per-size", type=int, default=3, help="subsets per number of adapters (default 3)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to (re)measure (default all: {','.join(PARTS)}); "
                        "the others are kept from merge_lab.json when it was measured on the same adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave assets/zoo as it is")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    torch.set_num_threads(args.threads)
    base, tokenizer = load_base(device="cpu", zoo_dir=args.zoo)
    adapters, _ = lab.lab_adapters([load_adapter(path, name=name) for name, path in adapter_dirs(args.zoo).items()])
    result = _stored(args.zoo, adapters)
    result.update({
        "adapters": {a.name: {"sha256": a.sha256, "ranks": sorted(set(a.ranks))} for a in adapters},
        "methods": list(MERGE_METHODS),
        "torch_threads": args.threads,
        "device": f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__},
    })
    result.setdefault("seconds", {})
    experiments = {
        "table": lambda: lab.accuracy_table(adapters, Scorer.from_model(base, tokenizer, args.n), on_step=_progress("table")).to_dict(),
        "retention_curve": lambda: lab.retention_curve(
            adapters, Scorer.from_model(base, tokenizer, args.curve_n), per_size=args.per_size, on_step=_progress("curve")
        ),
        "k_sweep": lambda: lab.k_sweep(adapters, Scorer.from_model(base, tokenizer, args.curve_n), on_step=_progress("k-sweep")),
    }
    for part in PARTS:
        if part not in parts:
            continue
        clock = time.perf_counter()
        result[part] = experiments[part]()
        result["seconds"][part] = round(time.perf_counter() - clock, 1)
        if not args.no_write:
            result = _write(args.zoo, adapters, result, part)
    if "table" in result:
        print(render(result))
    return 0


def _write(zoo: Path, adapters, result: dict, part: str) -> dict:
    """Store one finished part, merged with what other runs stored meanwhile (parts can run in parallel).

    Written after each part, so a long run leaves what it has measured; the markdown needs the table.
    """
    with open(Path(tempfile.gettempdir()) / "lego_viz_merge_lab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**result, **_stored(zoo, adapters)}
        merged[part] = result[part]
        merged["seconds"] = {**merged.get("seconds", {}), part: result["seconds"][part]}
        (zoo / lab.SHIPPED_JSON).write_text(json.dumps(merged, indent=1) + "\n")
        if "table" in merged:
            (zoo / lab.SHIPPED_MD).write_text(render(merged))
    return merged


if __name__ == "__main__":
    raise SystemExit(main())
