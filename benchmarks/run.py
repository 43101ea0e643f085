"""Run every benchmark of issue 8 in one go and print one table, side by side.

    python -m benchmarks.run            # full mode: the reference shape, minutes; writes benchmarks/results.md
    python -m benchmarks.run --quick    # seconds, for CI; writes only where --out says

Items: 1 lego vs scikit-learn, 2 factored svd vs PEFT, 3 invariance checks, 4 peak memory,
5 app latency, 6 the merge command and start-up, 7 streamed merges of 64 bf16 adapters, 8 an
adapter library of 256 adapters on one module (see each ``bench_*.py``; each also runs on its own).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from benchmarks import (
    bench_app,
    bench_checks,
    bench_cli,
    bench_lego,
    bench_library,
    bench_memory,
    bench_stream,
    bench_svd,
)
from benchmarks.report import Row, load_average, machine, markdown

ITEMS: dict[str, Callable[[bool], list[Row]]] = {
    "lego": bench_lego.run,
    "svd": bench_svd.run,
    "checks": bench_checks.run,
    "memory": bench_memory.run,
    "app": bench_app.run,
    "cli": bench_cli.run,
    "stream": bench_stream.run,
    "library": bench_library.run,
}
RESULTS = Path(__file__).parent / "results.md"


def report(rows: list[Row], quick: bool, minutes: float, loads: tuple[str, str], note: str) -> str:
    """The markdown document written to results.md."""
    mode = (
        "quick (CI smoke run: reduced shapes, targets are not meaningful)"
        if quick
        else "full (reference shape)"
    )
    lines = [
        "# Benchmark results (issue 8)",
        "",
        f"Mode: {mode}. Machine: {machine()}.",
        f"Run on {time.strftime('%Y-%m-%d %H:%M %Z')}, {minutes:.1f} min in all; "
        f"1-minute load average {loads[0]} at the start, {loads[1]} at the end (2 cores: above 2 means other work shared them).",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n\n" + markdown(rows)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced shapes: seconds, for CI")
    parser.add_argument(
        "--only", default=",".join(ITEMS), help=f"comma-separated subset of {', '.join(ITEMS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file to write (full mode default: benchmarks/results.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for torch and scikit-learn's OpenMP alike (default: their own choice)",
    )
    parser.add_argument("--note", default="", help="a line to add under the header of the written report")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ITEMS))
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, load_at_start = time.perf_counter(), load_average()
    rows: list[Row] = []
    # One limit for every OpenMP/BLAS pool, so both sides of each comparison get the same cores.
    with threadpool_limits(limits=args.threads):
        for name in chosen:
            item_rows = ITEMS[name](args.quick)
            print(markdown(item_rows), flush=True)  # progress: the full run takes minutes
            rows += item_rows
    table = markdown(rows)
    print(f"Machine: {machine()}\n\nAll items:\n\n{table}")
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        minutes = (time.perf_counter() - start) / 60
        out.write_text(report(rows, args.quick, minutes, (load_at_start, load_average()), args.note))
        print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
