"""Tests of lego_viz.units.gram_kmeans: torch's draws without torch, agreement with the torch API and scikit-learn."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from lego_viz.units.gram_kmeans import gram_kmeans, relocate_empty, torch_compatible_uniforms
from lego_viz.units.kmeans import GramKMeans


def _gram(points: np.ndarray) -> np.ndarray:
    return points @ points.swapaxes(-1, -2)


def _gaussian_grams(batch: int, n: int, d: int, seed: int, dtype: type = np.float32) -> np.ndarray:
    # Off-centre on purpose: the Gram entries carry a big offset that the kernel must centre away.
    points = np.random.default_rng(seed).standard_normal((batch, n, d)) + 3.0
    return _gram(points).astype(dtype)


@pytest.mark.parametrize(
    "seed", [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 2**63 - 1, 2**64 - 1, -1, -(2**63)]
)
@pytest.mark.parametrize("shape", [(10, 16, 4), (1, 1, 2), (3, 100, 7), (20001,)])
def test_uniforms_equal_torch_rand_bit_for_bit(seed: int, shape: tuple[int, ...]) -> None:
    expected = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    assert np.array_equal(torch_compatible_uniforms(seed, shape), expected)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, True, "0"])
def test_uniforms_reject_seeds_torch_rejects(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be an integer"):
        torch_compatible_uniforms(seed, (2, 3))


def test_import_leaves_torch_out() -> None:
    code = "import sys, lego_viz.units.gram_kmeans; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("batch", "n", "d", "k", "seed", "dtype"),
    [
        (6, 50, 6, 4, 0, np.float32),
        (5, 128, 64, 16, 1, np.float32),
        (4, 40, 3, 30, 2, np.float32),
        (3, 60, 9, 7, 3, np.float64),
    ],
)
def test_kernel_equals_torch_estimator(batch: int, n: int, d: int, k: int, seed: int, dtype: type) -> None:
    # The estimator draws with a torch generator and runs this kernel: the same draws give the same results.
    grams = _gaussian_grams(batch, n, d, seed, dtype)
    labels, inertia, n_iter = gram_kmeans(grams, k, n_init=5, seed=seed, n_features=d)
    fitted = GramKMeans(k, n_init=5, random_state=seed).fit(gram=torch.from_numpy(grams), n_features=d)
    assert np.array_equal(labels, fitted.labels_.numpy())
    assert np.array_equal(inertia, fitted.inertia_.numpy())
    assert np.array_equal(n_iter, fitted.n_iter_.numpy())
    assert labels.dtype == np.int64 and n_iter.dtype == np.int64 and inertia.dtype == dtype


def test_explicit_uniforms_equal_seeded_draws() -> None:
    # The default seed is 0: ignoring the uniforms would not give seed 9's results.
    grams = _gaussian_grams(3, 40, 5, 4)
    seeded = gram_kmeans(grams, 6, n_init=3, seed=9)
    drawn = gram_kmeans(grams, 6, n_init=3, uniforms=torch_compatible_uniforms(9, (3, 6, 3)))
    for a, b in zip(seeded, drawn):
        assert np.array_equal(a, b)


def test_inertia_close_to_sklearn_on_blobs() -> None:
    problems = [
        make_blobs(n_samples=120, n_features=10, centers=6, cluster_std=1.5, random_state=s)[0]
        for s in range(4)
    ]
    points = np.stack(problems).astype(np.float32)
    labels, inertia, _ = gram_kmeans(_gram(points), 6, n_init=10, seed=0, n_features=10)
    for x, lab, ours in zip(points.astype(np.float64), labels, inertia):
        reference = KMeans(6, init="k-means++", n_init=10, random_state=0).fit(x).inertia_
        # Separated blobs have one clear optimum that both should reach (within 1%).
        assert ours <= 1.01 * reference
        # inertia is what it claims, up to float32 Gram arithmetic.
        direct = sum(((x[lab == j] - x[lab == j].mean(axis=0)) ** 2).sum() for j in np.unique(lab))
        assert ours == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("chunk_problems", [1, 3])
def test_chunks_reusing_work_arrays_give_unchunked_results(
    monkeypatch: pytest.MonkeyPatch, chunk_problems: int
) -> None:
    # 7 problems in chunks of 3 leave a short last chunk; each chunk reuses the previous one's work arrays.
    grams = _gaussian_grams(7, 30, 4, 5)
    whole = gram_kmeans(grams, 5, n_init=3, seed=0)
    monkeypatch.setattr("lego_viz.units.gram_kmeans._CHUNK_ELEMENTS", chunk_problems * 3 * 5 * 30)
    chunked = gram_kmeans(grams, 5, n_init=3, seed=0)
    for a, b in zip(whole, chunked):
        assert np.array_equal(a, b)


def test_half_precision_is_computed_in_float32() -> None:
    grams = _gaussian_grams(2, 20, 3, 6)
    labels, inertia, _ = gram_kmeans(grams.astype(np.float16), 3, seed=0)
    assert inertia.dtype == np.float32
    assert np.array_equal(labels, gram_kmeans(grams.astype(np.float16).astype(np.float32), 3, seed=0)[0])


def test_relocate_empty_moves_farthest_movable_points() -> None:
    # Cluster 1 is empty: point 3 is farthest, and cluster 2 keeps one point after giving it.
    moved = relocate_empty(np.array([[0, 0, 0, 2, 2]]), lambda: np.array([[0.1, 5.0, 0.2, 9.0, 0.3]]), 3)
    assert moved.tolist() == [[0, 0, 0, 1, 2]]
    # Two empty clusters, the two farthest points share a cluster of two: one must come from elsewhere.
    moved = relocate_empty(np.array([[0, 0, 1, 1, 1]]), lambda: np.array([[9.0, 9.0, 1.0, 2.0, 3.0]]), 4)
    assert sorted(moved[0].tolist()) == [0, 1, 1, 2, 3]


def test_empty_batch_gives_empty_results() -> None:
    labels, inertia, n_iter = gram_kmeans(np.zeros((0, 5, 5), dtype=np.float32), 2)
    assert labels.shape == (0, 5) and inertia.shape == (0,) and n_iter.shape == (0,)


@pytest.mark.parametrize(
    ("gram", "kwargs", "message"),
    [
        (np.zeros((2, 3, 4)), {}, r"gram must have shape \(batch, n, n\)"),
        (np.zeros((3, 3)), {}, r"gram must have shape \(batch, n, n\)"),
        (np.eye(4)[None], {"n_clusters": 5}, "1 <= n_clusters <= n_samples = 4, got 5"),
        (np.eye(4)[None], {"n_init": 0}, "n_init must be a positive integer"),
        (np.eye(4)[None], {"tol": float("nan")}, "tol must be a finite number"),
        (np.eye(4)[None], {"n_features": [1, 2]}, r"one per problem \(1\)"),
        (np.eye(4)[None], {"n_features": 0}, "n_features must be one number >= 1"),
        (
            np.eye(4)[None],
            {"uniforms": np.zeros((10, 2))},
            r"uniforms must have shape \(n_init, n_clusters, trials\)",
        ),
        (np.eye(4)[None], {"uniforms": np.zeros((3, 2, 2))}, r"= \(10, 2, ≥ 1\), got \(3, 2, 2\)"),
    ],
)
def test_bad_arguments_raise(gram: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gram_kmeans(gram, **{"n_clusters": 2, **kwargs})


@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_sketch_kmeans_inertia_close_to_sklearn(seed) -> None:
    # Overlapping blobs in 256 dimensions, more than the sketch's 64 columns: the restarts see a projection.
    from lego_viz.units.sketch_kmeans import sketch_kmeans

    points, _ = make_blobs(n_samples=2500, n_features=256, centers=12, cluster_std=4.0, random_state=seed)
    points = points.astype(np.float32)
    labels, inertia = sketch_kmeans(points, 12, seed=seed, sketch_dim=64)
    reference = KMeans(12, n_init=10, random_state=seed).fit(points.astype(np.float64)).inertia_
    # A local optimum like scikit-learn's: within 3% (the sketch ranks restarts only roughly).
    assert inertia <= 1.03 * reference
    assert labels.shape == (2500,) and sorted(set(labels.tolist())) == list(range(12))
    # The inertia returned is that of the labels, on the full points.
    recomputed = sum(float(np.square(points[labels == j] - points[labels == j].mean(0)).sum()) for j in range(12))
    assert inertia == pytest.approx(recomputed, rel=1e-4)


def test_numpy_sketch_kmeans_separates_clusters_and_checks_its_input() -> None:
    from lego_viz.units.sketch_kmeans import sketch_kmeans

    rng = np.random.default_rng(0)
    truth = np.arange(400) % 5
    points = (10 * rng.standard_normal((5, 300)))[truth] + rng.standard_normal((400, 300))
    labels, _ = sketch_kmeans(points, 5, n_init=4, seed=1, sketch_dim=32)
    pairs = set(zip(truth.tolist(), labels.tolist()))  # one found cluster per true cluster
    assert len(pairs) == 5 and len({f for _, f in pairs}) == 5
    assert np.array_equal(sketch_kmeans(points, 5, seed=1)[0], sketch_kmeans(points, 5, seed=1)[0])
    with pytest.raises(ValueError, match="n_clusters"):
        sketch_kmeans(points, 401)
    points[3, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sketch_kmeans(points, 5)
