"""Item 3: the invariance checks (permutation, concatenation–summation) at the full reference shape.

Both are exact weight-space checks computed from the factors (DESIGN §3), over every module of
all eight adapters; the Freivalds probe runs alongside inside each check.

    python -m benchmarks.bench_checks [--quick]
"""

from __future__ import annotations

import argparse

from benchmarks.report import Row, markdown, seconds, timed
from benchmarks.synthetic import ReferenceShape, make_adapters
from lego_viz.invariance import check_concat_sum, check_permutation

QUICK_SHAPE = ReferenceShape(n_layers=2, shrink=8)
FULL_SHAPE = ReferenceShape()
TIME_TARGET = 2.0


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    adapters = make_adapters(shape)
    permutation, perm_time = timed(lambda: check_permutation(adapters, seed=0))
    concat, concat_time = timed(lambda: check_concat_sum(adapters))
    total = perm_time + concat_time
    scope = "full reference shape" if shape == FULL_SHAPE else shape.describe()
    return [
        Row(
            "3 checks",
            f"permutation check, {len(permutation.per_module)} adapter-modules, {scope}",
            seconds(perm_time),
            "—",
            f"max rel. error {permutation.max_rel_error:.1e} ({'pass' if permutation.passed else 'FAIL'})",
        ),
        Row(
            "3 checks",
            f"concat–sum check, {len(concat.per_module)} modules",
            seconds(concat_time),
            "—",
            f"max rel. error {concat.max_rel_error:.1e} ({'pass' if concat.passed else 'FAIL'})",
        ),
        Row(
            "3 checks",
            "both checks",
            seconds(total),
            "—",
            seconds(total),
            f"< {TIME_TARGET:.0f} s",
            total < TIME_TARGET and permutation.passed and concat.passed,
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 layers at 1/8 width: seconds, for CI")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
