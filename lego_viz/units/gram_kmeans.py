"""Batched k-means on Gram matrices, numpy only (no torch: the merge CLI must not pay its import).

k-means only needs squared distances, and with centroids written as weighted
sums of points, ``c_j = Σ_i W[j, i] x_i``, those only need the Gram matrix
``G = X Xᵀ``:

    ‖x_i − c_j‖² = G[i, i] − 2 (W G)[j, i] + (W G Wᵀ)[j, j]

So every seeding step and Lloyd iteration costs ``O(k n²)`` whatever the
feature dimension, and problems of equal size ``n`` (the modules of a model,
times the ``n_init`` restarts) run together as one batched matmul. Centroids
are never formed here; :func:`lego_viz.units.kmeans.cluster_means` builds them from
the labels.

The algorithm mirrors scikit-learn's ``KMeans(init="k-means++",
algorithm="lloyd")``: greedy k-means++ with ``2 + ln k`` local trials, Lloyd
iterations stopped on unchanged labels or a centre shift below ``tol`` times
the mean per-feature variance, empty clusters re-seeded with the points
farthest from their centroid, a final assignment step, and the best of
``n_init`` restarts by inertia.

The seeding draws are torch's (:func:`torch_compatible_uniforms`), so results
are those of the earlier torch kernel and of :mod:`lego_viz.units.kmeans`, which
passes draws from a torch generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from numbers import Integral, Real

import numpy as np

__all__ = ["gram_kmeans", "torch_compatible_uniforms"]

_CHUNK_ELEMENTS = 1 << 18


def torch_compatible_uniforms(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Torch's float64 uniform draws, bit for bit, without torch.

    Equal to ``torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)``,
    so a seed gives the clusters it gave the earlier torch kernel, and the same as
    :mod:`lego_viz.units.kmeans`, whose callers hand in torch generators. Torch's CPU
    generator is MT19937 seeded with the low 32 bits of the seed — numpy's ``RandomState`` — and
    makes each float64 from two consecutive 32-bit outputs, the first one high:
    ``((hi << 32 | lo) mod 2**53) · 2**−53``.

    Args:
        seed: An integer torch accepts, ``−2**63 ≤ seed < 2**64``.
        shape: Shape of the draws.

    Returns:
        float64 array of ``shape``, values in ``[0, 1)``.
    """
    if not _is_int(seed) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an integer with -2**63 <= seed < 2**64 (as torch's), got {seed!r}")
    words = np.random.RandomState(seed & 0xFFFFFFFF).randint(
        0, 2**32, size=2 * math.prod(shape), dtype=np.uint32
    )
    words = words.astype(np.uint64)
    bits = ((words[0::2] << np.uint64(32)) | words[1::2]) & np.uint64((1 << 53) - 1)
    return (bits.astype(np.float64) * 2.0**-53).reshape(shape)


def gram_kmeans(
    gram: np.ndarray,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    n_features: int | Sequence[int] | np.ndarray | None = None,
    uniforms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding on a batch of Gram matrices.

    Args:
        gram: Gram matrices ``X Xᵀ`` of equal-size problems, shape ``(batch, n, n)``,
            float32 or float64 (other dtypes are computed in float32).
        n_clusters: Number of clusters ``k``, ``1 ≤ k ≤ n``.
        n_init: Restarts per problem; the lowest inertia wins.
        max_iter: Maximum Lloyd iterations per restart.
        tol: Convergence threshold on the total squared centre shift, relative to the
            data's mean per-feature variance as in scikit-learn.
        seed: Seed of the k-means++ draws (:func:`torch_compatible_uniforms`); the same
            draws serve every problem, so results do not depend on batching.
        n_features: Feature dimension ``d`` of the points behind ``gram`` — one for all
            problems or one per problem — used only to turn total variance into mean
            per-feature variance for ``tol``; defaults to ``n`` (the dimension of the span of
            the centred points, plus one).
        uniforms: Instead of ``seed``: the draws themselves, ``(n_init, k, local trials)`` in
            ``[0, 1)`` (float64; computed in the dtype of ``gram``).

    Returns:
        ``(labels, inertia, n_iter)``: labels ``(batch, n)`` int64, inertia ``(batch,)`` —
        the sum of squared distances of points to the mean of their cluster — and the
        Lloyd iterations of the winning restart ``(batch,)`` int64.
    """
    gram = np.asarray(gram)
    check_gram(gram.shape)
    check_params(n_clusters, gram.shape[-1], n_init, max_iter, tol)
    if gram.dtype not in (np.float32, np.float64):
        gram = gram.astype(np.float32)
    b, n, _ = gram.shape
    dims = np.asarray(n if n_features is None else n_features, dtype=gram.dtype)
    if dims.ndim > 1 or (dims.ndim == 1 and dims.shape[0] != b) or not bool((dims >= 1).all()):
        raise ValueError(f"n_features must be one number >= 1 or one per problem ({b}), got {n_features!r}")
    dims = np.broadcast_to(dims, (b,))
    if uniforms is None:
        uniforms = torch_compatible_uniforms(seed, (n_init, n_clusters, n_local_trials(n_clusters)))
    uniforms = np.asarray(uniforms)
    if uniforms.ndim != 3 or uniforms.shape[:2] != (n_init, n_clusters) or uniforms.shape[2] < 1:
        raise ValueError(
            f"uniforms must have shape (n_init, n_clusters, trials) = ({n_init}, {n_clusters}, ≥ 1), "
            f"got {uniforms.shape}"
        )
    uniforms = uniforms.astype(gram.dtype)
    if b == 0:
        return np.empty((0, n), dtype=np.int64), np.empty(0, dtype=gram.dtype), np.empty(0, dtype=np.int64)
    # Chunks of problems keep the (chunk, n, n_init, k) work arrays near cache size, and every chunk
    # reuses the same ones: writing to fresh memory (page faults) costs more than the arithmetic.
    chunk = min(b, max(1, _CHUNK_ELEMENTS // (n_init * n_clusters * n)))
    work = np.empty((4, chunk, n, n_init, n_clusters), dtype=gram.dtype)
    grams = np.empty((2, chunk, n, n), dtype=gram.dtype)
    results = []
    for start in range(0, b, chunk):
        stop = min(start + chunk, b)
        part = slice(start, stop)
        results.append(
            _kmeans_chunk(gram[part], n_clusters, uniforms, max_iter, tol, dims[part], work, grams)
        )
    labels, inertia, n_iter = (np.concatenate(parts) for parts in zip(*results))
    return labels, inertia, n_iter


def n_local_trials(k: int) -> int:
    # scikit-learn's number of k-means++ candidates per centre.
    return 2 + int(math.log(k))


def _kmeans_chunk(
    gram: np.ndarray,
    k: int,
    uniforms: np.ndarray,
    max_iter: int,
    tol: float,
    n_features: np.ndarray,
    work: np.ndarray,
    grams: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # work: (4, ≥ b, n, r, k) and grams: (2, ≥ b, n, n) scratch arrays.
    b, n, _ = gram.shape
    work, grams = work[:, :b], grams[:, :b]
    gram = _double_centre(gram, out=grams[0])
    tol_abs = tol * _diagonal(gram).sum(axis=-1) / (n * n_features)  # (b,)
    seeds = _kmeans_plusplus(gram, k, uniforms)  # (b, r, k)
    labels, n_iter = _lloyd(gram, seeds, max_iter, tol_abs, work, grams[1])
    inertia = _inertia(gram, labels, k, work)  # (b, r)
    best = inertia.argmin(axis=-1)  # first restart on ties, like scikit-learn
    problems = np.arange(b)
    return labels[problems, best], inertia[problems, best], n_iter[problems, best]


def _diagonal(gram: np.ndarray) -> np.ndarray:
    return np.diagonal(gram, axis1=-2, axis2=-1)


def _double_centre(gram: np.ndarray, out: np.ndarray) -> np.ndarray:
    # Same as centring the (unknown) points: distances are unchanged, and
    # G[i,i] no longer carries a large common offset that float32 would cancel.
    row = gram.mean(axis=-1, keepdims=True)
    np.subtract(gram, row, out=out)
    out -= row.swapaxes(-1, -2)
    out += row.mean(axis=-2, keepdims=True)
    return out


def _cluster_sizes(labels: np.ndarray, k: int) -> np.ndarray:
    # (..., n) -> (..., k) int64, one bincount for all rows.
    rows = labels.reshape(-1, labels.shape[-1])
    offsets = np.arange(rows.shape[0])[:, None] * k
    return np.bincount((rows + offsets).ravel(), minlength=rows.shape[0] * k).reshape(*labels.shape[:-1], k)


def _assignment_weights(labels: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    # labels (b, r, n) -> centre weights (b, n, r, k), written to ``out``, that average each cluster's members.
    # Points-major so the argmin over k and the matmul with G both run on contiguous memory.
    b, r, n = labels.shape
    own = labels + np.arange(b * r).reshape(b, r, 1) * k  # each point's cluster among all b·r·k
    share = 1.0 / _cluster_sizes(labels, k).reshape(-1)[own].astype(out.dtype)
    out.fill(0)
    np.put(out, np.arange(b * n * r).reshape(b, n, r) * k + labels.swapaxes(1, 2), share.swapaxes(1, 2))
    return out


def _kmeans_plusplus(gram: np.ndarray, k: int, uniforms: np.ndarray) -> np.ndarray:
    """Greedy k-means++ seeds for every (problem, restart) pair.

    ``gram`` is (b, n, n); ``uniforms`` is (r, k, local trials) in [0, 1) and
    is shared by all problems so a problem's seeds do not depend on its
    position in the batch. Returns seed indices (b, r, k).
    """
    b, n, _ = gram.shape
    r = uniforms.shape[0]
    diag = _diagonal(gram)  # (b, n)
    problems, restarts = np.arange(b)[:, None], np.arange(r)

    def dist_to(idx: np.ndarray) -> np.ndarray:
        # idx (b, r, m) -> squared distances (b, r, m, n); (g_ii + g_jj) - 2 g_ij is exactly 0 for i == j.
        dist = diag[:, None, None, :] + diag[problems[..., None], idx][..., None]
        rows = gram[problems[..., None], idx]
        rows *= 2
        dist -= rows
        return np.maximum(dist, 0, out=dist)

    first = np.minimum((uniforms[None, :, 0, :1] * n).astype(np.int64), n - 1)
    seeds = [np.broadcast_to(first, (b, r, 1))]
    closest = dist_to(seeds[0])[:, :, 0]  # (b, r, n)
    for step in range(1, k):
        # Accumulated in float64 like torch's CPU cumsum, so the candidates are the torch kernel's.
        cumulative = np.cumsum(closest, axis=-1, dtype=np.float64).astype(closest.dtype)
        targets = uniforms[None, :, step, :] * cumulative[..., -1:]  # (b, r, trials)
        # searchsorted (left) on every row at once: the number of partial sums below the target.
        candidates = np.minimum((cumulative[:, :, None, :] < targets[..., None]).sum(axis=-1), n - 1)
        with_candidate = dist_to(candidates)  # (b, r, trials, n)
        np.minimum(with_candidate, closest[:, :, None, :], out=with_candidate)
        best = with_candidate.sum(axis=-1).argmin(axis=-1)  # (b, r)
        seeds.append(candidates[problems, restarts, best][..., None])
        closest = with_candidate[problems, restarts, best]
    return np.concatenate(seeds, axis=-1)


def relocate_empty(labels: np.ndarray, point_dist: Callable[[], np.ndarray], k: int) -> np.ndarray:
    """Move the points farthest from their centroid into empty clusters (scikit-learn's rule).

    ``labels`` is (..., n); ``point_dist`` gives the points' (..., n) distances to their
    centroid, and is only called when a cluster is empty (rarely; they cost a pass over the
    scores). Each cluster keeps its point nearest to the centroid, so a relocation cannot empty
    another cluster — even when several empty clusters are filled at once and the farthest
    points (e.g. duplicates, tied in distance) share one cluster. Ties in distance go to the
    lower index.
    """
    counts = _cluster_sizes(labels, k)
    empty = counts == 0
    if not empty.any():
        return labels
    dist = point_dist()
    n = labels.shape[-1]
    # Rank of each point within its own cluster, farthest first: the farthest size − 1 may move.
    by_dist = np.argsort(-dist, axis=-1, kind="stable")
    sorted_labels = np.take_along_axis(labels, by_dist, axis=-1)
    members = np.zeros((*labels.shape, k), dtype=np.int64)
    np.put_along_axis(members, sorted_labels[..., None], 1, axis=-1)
    seen_before = np.take_along_axis(members.cumsum(axis=-2), sorted_labels[..., None], axis=-1)[..., 0] - 1
    movable = np.empty(labels.shape, dtype=bool)
    np.put_along_axis(
        movable, by_dist, seen_before < np.take_along_axis(counts, sorted_labels, axis=-1) - 1, axis=-1
    )
    order = np.argsort(-np.where(movable, dist, -1.0), axis=-1, kind="stable")
    rank = np.maximum(empty.cumsum(axis=-1) - 1, 0)
    chosen = np.take_along_axis(order, rank, axis=-1)  # (..., k): the point each empty cluster takes
    # Non-empty clusters write into a spare slot n, dropped afterwards.
    target = np.where(empty, chosen, n)
    padded = np.concatenate([labels, np.zeros((*labels.shape[:-1], 1), dtype=labels.dtype)], axis=-1)
    np.put_along_axis(padded, target, np.broadcast_to(np.arange(k), target.shape), axis=-1)
    return padded[..., :n]


def _centre_products(gram: np.ndarray, weights: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # weights (b, n, r, k) -> G W = (W G)ᵀ (b, n, r, k), written to ``out``, and ‖c‖² = diag(W G Wᵀ) (b, r, k);
    # one matmul for all restarts.
    b, n, r, k = weights.shape
    np.matmul(gram, weights.reshape(b, n, r * k), out=out.reshape(b, n, r * k))
    return out, np.einsum("bnrk,bnrk->brk", out, weights)


def _nearest(gw: np.ndarray, norms: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # G W (b, n, r, k) and ‖c‖² (b, r, k) -> each point's nearest centre (b, r, n), first on ties like torch's
    # min. ``scores`` receives ‖c_j‖² − 2 x_i·c_j, the squared distances minus G[i, i].
    np.multiply(gw, -2, out=scores)
    scores += norms[:, None]
    return scores.argmin(axis=-1).swapaxes(1, 2)


def _point_dist(scores: np.ndarray, labels: np.ndarray, diag: np.ndarray) -> np.ndarray:
    # Squared distance of each point to the centre of its label (b, r, n), from the scores (b, n, r, k) and
    # the diagonal of G (b, 1, n); exactly 0 for a singleton.
    own = np.take_along_axis(scores, labels.swapaxes(1, 2)[..., None], axis=-1)[..., 0]  # (b, n, r)
    return np.maximum(diag + own.swapaxes(1, 2), 0)


def _lloyd(
    gram: np.ndarray, seeds: np.ndarray, max_iter: int, tol_abs: np.ndarray, work: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations for all (problem, restart) pairs from the seed points (b, r, k).

    Returns labels (b, r, n) and iterations (b, r). Problems whose restarts have
    all converged leave the working batch, so the cost follows the iterations
    each problem needs rather than the slowest one. ``work`` (4, b, n, r, k) and
    ``g`` (b, n, n) are scratch arrays.
    """
    b, r, k = seeds.shape
    n = gram.shape[-1]
    diag = _diagonal(gram)[:, None, :]  # (b, 1, n)
    labels = np.full((b, r, n), -1, dtype=np.int64)
    n_iter = np.zeros((b, r), dtype=np.int64)
    # Restarts stopped by the shift threshold (labels still moving) get a last assignment step.
    needs_final = np.zeros((b, r), dtype=bool)
    active = np.ones((b, r), dtype=bool)
    idx = np.arange(b)  # problems still in the working batch, the first len(idx) of g and the work arrays
    # Centre weights (b, n, r, k): each centre starts as its seed point.
    weights, spare, scores, gw = work
    weights.fill(0)
    np.put_along_axis(weights, seeds[:, None], 1.0, axis=1)
    np.copyto(g, gram)
    gw, norms = _centre_products(g, weights, gw)
    for _ in range(max_iter):
        m = idx.shape[0]
        lab_old, act = labels[idx], active[idx]
        nearest = _nearest(gw, norms, scores[:m])
        all_active = bool(act.all())
        lab = nearest if all_active else np.where(act[..., None], nearest, lab_old)
        stable = (lab == lab_old).all(axis=-1)
        lab = relocate_empty(lab, partial(_point_dist, scores[:m], nearest, diag[idx]), k)
        if not all_active:
            # A converged restart keeps its labels, and so its centres, while its problem's others go on.
            lab = np.where(act[..., None], lab, lab_old)
        w_new = _assignment_weights(lab, k, spare[:m])
        gw, new_norms = _centre_products(g, w_new, gw)
        cross = np.einsum("bnrk,bnrk->brk", gw, weights)
        shift = (new_norms - 2 * cross + norms).sum(axis=-1)  # Σ_j ‖c_j − c_j_old‖²
        n_iter[idx] += act
        done = act & (stable | (shift <= tol_abs[idx, None]))
        needs_final[idx] |= done & ~stable
        active[idx] = act & ~done
        labels[idx] = lab
        weights, spare, norms = w_new, weights, new_norms  # the old weights' array takes the next step's
        keep = active[idx].any(axis=-1)
        if not keep.any():
            break
        if not keep.all():
            idx, norms = idx[keep], norms[keep]
            g, weights, gw = _keep_rows(keep, g, weights, gw)
    needs_final |= active  # max_iter reached
    if needs_final.any():
        weights, gw, scores = work[:3]
        gw, norms = _centre_products(gram, _assignment_weights(labels, k, weights), gw)
        reassigned = _nearest(gw, norms, scores)
        # Moving a far point into an emptied cluster only lowers the inertia, and the merge needs k units.
        reassigned = relocate_empty(reassigned, partial(_point_dist, scores, reassigned, diag), k)
        labels = np.where(needs_final[..., None], reassigned, labels)
    return labels, n_iter


def _keep_rows(keep: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Moves the kept rows (axis 0) of each array to its front, in place (no fresh memory), and returns those.
    rows = np.flatnonzero(keep)
    for array in arrays:
        for dst, src in enumerate(rows):  # dst <= src, ascending: no row is overwritten before it moves
            if dst != src:
                array[dst] = array[src]
    return tuple(array[: rows.shape[0]] for array in arrays)


def _inertia(gram: np.ndarray, labels: np.ndarray, k: int, work: np.ndarray) -> np.ndarray:
    # Σ_i ‖x_i − mean of its cluster‖², labels (b, r, n) -> (b, r); per-point terms are exactly 0 for singletons.
    weights, gw = work[:2]
    gw, norms = _centre_products(gram, _assignment_weights(labels, k, weights), gw)
    own_gw = np.take_along_axis(gw, labels.swapaxes(1, 2)[..., None], axis=-1)[..., 0]  # (b, n, r)
    # The score _nearest gives each point's own centre:
    own = np.take_along_axis(norms, labels, axis=-1) - 2 * own_gw.swapaxes(1, 2)  # (b, r, n)
    return np.maximum(_diagonal(gram)[:, None, :] + own, 0).sum(axis=-1)


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_gram(shape: tuple[int, ...]) -> None:
    if len(shape) != 3 or shape[-1] != shape[-2]:
        raise ValueError(f"gram must have shape (batch, n, n), got {tuple(shape)}")


def check_params(n_clusters: int, n: int, n_init: int, max_iter: int, tol: float) -> None:
    if not _is_int(n_clusters) or not 1 <= n_clusters <= n:
        raise ValueError(
            f"n_clusters must be an integer with 1 <= n_clusters <= n_samples = {n}, got {n_clusters!r}"
        )
    if not _is_int(n_init) or n_init < 1:
        raise ValueError(f"n_init must be a positive integer, got {n_init!r}")
    if not _is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
