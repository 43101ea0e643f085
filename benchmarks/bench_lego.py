"""Item 1: the ``lego`` merge vs a per-module scikit-learn ``KMeans`` loop on the same features.

Both cluster every module's 128 units (8 adapters × r = 16) into k = 16 with k-means++ and
``n_init=10``. The lego figure is the whole merge (units, Gram matrices, batched k-means,
centroids, reweighting); the scikit-learn figure is only its ``fit`` calls, features prepared
beforehand. Inertia of both is recomputed in float64 from their labels on the same features.

    python -m benchmarks.bench_lego [--quick]
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

from benchmarks.report import Row, item_main, seconds, timed
from benchmarks.synthetic import ReferenceShape, make_adapters
from lego_viz.merge import merge
from lego_viz.units.msu import module_msus

K = 16
N_INIT = 10
FEATURES = "canonical"  # the lego default
QUICK_SHAPE = ReferenceShape(n_layers=2, shrink=8)
FULL_SHAPE = ReferenceShape()
SPEEDUP_TARGET = 50.0
INERTIA_TARGET = 1.01


def labels_inertia(features: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of points to the mean of their cluster, in float64."""
    x = features.astype(np.float64)
    total = 0.0
    for j in np.unique(labels):
        members = x[labels == j]
        total += float(((members - members.mean(axis=0)) ** 2).sum())
    return total


def sklearn_loop(
    adapters, labels: dict[str, torch.Tensor | None], seed: int = 0
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Time ``KMeans.fit`` on each module's features.

    Args:
        adapters: the merged adapters.
        labels: our cluster labels per module (None: time scikit-learn only), scored on the same features.

    Returns:
        (total fit seconds, scikit-learn inertia per module, our inertia per module).
    """
    total, theirs, ours = 0.0, {}, {}
    for name, own in labels.items():
        feats = module_msus(adapters, name).features(FEATURES).numpy()
        km = KMeans(K, init="k-means++", n_init=N_INIT, random_state=seed)
        _, elapsed = timed(lambda km=km, feats=feats: km.fit(feats))
        total += elapsed
        theirs[name] = labels_inertia(feats, km.labels_)
        if own is not None:
            ours[name] = labels_inertia(feats, own.numpy())
    return total, theirs, ours


# Seconds of the loop per adapter shape, measured once per process: the CLI item compares against
# the same measurement as this item instead of spending minutes repeating it.
_LOOP_SECONDS: dict[ReferenceShape, float] = {}


def sklearn_seconds(shape: ReferenceShape) -> float:
    """The scikit-learn loop's fit time over every module of ``make_adapters(shape)``."""
    if shape not in _LOOP_SECONDS:
        adapters = make_adapters(shape)
        _LOOP_SECONDS[shape] = sklearn_loop(adapters, dict.fromkeys(shape.module_names()))[0]
    return _LOOP_SECONDS[shape]


def warm_up() -> None:
    """Pay one-time costs (thread pools, lazy imports) before anything is timed."""
    tiny = make_adapters(ReferenceShape(n_layers=1, n_adapters=2, shrink=64), seed=99)
    merge(tiny, "lego", k=K)
    KMeans(4, n_init=2, random_state=0).fit(np.random.default_rng(0).standard_normal((64, 8)))


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    adapters = make_adapters(shape)
    warm_up()
    merged, lego_time = timed(lambda: merge(adapters, "lego", k=K, n_init=N_INIT, features=FEATURES, seed=0))
    names = list(merged.modules)
    sk_time, sk_inertia, lego_inertia = sklearn_loop(adapters, merged.labels)
    _LOOP_SECONDS[shape] = sk_time
    total_ratio = sum(lego_inertia.values()) / sum(sk_inertia.values())
    worst = max(lego_inertia[name] / sk_inertia[name] for name in names)
    speedup = sk_time / lego_time
    steps = ", ".join(f"{key} {seconds(value)}" for key, value in merged.timings.items() if key != "total")
    scope = f"{len(names)} modules ({shape.n_layers} layers{', widths ÷' + str(shape.shrink) if shape.shrink > 1 else ''})"
    return [
        Row(
            "1 lego",
            f"merge time, k={K}, n_init={N_INIT}, {FEATURES} features, {scope} [{steps}]",
            seconds(lego_time),
            f"scikit-learn loop {seconds(sk_time)}",
            f"{speedup:.0f}× faster",
            f"≥ {SPEEDUP_TARGET:.0f}×",
            speedup >= SPEEDUP_TARGET,
        ),
        Row(
            "1 lego",
            "inertia, Σ over modules (worst single module in brackets)",
            f"{sum(lego_inertia.values()):.4g}",
            f"scikit-learn {sum(sk_inertia.values()):.4g}",
            f"ratio {total_ratio:.4f} (worst {worst:.4f})",
            f"≤ {INERTIA_TARGET}",
            total_ratio <= INERTIA_TARGET,
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    torch.manual_seed(0)
    return item_main(run, __doc__, "2 layers at 1/8 width: seconds, for CI", argv)


if __name__ == "__main__":
    main()
