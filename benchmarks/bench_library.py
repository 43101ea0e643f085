"""Item 8: an adapter library — 256 adapters at r = 16 on one module (4,096 units) vs scikit-learn.

At this size an ``n × n`` Gram matrix costs more than it saves, so ``lego`` switches to k-means on
the points projected on their dominant directions (randomized range finder), polished on the full points (``lego.GRAM_UNITS``; the report's
``details`` say which ran). The lego figure is the whole merge; the reference is one scikit-learn
``KMeans(n_init=10, k-means++)`` fit on the same features; inertia of both is recomputed in float64
from their labels.

    python -m benchmarks.bench_library [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.bench_lego import FEATURES, INERTIA_TARGET, N_INIT, K, sklearn_loop, warm_up
from benchmarks.report import Row, item_main, seconds, timed
from benchmarks.synthetic import ReferenceShape, _config, _pools, _units
from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.merge import merge

MODULE = "self_attn.q_proj"
QUICK_SHAPE = ReferenceShape(n_layers=1, n_adapters=160, shrink=16)  # 2,560 units: past the Gram limit
FULL_SHAPE = ReferenceShape(n_layers=1, n_adapters=256)
SPEEDUP_TARGET = 10.0


def library(shape: ReferenceShape, seed: int = 0) -> list[LoraAdapter]:
    """``shape.n_adapters`` adapters on one module (layer 0's q_proj), units drawn around shared directions."""
    gen = torch.Generator().manual_seed(seed)
    name = f"model.layers.0.{MODULE}"
    pool_a, pool_b = _pools(shape, name, gen)
    config = {**_config(shape), "target_modules": [MODULE.split(".")[-1]]}
    adapters = []
    for t in range(shape.n_adapters):
        a, b = _units(shape, pool_a, pool_b, gen)
        adapters.append(LoraAdapter(name=f"library_{t}", source=f"synthetic:{seed}:{t}", config=dict(config),
                                    modules={name: LoraModule(A=a, B=b, scale=shape.lora_alpha / shape.rank)}))
    return adapters


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    adapters = library(shape)
    warm_up()
    # The sketch route's one-time costs too (its module's import, the BLAS thread limits), as warm_up pays the Gram route's.
    merge(library(QUICK_SHAPE, seed=1), "lego", k=K, n_init=2, features=FEATURES, seed=0)
    merged, lego_time = timed(lambda: merge(adapters, "lego", k=K, n_init=N_INIT, features=FEATURES, seed=0))
    (name,) = merged.modules
    sk_time, sk_inertia, ours = sklearn_loop(adapters, merged.labels)
    ratio, speedup = ours[name] / sk_inertia[name], sk_time / lego_time
    n = shape.n_adapters * shape.rank
    d = sum(next((i, o) for m, i, o in shape.linears if m == MODULE))
    algorithm = ", ".join(f"{key}: {count}" for key, count in merged.details["kmeans"].items() if count)
    return [
        Row("8 library", f"merge time, {shape.n_adapters} adapters r={shape.rank} on one {MODULE.split('.')[-1]} "
            f"({n} units × {d} features), k={K}, n_init={N_INIT}, {FEATURES} features; k-means {algorithm}",
            seconds(lego_time), f"scikit-learn {seconds(sk_time)}", f"{speedup:.0f}× faster",
            f"≥ {SPEEDUP_TARGET:.0f}×", speedup >= SPEEDUP_TARGET),
        Row("8 library", "inertia", f"{ours[name]:.4g}", f"scikit-learn {sk_inertia[name]:.4g}", f"ratio {ratio:.4f}",
            f"≤ {INERTIA_TARGET}", ratio <= INERTIA_TARGET),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    return item_main(run, __doc__, "160 adapters at 1/16 width (2,560 units), for CI", argv)


if __name__ == "__main__":
    main()
