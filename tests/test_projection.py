"""Tests of lego_viz.units.projection: PCA exactness, UMAP determinism and separation, the cache."""

import pytest
import torch

from lego_viz.units.projection import (
    MIN_UMAP_POINTS,
    ProjectionCache,
    ProjectionConfig,
    features_key,
    pca_2d,
    project,
    umap_ready,
    warm_up,
)


def _points(n: int = 40, d: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A clear spectrum (std 5, 2, then 0.1) so the two leading axes are well defined.
    scales = torch.tensor([5.0, 2.0] + [0.1] * (d - 2))
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    return (torch.randn(n, d, generator=gen) * scales) @ basis.T + 3.0


def _blobs(n_per: int = 30, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=gen) * 20.0
    labels = torch.arange(3).repeat_interleave(n_per)
    return centres[labels] + torch.randn(3 * n_per, d, generator=gen), labels


def test_pca_matches_full_svd_up_to_sign():
    x = _points()
    coords = pca_2d(x)
    centered = x - x.mean(0)
    u, s, _ = torch.linalg.svd(centered, full_matrices=False)
    expected = u[:, :2] * s[:2]
    signs = torch.sign((coords * expected).sum(0))
    # float32 randomised SVD with 6 power steps on a 25:1 spectrum gap: agrees to ~1e-4 relative.
    torch.testing.assert_close(coords, expected * signs, rtol=1e-3, atol=1e-3)


def test_pca_is_sign_stable():
    # Negating the data negates the scores; the sign fix must undo that.
    x = _points()
    torch.testing.assert_close(pca_2d(x), pca_2d(-x), rtol=1e-4, atol=1e-4)


def test_pca_of_rank_one_data_has_a_zero_second_axis():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 1, generator=gen) * torch.randn(1, 7, generator=gen)
    coords = pca_2d(x)
    assert coords[:, 0].abs().max() > 1e-2
    # float32 round-off of a rank-one matrix: residual axis below 1e-4 of the first.
    assert coords[:, 1].abs().max() < 1e-4 * coords[:, 0].abs().max()


@pytest.mark.parametrize("n", [1, 2])
def test_pca_of_tiny_inputs(n):
    coords = pca_2d(torch.ones(n, 3))
    assert coords.shape == (n, 2)
    assert torch.equal(coords, torch.zeros(n, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "tsne"}, "unknown projection method"),
        ({"n_neighbors": 1}, "n_neighbors"),
        ({"min_dist": 2.0}, "min_dist"),
        ({"n_epochs": 0}, "n_epochs"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectionConfig(**kwargs)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.zeros(0, 4), "no MSUs"),
        (torch.zeros(4), "2-D"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN"),
    ],
)
def test_project_rejects_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        project(features, ProjectionConfig(method="pca"))


def test_umap_falls_back_to_pca_below_min_points():
    x = _points(n=MIN_UMAP_POINTS - 1)
    assert torch.equal(project(x, ProjectionConfig(method="umap")), pca_2d(x))


def test_warm_up_is_idempotent():
    first = warm_up()
    assert warm_up() is first


@pytest.mark.slow
def test_umap_is_deterministic_and_keeps_clusters_apart():
    warm_up(block=True)
    assert umap_ready()
    x, labels = _blobs()
    config = ProjectionConfig(method="umap", seed=3)
    coords = project(x, config)
    assert coords.shape == (x.shape[0], 2)
    assert torch.equal(coords, project(x, config))
    # Blobs 20 std apart must stay apart: every point is nearer its own blob's 2-D centre than any other.
    centres = torch.stack([coords[labels == c].mean(0) for c in range(3)])
    assert torch.equal(torch.cdist(coords, centres).argmin(1), labels)


def test_features_key_depends_on_content_and_shape():
    x = _points()
    assert features_key(x) == features_key(x.clone())
    assert features_key(x) != features_key(x + 1e-6)
    assert features_key(x) != features_key(x.reshape(20, 24))


def test_cache_hits_misses_and_eviction():
    cache = ProjectionCache(max_entries=2)
    pca = ProjectionConfig(method="pca")
    a, b, c = _points(seed=0), _points(seed=1), _points(seed=2)
    first = cache.project(a, pca)
    first.add_(100.0)  # callers get copies, so mutating one must not poison the cache
    torch.testing.assert_close(cache.project(a.clone(), pca), pca_2d(a))
    assert (cache.hits, cache.misses) == (1, 1)
    cache.project(a, ProjectionConfig(method="pca", seed=1))  # another config is another entry
    assert cache.misses == 2
    cache.project(b, pca)
    cache.project(c, pca)
    assert len(cache) == 2
    cache.project(a, pca)  # evicted as least recently used
    assert cache.misses == 5


def test_cache_rejects_zero_capacity():
    with pytest.raises(ValueError, match="max_entries"):
        ProjectionCache(max_entries=0)
