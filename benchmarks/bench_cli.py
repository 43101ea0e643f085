"""Item 6: the ``merge`` command as a user runs it, and the CLI's start-up (issue 15, items 1–2).

The merge figure is what the user feels: the wall time of ``python -m lego_viz merge`` (defaults:
lego, canonical features, ``n_init=10``, invariance checks and report on) minus the wall time of
``python -m lego_viz inspect`` on the same adapters (start-up, reading and validating the files),
each the best of two runs in a fresh process. The baseline is the per-module scikit-learn
``KMeans(n_init=10)`` loop of item 1 on the same adapters (shared with item 1 in one run).
Start-up: ``--help`` and ``inspect`` of a tiny adapter, best of three.

The small merge people make most (issue 24, item 7): ``merge`` of two demo-zoo adapters, lego ``k=4``,
checks and report on (and off), wall time in a fresh process, best of three, beside ``--help`` and
beside the ``import torch`` the lego route no longer pays, all in one run. ``--zoo`` runs only these rows.

    python -m benchmarks.bench_cli [--quick | --zoo]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_lego import N_INIT, K, sklearn_seconds
from benchmarks.report import Row, item_main, markdown, seconds
from benchmarks.synthetic import ReferenceShape, make_adapters, save_adapters

QUICK_SHAPE = ReferenceShape(n_layers=2, shrink=8)
FULL_SHAPE = ReferenceShape()
TINY_SHAPE = ReferenceShape(n_layers=1, n_adapters=1, rank=4, shrink=64)
SPEEDUP_TARGET = 50.0
STARTUP_TARGET = 1.5
ROOT = Path(__file__).resolve().parent.parent
ZOO_PAIR = [ROOT / "assets" / "zoo" / "adapters" / name for name in ("reverse", "sort")]
ZOO_TARGET = 1.2  # seconds of wall time: "feels instant", about 1 s on the 2-core machine (issue 24, item 7)


def cli_seconds(*args: str, repeats: int = 2) -> float:
    """Best wall time of ``python -m lego_viz ARGS`` in a fresh process, with this process's thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lego_viz", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"lego_viz {args[0]} failed:\n{done.stderr[-2000:]}")
        best = min(best, elapsed)
    return best


def zoo_rows(repeats: int = 3) -> list[Row]:
    """A merge of two zoo adapters as a user types it, with checks on and off, and ``--help``; the
    reference is ``python -c "import torch"``, what the command paid before it ran on numpy. Each
    figure is the best wall time of ``repeats`` fresh processes, with that run's CPU time (all its
    processes), which a busy machine inflates less than the wall time."""
    if not all(folder.is_dir() for folder in ZOO_PAIR):
        return [Row("6 cli zoo", "`merge` of two zoo adapters", "—", "—", "skipped: assets/zoo/adapters is missing")]
    python = [sys.executable]
    torch_import = best_run([*python, "-c", "import torch"], repeats)
    with tempfile.TemporaryDirectory(prefix="lego_viz_bench_zoo_") as tmp:
        merge = [*python, "-m", "lego_viz", "merge", *map(str, ZOO_PAIR), "--k", "4", "--out", f"{tmp}/out", "--force"]
        checked = best_run(merge, repeats)
        bare = best_run([*merge, "--no-checks"], repeats)
    help_time = best_run([*python, "-m", "lego_viz", "--help"], repeats)
    reference = f"`import torch` {wall_cpu(torch_import)}"
    return [
        Row("6 cli zoo", "`merge` of two zoo adapters (reverse, sort; lego k=4, checks + report on), wall (CPU)",
            wall_cpu(checked), reference, seconds(checked[0]), f"≤ {ZOO_TARGET} s", checked[0] <= ZOO_TARGET),
        Row("6 cli zoo", "the same with `--no-checks`, wall (CPU)", wall_cpu(bare), reference, seconds(bare[0]),
            f"≤ {ZOO_TARGET} s", bare[0] <= ZOO_TARGET),
        Row("6 cli zoo", "`python -m lego_viz --help` in the same run, wall (CPU)", wall_cpu(help_time), "—",
            seconds(help_time[0])),
    ]


def best_run(command: list[str], repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``repeats`` runs of ``command`` (which must succeed), CPU
    counted over the process and every process it waited for, with this process's thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    runs = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.append((wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))
    return min(runs)


def wall_cpu(measured: tuple[float, float]) -> str:
    return f"{seconds(measured[0])} ({seconds(measured[1])})"


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    with tempfile.TemporaryDirectory(prefix="lego_viz_bench_cli_") as tmp:
        folders = [str(p) for p in save_adapters(make_adapters(shape), Path(tmp) / "in")]
        tiny = str(save_adapters(make_adapters(TINY_SHAPE, seed=5), Path(tmp) / "tiny")[0])
        help_time = cli_seconds("--help", repeats=3)
        tiny_time = cli_seconds("inspect", tiny, repeats=3)
        inspect_time = cli_seconds("inspect", *folders)
        merge_time = cli_seconds("merge", *folders, "--k", str(K), "--n-init", str(N_INIT), "--out", f"{tmp}/out", "--force")
    felt = merge_time - inspect_time
    baseline = sklearn_seconds(shape)
    speedup = baseline / felt
    scope = f"{len(shape.module_names())} modules ({shape.n_layers} layers{', widths ÷' + str(shape.shrink) if shape.shrink > 1 else ''})"
    return [
        Row("6 cli", f"`merge` wall {seconds(merge_time)} − `inspect` wall {seconds(inspect_time)}, "
            f"lego k={K}, n_init={N_INIT}, checks + report on, {scope}",
            seconds(felt), f"scikit-learn loop {seconds(baseline)}", f"{speedup:.0f}× faster",
            f"≥ {SPEEDUP_TARGET:.0f}×", speedup >= SPEEDUP_TARGET),
        Row("6 cli", "`python -m lego_viz --help` wall", seconds(help_time), "—", seconds(help_time),
            f"< {STARTUP_TARGET} s", help_time < STARTUP_TARGET),
        Row("6 cli", "`python -m lego_viz inspect` of a tiny adapter, wall", seconds(tiny_time), "—",
            seconds(tiny_time), f"< {STARTUP_TARGET} s", tiny_time < STARTUP_TARGET),
        *zoo_rows(repeats=1 if quick else 3),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--zoo"]:
        rows = zoo_rows()
        print(markdown(rows))
        return rows
    return item_main(run, __doc__, "2 layers at 1/8 width: seconds, for CI", argv)


if __name__ == "__main__":
    main()
