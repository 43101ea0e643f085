"""Tests of lego_viz.units.kmeans: agreement with scikit-learn, batching, determinism, edge cases, validation."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from lego_viz.units.gram_kmeans import gram_kmeans
from lego_viz.units.kmeans import GramKMeans, cluster_means, pairwise_gram
from lego_viz.units.kmeans import _relocate_empty as relocate_empty


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) + 4.0  # off-centre on purpose: Gram entries carry a big offset


def _blobs(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    x, _ = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=1.5, random_state=seed)
    return torch.tensor(x, dtype=torch.float32)


def _inertia_from_labels(x: torch.Tensor, labels: torch.Tensor) -> float:
    x64 = x.double()
    return sum(float(((x64[labels == j] - x64[labels == j].mean(dim=0)) ** 2).sum()) for j in labels.unique())


def _first_seen_order(labels: torch.Tensor) -> torch.Tensor:
    # Relabel clusters by first appearance, so equal partitions compare equal whatever their cluster ids.
    ids = dict.fromkeys(labels.tolist())
    mapping = {old: new for new, old in enumerate(ids)}
    return torch.tensor([mapping[v] for v in labels.tolist()])


def _sklearn_inertia(x: torch.Tensor, k: int, seed: int) -> float:
    return float(KMeans(k, init="k-means++", n_init=10, random_state=seed).fit(x.numpy()).inertia_)


@pytest.mark.parametrize(
    ("n", "d", "k", "seed"),
    [(150, 8, 5, 0), (240, 40, 12, 1), (96, 3, 4, 2), (200, 64, 20, 3), (128, 300, 16, 4)],
)
def test_inertia_matches_sklearn_on_blobs(n: int, d: int, k: int, seed: int) -> None:
    x = _blobs(n, d, k, seed)
    ours = GramKMeans(k, n_init=10, random_state=seed).fit(x)
    reference = _sklearn_inertia(x, k, seed)
    # inertia_ must be what it claims: float32 Gram arithmetic vs float64 direct sums.
    assert float(ours.inertia_) == pytest.approx(_inertia_from_labels(x, ours.labels_), rel=1e-4)
    # Separated blobs have one clear optimum; both implementations should reach it (issue: within 1%).
    assert float(ours.inertia_) <= 1.01 * reference


def test_inertia_no_worse_than_sklearn_on_average_for_gaussian_data() -> None:
    # Unstructured data has many local optima, so single runs of either implementation spread by a few
    # percent (scikit-learn against itself with another seed too); the mean over datasets averages that out.
    ratios = []
    for seed in range(12):
        n, d, k = 60 + 10 * seed, 2 + 3 * seed, 3 + seed % 7
        x = _gaussian(n, d, seed)
        ours = float(GramKMeans(k, n_init=10, random_state=seed).fit(x).inertia_)
        ratios.append(ours / _sklearn_inertia(x, k, seed))
    assert max(ratios) < 1.05
    assert np.mean(ratios) < 1.005


def test_batched_equals_unbatched() -> None:
    x = torch.stack([_blobs(90, 12, 6, seed) for seed in range(5)])  # (5, 90, 12)
    batched = GramKMeans(6, n_init=4, random_state=3).fit(x)
    for i in range(x.shape[0]):
        single = GramKMeans(6, n_init=4, random_state=3).fit(x[i])
        assert torch.equal(batched.labels_[i], single.labels_)
        # Same arithmetic per item; only the bmm blocking may differ (float32 rounding).
        assert torch.allclose(batched.inertia_[i], single.inertia_, rtol=1e-5)
        assert batched.n_iter_[i] == single.n_iter_


def test_batch_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.stack([_gaussian(40, 6, seed) for seed in range(7)])
    whole = GramKMeans(5, n_init=3, random_state=0).fit(x)
    monkeypatch.setattr("lego_viz.units.gram_kmeans._CHUNK_ELEMENTS", 1)  # one problem per chunk
    chunked = GramKMeans(5, n_init=3, random_state=0).fit(x)
    assert torch.equal(whole.labels_, chunked.labels_)
    assert torch.allclose(whole.inertia_, chunked.inertia_, rtol=1e-5)  # float32 rounding only


def test_per_problem_n_features_equals_separate_runs() -> None:
    # n_features only scales tol; a loose tol makes it matter, so each problem must get its own.
    x = torch.stack([_gaussian(60, 5, seed) for seed in range(3)])
    dims = [1, 50, 5000]
    batched = GramKMeans(4, n_init=2, tol=0.5, random_state=0).fit(gram=pairwise_gram(x), n_features=dims)
    for i, d in enumerate(dims):
        single = GramKMeans(4, n_init=2, tol=0.5, random_state=0).fit(gram=pairwise_gram(x[i]), n_features=d)
        assert torch.equal(batched.labels_[i], single.labels_)
        assert batched.n_iter_[i] == single.n_iter_
    with pytest.raises(ValueError, match=r"one per problem \(3\)"):
        GramKMeans(4).fit(gram=pairwise_gram(x), n_features=[1, 2])


def test_deterministic_for_fixed_random_state() -> None:
    x = _gaussian(120, 10, 7)
    first = GramKMeans(8, random_state=11).fit(x)
    second = GramKMeans(8, random_state=11).fit(x)
    assert torch.equal(first.labels_, second.labels_)
    assert torch.equal(first.inertia_, second.inertia_)


def test_gram_input_equals_point_input() -> None:
    x = _blobs(80, 9, 5, 5).double()
    from_points = GramKMeans(5, random_state=0).fit(x)
    # An uncentred Gram matrix: the estimator must not depend on where the origin is.
    from_gram = GramKMeans(5, random_state=0).fit(gram=x @ x.T, n_features=x.shape[1])
    # Restarts that reach the same optimum tie up to rounding, so the winner's cluster ids may differ.
    assert torch.equal(_first_seen_order(from_points.labels_), _first_seen_order(from_gram.labels_))
    assert torch.allclose(from_points.inertia_, from_gram.inertia_, rtol=1e-9)  # float64 throughout


def test_k_equals_n_gives_zero_inertia() -> None:
    x = _gaussian(30, 5, 1)
    fitted = GramKMeans(30, n_init=2, random_state=0).fit(x)
    assert float(fitted.inertia_) == 0.0  # every point is its own centre, exactly
    assert fitted.labels_.unique().numel() == 30


def test_k_equals_one_gives_total_variance() -> None:
    x = _gaussian(50, 7, 2).double()
    fitted = GramKMeans(1, random_state=0).fit(x)
    total = float(((x - x.mean(dim=0)) ** 2).sum())
    assert float(fitted.inertia_) == pytest.approx(total, rel=1e-10)  # float64 input stays float64
    assert torch.all(fitted.labels_ == 0)


def test_half_precision_input_is_computed_in_float32() -> None:
    x = _blobs(60, 8, 3, 9)
    fitted = GramKMeans(3, random_state=0).fit(x.to(torch.bfloat16))
    assert fitted.inertia_.dtype == torch.float32
    assert float(fitted.inertia_) == pytest.approx(
        _inertia_from_labels(x.bfloat16().float(), fitted.labels_), rel=1e-4
    )


def test_every_cluster_is_used() -> None:
    # Many more clusters than natural groups: without relocation some would end up empty.
    x = _blobs(64, 4, 2, 3)
    for k in (10, 32, 63):
        labels = GramKMeans(k, n_init=3, random_state=0).fit(x).labels_
        assert labels.unique().numel() == k


def test_relocate_empty_moves_the_farthest_point_of_a_shared_cluster() -> None:
    labels = torch.tensor([[0, 0, 0, 2, 2]])  # cluster 1 is empty
    dist = torch.tensor([[0.1, 5.0, 0.2, 9.0, 0.3]])  # point 3 is farthest overall
    moved = relocate_empty(labels, dist, 3)
    assert moved.tolist() == [[0, 0, 0, 1, 2]]
    # A point alone in its cluster is never taken, however far it is.
    alone = relocate_empty(torch.tensor([[0, 0, 2]]), torch.tensor([[0.5, 0.1, 9.0]]), 3)
    assert alone.tolist() == [[1, 0, 2]]


def test_relocate_empty_never_empties_a_donor_cluster() -> None:
    # Two empty clusters and the two farthest points share a cluster of two: taking both would
    # just move the hole; one of them must come from elsewhere.
    moved = relocate_empty(torch.tensor([[0, 0, 1, 1, 1]]), torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0]]), 4)
    assert sorted(moved[0].tolist()) == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("k", [9, 10, 12, 15])
def test_every_cluster_is_used_with_duplicated_points(k: int) -> None:
    # Each point twice, side by side (an adapter merged with a copy of itself, after the merge's
    # canonical ordering): copies tie in distance, so a relocation must not take both of a pair.
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    labels = GramKMeans(k, n_init=3, random_state=0).fit(x.repeat_interleave(2, dim=0)).labels_
    assert torch.bincount(labels, minlength=k).min().item() >= 1


def test_points_equal_the_kernel_on_their_centred_gram() -> None:
    # The estimator on points runs the numpy kernel on their centred Gram matrices with the torch
    # generator's draws, which the kernel's own seeding reproduces: the same clusters, bit for bit.
    x = torch.stack([_gaussian(50, 6, s) for s in range(3)])
    labels, inertia, n_iter = gram_kmeans(pairwise_gram(x).numpy(), 4, n_init=5, max_iter=50, tol=1e-4, seed=2, n_features=6)
    fitted = GramKMeans(4, n_init=5, max_iter=50, random_state=2).fit(x)
    assert np.array_equal(labels, fitted.labels_.numpy())
    assert np.array_equal(inertia, fitted.inertia_.numpy())
    assert np.array_equal(n_iter, fitted.n_iter_.numpy())
    assert labels.shape == (3, 50) and inertia.shape == (3,) and n_iter.shape == (3,)
    assert np.all((n_iter >= 1) & (n_iter <= 50))


def test_cluster_means() -> None:
    x = _gaussian(20, 4, 0)
    labels = torch.arange(20) % 3
    means = cluster_means(x, labels, 4)
    for j in range(3):
        assert torch.allclose(means[j], x[labels == j].mean(dim=0), atol=1e-6)  # float32 sums of 7 values
    assert torch.equal(means[3], torch.zeros(4))  # empty cluster


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_clusters": 0}, "1 <= n_clusters <= n_samples = 10"),
        ({"n_clusters": 11}, "1 <= n_clusters <= n_samples = 10, got 11"),
        ({"n_clusters": 2.5}, "n_clusters must be an integer"),
        ({"n_clusters": 2, "n_init": 0}, "n_init must be a positive integer"),
        ({"n_clusters": 2, "max_iter": 0}, "max_iter must be a positive integer"),
        ({"n_clusters": 2, "tol": -1.0}, "tol must be a finite number >= 0"),
    ],
)
def test_bad_parameters_raise_at_fit_time(kwargs: dict, message: str) -> None:
    estimator = GramKMeans(**kwargs)  # constructing never fails, as in scikit-learn
    with pytest.raises(ValueError, match=message):
        estimator.fit(_gaussian(10, 3, 0))


def test_bad_inputs_raise() -> None:
    x = _gaussian(10, 3, 0)
    with pytest.raises(ValueError, match="exactly one of X"):
        GramKMeans(2).fit(x, gram=x @ x.T)
    with pytest.raises(ValueError, match="exactly one of X"):
        GramKMeans(2).fit()
    with pytest.raises(ValueError, match=r"X must be a tensor of shape \(n, d\)"):
        GramKMeans(2).fit(torch.zeros(10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GramKMeans(2).fit(torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match=r"gram must have shape \(batch, n, n\)"):
        GramKMeans(2).fit(gram=torch.zeros(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_matches_cpu() -> None:
    x = _blobs(100, 16, 5, 0)
    cpu = GramKMeans(5, random_state=0).fit(x)
    gpu = GramKMeans(5, random_state=0, device="cuda").fit(x)
    assert gpu.labels_.device.type == "cuda"
    assert torch.equal(cpu.labels_, gpu.labels_.cpu())
    assert torch.allclose(cpu.inertia_, gpu.inertia_.cpu(), rtol=1e-4)  # different float32 kernels
