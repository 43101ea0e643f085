"""Rows, timing and the markdown table every benchmark prints (one table for all items, side by side)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One measured line: what we ran, what we compared against, the figure, and the target.

    Args:
        item: issue item number and short name, e.g. ``"1 lego"``.
        what: what was measured.
        ours: our figure (time, size…), already formatted.
        reference: the reference figure, or ``"—"``.
        result: the ratio or the value judged against the target.
        target: the target as text.
        met: whether the target is met; ``None`` when there is no target or it was skipped.
    """

    item: str
    what: str
    ours: str
    reference: str
    result: str
    target: str = "—"
    met: bool | None = None


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` once; return its result and the wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def megabytes(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def load_average() -> str:
    """The 1-minute load average: other work on the machine slows every figure in the table."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def markdown(rows: Sequence[Row]) -> str:
    """The rows as one markdown table."""
    header = "| item | what | ours | reference | result | target | met |\n|---|---|---|---|---|---|---|\n"
    mark = {True: "yes", False: "**no**", None: "—"}
    return header + "".join(
        f"| {r.item} | {r.what} | {r.ours} | {r.reference} | {r.result} | {r.target} | {mark[r.met]} |\n"
        for r in rows
    )


def item_main(run: Callable[..., list[Row]], doc: str | None, quick_help: str, argv: list[str] | None = None) -> list[Row]:
    """The command line of one benchmark item: ``[--quick]``; prints the item's table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    rows = run(quick=parser.parse_args(argv).quick)
    print(markdown(rows))
    return rows
