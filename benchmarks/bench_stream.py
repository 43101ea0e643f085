"""Item 7: a streamed merge of many large adapters at bounded memory (issue 15, item 3).

Writes 64 adapters of the reference shape in bf16 (≈ 5.4 GB) to a temporary folder, seeded, one
adapter in memory at a time; then runs ``python -m lego_viz merge`` (checks and report on) with
``lego`` and with ``svd`` in a fresh process each and reads the process's peak resident memory
(``ru_maxrss``: everything, interpreter and torch included). The folder is deleted afterwards; with
too little free disk the item is skipped and says so.

    python -m benchmarks.bench_stream [--quick]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import Row, item_main, megabytes, seconds
from benchmarks.synthetic import ReferenceShape, write_adapters

QUICK_SHAPE = ReferenceShape(n_layers=2, n_adapters=8, shrink=8)
FULL_SHAPE = ReferenceShape(n_adapters=64)
RSS_TARGET = 1.5 * 10**9
ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lego", "svd")


def stored_bytes(shape: ReferenceShape, dtype: torch.dtype = torch.bfloat16) -> int:
    return shape.n_adapters * shape.rank * sum(d_in + d_out for _, d_in, d_out in shape.linears) * shape.n_layers * dtype.itemsize


def child(args: list[str]) -> None:
    """Run the CLI in this process, then print its peak RSS (bytes) and exit code as JSON.

    This module imports only what the CLI imports anyway (torch), so the peak is the command's.
    """
    import resource

    from lego_viz.cli.commands import main

    start = time.perf_counter()
    code = main(args)
    elapsed = time.perf_counter() - start
    print(json.dumps({"code": code, "seconds": elapsed, "peak": peak_rss(resource)}))


def peak_rss(resource) -> int:
    """This process's own peak resident size in bytes.

    Linux keeps ``ru_maxrss`` across fork + exec: a child started by a large parent (the benchmark
    driver, holding item 6's adapters) reports the parent's size, so the same 2.1 GiB came out for
    lego and svd alike. ``VmHWM`` is the high-water mark of this process's own memory; ``ru_maxrss``
    is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_stream", "--child", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"streamed merge failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"streamed merge exited {result['code']}:\n{done.stderr[-2000:]}")
    return result


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    size = stored_bytes(shape)
    what = f"{shape.n_adapters} adapters × {len(shape.module_names())} modules in bf16 ({size / 1e9:.2f} GB on disk)"
    with tempfile.TemporaryDirectory(prefix="lego_viz_bench_stream_") as tmp:
        free = shutil.disk_usage(tmp).free
        if free < size + 2 * 10**9:
            return [Row("7 stream", f"peak RSS of a streamed {m} merge, {what}", "—", "—",
                        f"skipped: {free / 1e9:.1f} GB free, needs {size / 1e9 + 2:.1f} GB") for m in METHODS]
        start = time.perf_counter()
        folders = [str(p) for p in write_adapters(shape, Path(tmp) / "in", dtype=torch.bfloat16)]
        written = time.perf_counter() - start
        rows = []
        for method in METHODS:
            result = measure(["merge", *folders, "--method", method, "--k", "16", "--out", f"{tmp}/{method}"])
            rows.append(Row(
                "7 stream",
                f"peak RSS of `merge --method {method} --k 16` (checks + report on), {what}; "
                f"merge {seconds(result['seconds'])} (written in {seconds(written)})",
                megabytes(result["peak"]), f"input {megabytes(size)}", f"{result['peak'] / size:.2f}× input",
                f"< {RSS_TARGET / 1e9:.1f} GB", result["peak"] < RSS_TARGET,
            ))
    return rows


def main(argv: list[str] | None = None) -> list[Row] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1:])
        return None
    return item_main(run, __doc__, "8 adapters, 2 layers at 1/8 width, for CI", argv)


if __name__ == "__main__":
    main()
