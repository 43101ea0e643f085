"""Item 4: peak memory of a merge, as extra resident memory over the input adapters' size.

Each merge runs in a fresh child process: adapters are built, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), the merge runs, and the new peak minus the resident size just before
the merge is the merge's extra memory. Where the reset is not allowed, a 1 ms sampler of the
resident size stands in (it can miss a very short peak; the table says which was used).

    python -m benchmarks.bench_memory [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.report import Row, item_main, megabytes

QUICK_LAYERS, QUICK_SHRINK = 2, 8
RATIO_TARGET = 2.0
METHODS = ("lego", "svd")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRss:
    """Peak resident memory while the ``with`` block runs, in bytes (``peak``), and how it was measured."""

    def __enter__(self) -> PeakRss:
        self.start = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.method = "kernel peak (VmHWM)"
        except OSError:
            self.method = "1 ms sampler"
        self._peak = self.start
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        if self.method.startswith("kernel"):
            self._peak = max(self._peak, _status_kib("VmHWM") * 1024)

    @property
    def peak(self) -> int:
        return self._peak

    @property
    def extra(self) -> int:
        return self._peak - self.start


def child(method: str, n_layers: int, shrink: int) -> dict:
    """Build the adapters, then measure one merge (runs inside the child process)."""
    import gc

    from benchmarks.synthetic import ReferenceShape, adapter_bytes, make_adapters
    from lego_viz.merge import merge

    shape = ReferenceShape(n_layers=n_layers, shrink=shrink)
    adapters = make_adapters(shape)
    # A tiny merge first, so lazy imports and thread pools are not counted as the merge's memory.
    merge(make_adapters(ReferenceShape(n_layers=1, n_adapters=2, shrink=64), seed=1), method, k=16)
    gc.collect()
    with PeakRss() as rss:
        merged = merge(adapters, method, k=16)
    output = sum(t.numel() * t.element_size() for m in merged.modules.values() for t in (m.A, m.B))
    return {"input": adapter_bytes(adapters), "extra": rss.extra, "output": output, "how": rss.method}


def measure(method: str, n_layers: int, shrink: int) -> dict:
    """Run :func:`child` in a fresh interpreter and return its figures."""
    command = [sys.executable, "-m", "benchmarks.bench_memory", "--child", method, str(n_layers), str(shrink)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=Path(__file__).parent.parent
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[Row]:
    n_layers, shrink = (QUICK_LAYERS, QUICK_SHRINK) if quick else (32, 1)
    rows = []
    for method in METHODS:
        figures = measure(method, n_layers, shrink)
        ratio = figures["extra"] / figures["input"]
        rows.append(
            Row(
                "4 memory",
                f"peak extra RSS of a {method} merge ({figures['how']}; output {megabytes(figures['output'])})",
                megabytes(figures["extra"]),
                f"input {megabytes(figures['input'])}",
                f"{ratio:.2f}× input",
                f"< {RATIO_TARGET:.0f}×",
                ratio < RATIO_TARGET,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> list[Row] | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        method, n_layers, shrink = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps(child(method, n_layers, shrink)))
        return None
    return item_main(run, __doc__, "2 layers at 1/8 width: seconds, for CI", argv)


if __name__ == "__main__":
    main()
