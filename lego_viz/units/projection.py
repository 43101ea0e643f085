"""2-D maps of MSU feature vectors: UMAP (default) or PCA, with a bounded cache.

`import umap` and its first fit are slow (numba compiles its kernels once per
process), so `warm_up()` does both in a background thread at app start and
`project` waits for it instead of compiling a second time. Projections are
cached by a hash of the feature bytes and the settings, so the cache is safe
to share between sessions: equal inputs give equal maps, whoever asks.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

PROJECTION_METHODS = ("umap", "pca")

# Below this many points UMAP's neighbour graph is meaningless; PCA is used instead.
MIN_UMAP_POINTS = 5


@dataclass(frozen=True)
class ProjectionConfig:
    """Settings of a 2-D projection.

    Args:
        method: "umap" or "pca".
        n_neighbors: UMAP neighbourhood size (clipped to n - 1 for small inputs).
        min_dist: UMAP minimum distance between embedded points.
        seed: random seed, so the same input always gives the same map.
        n_epochs: UMAP optimisation epochs; umap's own default (None) is 500 below 10,000 points,
            which costs ~5x more than 200 and changes little for maps of a few hundred MSUs.
    """

    method: str = "umap"
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 0
    n_epochs: int | None = 200

    def __post_init__(self) -> None:
        if self.method not in PROJECTION_METHODS:
            raise ValueError(f"unknown projection method {self.method!r}; expected one of {PROJECTION_METHODS}")
        if self.n_neighbors < 2:
            raise ValueError(f"n_neighbors must be at least 2, got {self.n_neighbors}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ValueError(f"min_dist must be in [0, 1], got {self.min_dist}")
        if self.n_epochs is not None and self.n_epochs < 1:
            raise ValueError(f"n_epochs must be positive (or None for umap's default), got {self.n_epochs}")


def _check_features(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D (n_points, dim) tensor, got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("nothing to project: the selection has no MSUs")
    features = features.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features


def _fix_signs(coords: torch.Tensor) -> torch.Tensor:
    # Principal axes have no intrinsic sign; fixing it keeps maps stable across calls.
    flip = torch.sign(coords.gather(0, coords.abs().argmax(dim=0, keepdim=True)))
    flip[flip == 0] = 1.0
    return coords * flip


def pca_2d(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Project points onto their two leading principal axes.

    Args:
        features: (n, d) points.
        seed: seed of the randomised SVD (it converges to the exact axes; the seed only fixes float noise).

    Returns:
        (n, 2) float32 coordinates; columns beyond the data's rank are zero.
    """
    features = _check_features(features)
    centered = features - features.mean(dim=0, keepdim=True)
    n, d = centered.shape
    q = min(8, n, d)
    if q == 0 or not centered.any():
        return torch.zeros(n, 2)
    # Randomised SVD: ~25x faster than a full SVD at 4000 x 1536 and exact for the top axes after a few power steps.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(centered, q=q, niter=6)
    coords = torch.zeros(n, 2)
    m = min(2, q)
    coords[:, :m] = u[:, :m] * s[:m]
    return _fix_signs(coords)


class _UmapLoader:
    """Imports umap and compiles its numba kernels once per process, optionally in the background."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._module = None
        self._error: BaseException | None = None

    def start(self) -> threading.Thread:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._load, name="umap-warm-up", daemon=True)
                self._thread.start()
            return self._thread

    def _load(self) -> None:
        try:
            import umap

            self._module = umap
            # A tiny fit with the real settings triggers the numba compilation of the exact-kNN path used below 4096 points.
            points = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
            _run_umap(umap, points, ProjectionConfig())
        except BaseException as exc:  # kept and re-raised in the caller's thread
            self._error = exc

    def ready(self) -> bool:
        return self._thread is not None and not self._thread.is_alive() and self._error is None

    def module(self):
        self.start().join()
        if self._error is not None:
            raise RuntimeError(f"UMAP is unavailable ({self._error}); choose the PCA projection instead") from self._error
        return self._module


_UMAP = _UmapLoader()


def warm_up(block: bool = False) -> threading.Thread:
    """Import umap and compile its kernels in a background thread (idempotent).

    Args:
        block: wait until the warm-up has finished.

    Returns:
        The warm-up thread.
    """
    thread = _UMAP.start()
    if block:
        thread.join()
    return thread


def umap_ready() -> bool:
    """Whether UMAP is imported and compiled, so a fit will not pay the one-off start-up cost."""
    return _UMAP.ready()


def _umap_init(features: torch.Tensor, seed: int) -> torch.Tensor:
    # umap's own "pca" init runs a full LAPACK SVD, measured at ~2 s for 192 x 256 on a busy 2-core
    # machine (BLAS threads fighting); the randomised torch PCA gives the same start in ~10 ms.
    coords = pca_2d(features, seed=seed)
    coords = coords * (10.0 / coords.abs().max().clamp_min(1e-12))  # umap scales its init into [-10, 10]
    noise = torch.randn(coords.shape, generator=torch.Generator().manual_seed(seed)) * 1e-4  # separates duplicate MSUs
    return coords + noise


def _run_umap(umap_module, features: torch.Tensor, config: ProjectionConfig) -> torch.Tensor:
    n = features.shape[0]
    reducer = umap_module.UMAP(
        n_components=2,
        n_neighbors=min(config.n_neighbors, n - 1),
        min_dist=config.min_dist,
        n_epochs=config.n_epochs,
        # A PCA start, not spectral: spectral init fails on the disconnected graphs well-separated adapters produce.
        init=_umap_init(features, config.seed).numpy(),
        random_state=config.seed,
        n_jobs=1,  # a fixed random_state forces one thread anyway; saying so silences umap's warning
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coords = reducer.fit_transform(features.numpy())
    return torch.as_tensor(coords, dtype=torch.float32)


def project(features: torch.Tensor, config: ProjectionConfig = ProjectionConfig()) -> torch.Tensor:
    """Project points to 2-D.

    Args:
        features: (n, d) points, e.g. the MSU features k-means sees.
        config: method and its settings. UMAP falls back to PCA below `MIN_UMAP_POINTS` points.

    Returns:
        (n, 2) float32 coordinates.
    """
    features = _check_features(features)
    if config.method == "pca" or features.shape[0] < MIN_UMAP_POINTS:
        return pca_2d(features, seed=config.seed)
    return _run_umap(_UMAP.module(), features, config)


def features_key(features: torch.Tensor) -> str:
    """A content hash of a feature matrix (shape, dtype and bytes)."""
    data = features.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(data.shape)}|{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class ProjectionCache:
    """A thread-safe LRU of projections keyed by (feature content hash, config).

    Args:
        max_entries: how many projections to keep (each is only n x 2 floats).
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, ProjectionConfig], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def project(self, features: torch.Tensor, config: ProjectionConfig = ProjectionConfig()) -> torch.Tensor:
        """Like `project`, but returns a cached copy when the same features and config were seen before."""
        key = (features_key(features), config)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key].clone()
        # Computed outside the lock so one slow UMAP fit does not block other sessions' cache hits.
        coords = project(features, config)
        with self._lock:
            self.misses += 1
            self._entries[key] = coords
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return coords.clone()
