"""Item 3: the invariance checks (permutation, concatenation–summation) at the full reference shape.

Both run on every module of all eight adapters, from the factors (ARCHITECTURE §3). With default settings
the library picks the exact factored error or, above a work budget, the random-probe estimate;
the table says which ran, and when the probe did, the forced exact figure is timed beside it.

    python -m benchmarks.bench_checks [--quick]
"""

from __future__ import annotations

from benchmarks.report import Row, item_main, seconds, timed
from benchmarks.synthetic import ReferenceShape, make_adapters
from lego_viz.checks.invariance import check_concat_sum, check_permutation

QUICK_SHAPE = ReferenceShape(n_layers=2, shrink=8)
FULL_SHAPE = ReferenceShape()
TIME_TARGET = 2.0


def _row(what: str, result, elapsed: float) -> Row:
    verdict = "pass" if result.passed else "FAIL"
    return Row(
        "3 checks",
        f"{what} [{result.method}]",
        seconds(elapsed),
        "—",
        f"max rel. error {result.max_rel_error:.1e} ({verdict})",
    )


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    adapters = make_adapters(shape)
    scope = "full reference shape" if shape == FULL_SHAPE else shape.describe()
    # Default settings first: what the app and the CLI run (exact, or the probe above a work budget).
    permutation, perm_time = timed(lambda: check_permutation(adapters, seed=0))
    concat, concat_time = timed(lambda: check_concat_sum(adapters))
    total = perm_time + concat_time
    rows = [
        _row(
            f"permutation check, {len(permutation.per_module)} adapter-modules, {scope}",
            permutation,
            perm_time,
        ),
        _row(f"concat–sum check, {len(concat.per_module)} modules", concat, concat_time),
        Row(
            "3 checks",
            "both checks, default settings",
            seconds(total),
            "—",
            seconds(total),
            f"< {TIME_TARGET:.0f} s",
            total < TIME_TARGET and permutation.passed and concat.passed,
        ),
    ]
    if "probe" in {permutation.method, concat.method}:
        # For comparison: the exact figure on every module, which the default skips at this size.
        exact_perm, exact_perm_time = timed(lambda: check_permutation(adapters, seed=0, exact=True))
        exact_concat, exact_concat_time = timed(lambda: check_concat_sum(adapters, exact=True))
        rows += [
            _row("permutation check, forced exact", exact_perm, exact_perm_time),
            _row("concat–sum check, forced exact", exact_concat, exact_concat_time),
        ]
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    return item_main(run, __doc__, "2 layers at 1/8 width: seconds, for CI", argv)


if __name__ == "__main__":
    main()
