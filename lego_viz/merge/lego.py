"""LoRA-LEGO: cluster all units of a module with k-means and turn each cluster into one rank (ARCHITECTURE §4).

Up to :data:`~lego_viz.merge.first_pass.GRAM_UNITS` units per module, everything before the centroids
comes from two n×n Gram matrices per module and runs on numpy — features, canonical order, k-means
(:mod:`lego_viz.units.gram_kmeans`), the reweighted centroid coefficients and the report's products — and
the centroids themselves (``linf`` and ``lsq`` rescaled from the factors) are numpy products too, so a
merge of adapters on disk (the ``merge`` command) never needs torch. Past that (adapter libraries) k-means
runs on a sketch of the points (:mod:`lego_viz.units.sketch_kmeans`, numpy), in torch only on a GPU.
torch otherwise serves in-memory adapters' tensors.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.checks.invariance import factor_probes, span_probes
from lego_viz.checks.retention import ReportProducts
from lego_viz.merge.base import MergeMethod, MethodOutput, Option
from lego_viz.merge.first_pass import GRAM_UNITS, UnitSummary, one_blas_thread, read_stacked, summarize_module
from lego_viz.units.gram_kmeans import gram_kmeans
from lego_viz.units.msu import FEATURE_MODES, StackBuffer, stacked
from lego_viz.units.sketch_kmeans import sketch_kmeans as numpy_sketch_kmeans

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

PRESETS = {
    # The published behaviour, kept for comparison with the other presets.
    "paper": {"features": "raw", "param_reweight": "linf", "output_reweight": True},
}

LEGO_OPTIONS = {
    "features": Option("canonical", "what k-means sees: raw [ã; b̃], canonical (scale/sign fixed), normalized (directions)", choices=FEATURE_MODES),
    "param_reweight": Option("l2", "rescale each centroid to its members' mean norm (l2 / linf) or not", choices=("none", "l2", "linf")),
    "output_reweight": Option(True, "scale the merged update by sqrt(mean source rank / k)", kind=bool),
    "rescale": Option("none", "lsq: after clustering, fit one scale per merged rank so the merge is closest (Frobenius) "
                      "to the exact weighted sum; it replaces both reweightings' scales", choices=("none", "lsq")),
    "seed": Option(0, "k-means random seed", kind=int, minimum=0),
    "n_init": Option(10, "k-means restarts (best inertia kept)", kind=int, minimum=1, maximum=1000),
    "max_iter": Option(100, "Lloyd iterations per restart", kind=int, minimum=1, maximum=10000),
    "tol": Option(1e-4, "k-means convergence tolerance (relative centre shift)", kind=float, minimum=0.0),
    "device": Option("auto", "where the sketch k-means of adapter libraries runs: auto (cuda if present), cpu or cuda "
                     "(Gram k-means, O(k·n²) on n×n matrices, runs on the CPU)", choices=("auto", "cpu", "cuda")),
}

_TINY = 1e-30


def centroid_products(coef_a: np.ndarray, coef_b: np.ndarray, A, B):
    """``c_a = coef_a A`` (k, d_in) and ``c_b = coef_b Bᵀ`` (k, d_out) from the stacked factors.

    numpy arrays give numpy arrays; torch tensors give tensors on their device. On the CPU the
    products go through numpy's BLAS, ~1.5× faster than torch's for these thin products ((k, n) ×
    (n, d) with k, n ≤ 128; 0.43 s against 0.65 s at the reference shape).
    """
    if not isinstance(A, np.ndarray) and A.device.type != "cpu":
        left_a, left_b = torch.from_numpy(coef_a).to(A.device), torch.from_numpy(coef_b).to(A.device)
        return left_a @ A, (B @ left_b.T).T
    arrays = isinstance(A, np.ndarray)
    with one_blas_thread():
        c_a, c_b = coef_a @ (A if arrays else A.numpy()), ((B if arrays else B.numpy()) @ coef_b.T).T
    return (c_a, c_b) if arrays else (torch.from_numpy(c_a), torch.from_numpy(c_b))


@dataclass
class _Units:
    """What a module's merge needs to keep between the passes: O(n²), never O(n·d) (numpy).

    Unit i of the module is ``ã_i = α_i A[i]``, ``b̃_i = β_i B[:, i]`` (scale folded, weight on b).
    Every feature mode is the raw rows times a per-unit factor, so all Gram matrices come from the
    two raw Gram matrices ``A Aᵀ`` and ``Bᵀ B`` — one matmul pass over the weights.

    The arrays may carry a leading batch dimension (modules with as many units, stacked): the
    methods below then answer for every module at once, and :meth:`module` takes one out.
    """

    owners: list[int]  # adapter index of each block of units (a batch: of its first module)
    adapter_index: np.ndarray  # (n,) int64
    gram_a: np.ndarray | None  # (n, n) raw A Aᵀ; None on the sketch path (too many units)
    gram_b: np.ndarray | None  # (n, n) raw Bᵀ B
    avg_a: np.ndarray  # (n,) factor of A[i] in the vectors averaged into centroids
    avg_b: np.ndarray  # (n,)
    seen_a: np.ndarray  # (n,) factor of A[i] in what k-means sees
    seen_b: np.ndarray  # (n,)
    fold_a: np.ndarray  # (n,) factor of A[i] in the folded, weighted unit ã_i
    fold_b: np.ndarray  # (n,)
    sq_a: np.ndarray  # (n,) ‖A[i]‖² (the Gram diagonal)
    sq_b: np.ndarray  # (n,)

    def gram(self) -> np.ndarray:
        """Gram matrix of the features k-means sees, (n, n) (a batch: (m, n, n))."""
        sa, sb = self.seen_a, self.seen_b
        gram = sa[..., :, None] * self.gram_a
        gram *= sa[..., None, :]
        part = sb[..., :, None] * self.gram_b
        part *= sb[..., None, :]
        gram += part
        return gram

    def module(self, index: int, owners: list[int]) -> _Units:
        """Module ``index`` of a batch (views), whose units come from the adapters ``owners``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "owners"}
        return _Units(owners=owners, **{key: None if value is None else value[index] for key, value in fields.items()})

    @staticmethod
    def stack(units: Sequence[_Units]) -> _Units:
        """Modules with as many units as one batch (the ``owners`` of the first)."""
        fields = {f.name: [getattr(u, f.name) for u in units] for f in dataclasses.fields(_Units) if f.name != "owners"}
        return _Units(owners=units[0].owners, **{key: None if values[0] is None else np.stack(values)
                                                 for key, values in fields.items()})


def _sources(adapters: Sequence[LoraAdapter], weights: list[float], name: str) -> tuple[list[int], list[tuple[int, float, float]]]:
    """The adapters holding ``name`` and, per stacked unit, its adapter, ``α = √scale`` and ``β = √scale · w``."""
    present = [(t, a.modules[name]) for t, a in enumerate(adapters) if name in a.modules]
    units = [(t, lora.scale**0.5, lora.scale**0.5 * weights[t]) for t, lora in present for _ in range(lora.r)]
    return [t for t, _ in present], units


def _unit_table(units: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_sources`'s units (of one module, or a list of modules) as ``(owner, alpha, beta)`` arrays."""
    table = np.asarray(units, dtype=np.float64)  # (..., n, 3)
    return table[..., 0].astype(np.int64), table[..., 1].astype(np.float32), table[..., 2].astype(np.float32)


def _with_features(
    owners: list[int], owner: np.ndarray, gram_a: np.ndarray | None, gram_b: np.ndarray | None, alpha: np.ndarray,
    beta: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray, row_max: np.ndarray, row_min: np.ndarray, features: str,
) -> _Units:
    """The units' factors for ``features`` (element-wise, so the arrays may be batches of modules)."""
    head = (owners, owner, gram_a, gram_b)
    if features == "raw":
        return _Units(*head, alpha, beta, alpha, beta, alpha, beta, sq_a, sq_b)
    raw_na = np.sqrt(np.maximum(sq_a, 0))  # ‖A[i]‖
    raw_nb = np.sqrt(np.maximum(sq_b, 0))
    norm_a, norm_b = alpha * raw_na, np.abs(beta) * raw_nb  # ‖ã_i‖, ‖b̃_i‖
    zero = (norm_a <= _TINY) | (norm_b <= _TINY)
    # canonical: equal halves (c = sqrt(‖b̃‖/‖ã‖)), sign so that the largest |entry| of ã is positive
    c = np.exp(0.5 * (np.log(np.maximum(norm_b, _TINY)) - np.log(np.maximum(norm_a, _TINY))))
    one = np.float32(1.0)
    sign = np.where(-row_min > row_max, -one, one)  # of the largest |entry| (ties count as +)
    keep = (~zero).astype(np.float32)
    avg_a, avg_b = alpha * c * sign * keep, beta / c * sign * keep
    if features == "canonical":
        return _Units(*head, avg_a, avg_b, avg_a, avg_b, alpha, beta, sq_a, sq_b)
    seen_a = sign * keep / np.maximum(raw_na, _TINY)
    seen_b = sign * np.sign(beta) * keep / np.maximum(raw_nb, _TINY)
    return _Units(*head, avg_a, avg_b, seen_a, seen_b, alpha, beta, sq_a, sq_b)


def _gram_units(
    adapters: Sequence[LoraAdapter], weights: list[float], names: Sequence[str], features: str,
    summaries: Mapping[str, UnitSummary] | None = None,
) -> tuple[_Units, list[list[int]]]:
    """The units of modules with as many units each, as one batch, and each module's owners.

    Everything comes from the modules' :class:`UnitSummary` (given, or computed here from the
    stacked factors the same way), so a given summary spares the pass over the weights.
    """
    found, owners, per_unit, buffers = [], [], [], (StackBuffer(), StackBuffer())
    for name in names:
        present, units = _sources(adapters, weights, name)
        summary = (summaries or {}).get(name)
        if summary is None:
            # float32 whatever the storage (a bf16/fp16 Gram would lose the precision k-means needs); no copy
            # when a streamed merge read the factors side by side already.
            loras = [adapters[t].modules[name] for t in present]
            A, B = stacked([lora.A for lora in loras], 0, buffers[0]), stacked([lora.B for lora in loras], 1, buffers[1])
            summary = summarize_module(A.cpu().numpy(), B.cpu().numpy())
        found.append(summary)
        owners.append(present)
        per_unit.append(units)

    def batch(field: str) -> np.ndarray:
        return np.stack([getattr(summary, field) for summary in found])

    gram_a, gram_b = batch("gram_a"), batch("gram_b")
    owner, alpha, beta = _unit_table(per_unit)
    units = _with_features(owners[0], owner, gram_a, gram_b, alpha, beta, np.diagonal(gram_a, axis1=-2, axis2=-1).copy(),
                           np.diagonal(gram_b, axis1=-2, axis2=-1).copy(), batch("row_max"), batch("row_min"), features)
    return units, owners


def _units(
    adapters: Sequence[LoraAdapter], weights: list[float], name: str, features: str, gram: bool = True,
    summary: UnitSummary | None = None,
) -> tuple[_Units, torch.Tensor | None]:
    """One module's units, and (``gram=False``, for the sketch path) the points k-means sees (n, d_in + d_out)."""
    if gram:
        units, owners = _gram_units(adapters, weights, [name], features, None if summary is None else {name: summary})
        return units.module(0, owners[0]), None
    units, points, _, order = _sketch_units(adapters, weights, name, features)
    unsorted = np.empty_like(points)
    unsorted[order] = points
    return units, unsorted


def _sketch_units(
    adapters: Sequence[LoraAdapter], weights: list[float], name: str, features: str,
) -> tuple[_Units, np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """A module with too many units for n² (the sketch path), numpy: its units, the points k-means sees
    (n, d_in + d_out) in their canonical order, the units' probes
    (:func:`~lego_viz.checks.invariance.factor_probes`) and that order."""
    present, per_unit = _sources(adapters, weights, name)
    owner, alpha, beta = _unit_table(per_unit)
    A, B = _stacked_arrays(adapters, name, present)  # (n, d_in), (d_out, n)
    with one_blas_thread():
        sq_a, sq_b = np.einsum("nd,nd->n", A, A), np.einsum("dn,dn->n", B, B)
        units = _with_features(present, owner, None, None, alpha, beta, sq_a, sq_b, A.max(axis=1), A.min(axis=1), features)
        probes = factor_probes(A, B)
        order = canonical_order(sums=_point_sums(A, B, units))
    # Written once, in that order, straight from the factors: a (n, d) temporary costs more than the k-means.
    d_in = A.shape[1]
    points = np.empty((A.shape[0], d_in + B.shape[0]), dtype=np.float32)
    for rows in _row_blocks(A.shape[0]):  # B's columns in blocks: a transposed copy that stays in cache
        block = order[rows]
        np.multiply(A[block], units.seen_a[block, None], out=points[rows, :d_in])
        np.multiply(B[:, block].T, units.seen_b[block, None], out=points[rows, d_in:])
    return units, points, probes, order


def _row_blocks(n: int, size: int = 256) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _point_sums(A: np.ndarray, B: np.ndarray, units: _Units) -> tuple[np.ndarray, np.ndarray]:
    """Each point's ``‖x_i‖²`` and ``x_i · Σ_j x_j`` (float64) from the factors, the points ``x_i = [seen_a_i A[i],
    seen_b_i B[:, i]]`` never formed: what :func:`canonical_order` sorts by."""
    seen_a, seen_b = units.seen_a.astype(np.float64), units.seen_b.astype(np.float64)
    diag = np.square(seen_a) * units.sq_a + np.square(seen_b) * units.sq_b
    # float64 in blocks of units (a float64 copy of the factors would cost more than the rest)
    blocks = _row_blocks(A.shape[0])
    sum_a = sum(seen_a[rows] @ A[rows].astype(np.float64) for rows in blocks)  # Σ_j x_j, the A half (d_in,)
    sum_b = sum(B[:, rows].astype(np.float64) @ seen_b[rows] for rows in blocks)  # (d_out,)
    rowsum = np.concatenate([seen_a[rows] * (A[rows].astype(np.float64) @ sum_a)
                             + seen_b[rows] * (sum_b @ B[:, rows].astype(np.float64)) for rows in blocks])
    return diag, rowsum


def _stacked_arrays(adapters: Sequence[LoraAdapter], name: str, present: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The stacked factors ``A`` (n, d_in) and ``B`` (d_out, n) of ``name`` as float32 numpy arrays: read
    from the files side by side where they are stored as safetensors (no torch), else from the modules."""
    found = read_stacked(adapters, name)
    if found is not None:
        return found[0], found[1]
    loras = [adapters[t].modules[name] for t in present]
    return tuple(np.concatenate([_as_array(getattr(lora, side)) for lora in loras], axis=axis)
                 for side, axis in (("A", 0), ("B", 1)))


def _as_array(factor) -> np.ndarray:
    """A factor, numpy or torch (any device), as a float32 numpy array."""
    if isinstance(factor, np.ndarray):
        return factor.astype(np.float32, copy=False)
    return factor.detach().float().cpu().numpy()


def canonical_order(gram: np.ndarray | None = None, sums: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """An order of the points that does not depend on the order they came in.

    k-means++ seeding draws indices, so without this a permutation of the input ranks could land
    in another local optimum. Sorting by (squared norm, sum of inner products) — both
    permutation-equivariant — makes the whole merge permutation-invariant. From the Gram matrix,
    or, when there are too many points for one, from those two sums (:func:`_point_sums`).
    """
    if gram is not None:  # (..., n, n): one order per matrix of a batch
        g = gram.astype(np.float64)
        diag, rowsum = np.diagonal(g, axis1=-2, axis2=-1), g.sum(axis=-1)
    else:
        diag, rowsum = sums
    order = np.argsort(rowsum, axis=-1, kind="stable")
    return np.take_along_axis(order, np.argsort(np.take_along_axis(diag, order, -1), axis=-1, kind="stable"), -1)


def _reordered(gram: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``gram[order][:, order]`` for every matrix of a batch (m, n, n) and its order (m, n)."""
    batch = np.arange(gram.shape[0])[:, None, None]
    return gram[batch, order[:, :, None], order[:, None, :]]


def _relabel_by_first_member(labels: np.ndarray, k: int) -> np.ndarray:
    """Number clusters in order of their first member, so output ranks come out in a fixed order."""
    n = labels.shape[0]
    first = np.full(k, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    rank_of = np.empty(k, dtype=np.int64)
    rank_of[np.argsort(first, kind="stable")] = np.arange(k)
    return rank_of[labels]


def _centroids(
    A: np.ndarray, B: np.ndarray, units: _Units, labels: np.ndarray, k: int, reweight: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean of each cluster's (folded, possibly canonical) members, optionally rescaled to the
    members' mean norm, from the stacked factors ``A`` (n, d_in) and ``B`` (d_out, n) (what ``linf`` and
    ``lsq`` need; ``l2`` alone is :func:`_gram_coefficients`). numpy, so the merge command needs no torch.

    Returns:
        ``(c_a (k, d_in), c_b (k, d_out), coef_a, coef_b)``: the merged rows, and the (k, n)
        coefficients that make them from the raw stacked factors, ``c_a = coef_a A`` and
        ``c_b = coef_b Bᵀ`` (what the report's products are computed from).
    """
    n = labels.shape[0]
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), labels] = 1.0
    mean = onehot / np.maximum(onehot.sum(axis=0), 1.0)  # (n, k)
    coef_a, coef_b = (mean * units.avg_a[:, None]).T.copy(), (mean * units.avg_b[:, None]).T.copy()  # (k, n)
    c_a, c_b = centroid_products(coef_a, coef_b, A, B)  # (k, d_in), (k, d_out)
    if reweight == "none":
        return c_a, c_b, coef_a, coef_b
    if reweight == "l2":
        member = np.sqrt(np.maximum(np.square(units.avg_a) * units.sq_a + np.square(units.avg_b) * units.sq_b, 0))
        current = np.sqrt(np.square(np.linalg.norm(c_a, axis=1)) + np.square(np.linalg.norm(c_b, axis=1)))
    else:
        peak_a = np.maximum(A.max(axis=1), -A.min(axis=1))  # max |entry| of each unit
        peak_b = np.maximum(B.max(axis=0), -B.min(axis=0))
        member = np.maximum(np.abs(units.avg_a) * peak_a, np.abs(units.avg_b) * peak_b)
        current = np.maximum(np.abs(c_a).max(axis=1), np.abs(c_b).max(axis=1))
    target = mean.T @ member
    factor = np.where(current > _TINY, target / np.maximum(current, _TINY), 0).astype(np.float32)[:, None]
    return c_a * factor, c_b * factor, coef_a * factor, coef_b * factor


def _sources_one_hot(units: _Units, owners: Sequence[list[int]]) -> np.ndarray:
    """(m, n, T) float64: which adapter each unit of each module of a batch comes from."""
    return np.eye(max(max(o) for o in owners) + 1)[units.adapter_index]


def _pair_sums(units: _Units, owners: Sequence[list[int]]) -> tuple[list[float], list[list[float]]]:
    """‖Σ_t w_t ΔW_t‖² and each ‖w_t ΔW_t‖², per module of a batch, from the Gram matrices (float64).

    ``⟨unit i, unit j⟩ = f_i f_j (G_A)_ij (G_B)_ij`` with ``f = f_a f_b`` the units' folded scales;
    the first sums every pair, the second the pairs within each adapter.
    """
    fold = units.fold_a.astype(np.float64) * units.fold_b  # (m, n)
    source = _sources_one_hot(units, owners) * fold[..., None]  # (m, n, T)
    # G_A ∘ G_B in float64, converted on the fly (no float64 copies of the Gram matrices)
    hadamard = np.multiply(units.gram_a, units.gram_b, dtype=np.float64)
    per_source = hadamard @ source  # (m, n, T): Σ_{j of t} ⟨unit i, unit j⟩ / f_i
    reference = (per_source.sum(axis=-1) * fold).sum(axis=-1)  # (m,)
    source_sq = (per_source * source).sum(axis=-2)  # (m, T)
    return reference.tolist(), [source_sq[i, present].tolist() for i, present in enumerate(owners)]


def _report_products(
    units: _Units, owners: Sequence[list[int]], coef_a: np.ndarray, coef_b: np.ndarray,
    projections: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple]:
    """The merge's side of the report's inner products, from the Gram matrices (O(k·n²), no pass over the weights).

    With ``c_a = coef_a A``, ``c_b = coef_b Bᵀ`` and unit i of the weighted sum ``(f_b,i B[:, i]) (f_a,i A[i])ᵀ``:
    ``⟨ΔW_merge, unit i⟩ = f_a,i f_b,i (coef_a G_A)[:, i] · (coef_b G_B)[:, i]``, and ``‖ΔW_merge‖²``
    is a sum of Gram entries the same way. float64 from the float32 Gram matrices and coefficients.

    Args:
        units: a batch of modules (m, n); owners: each module's adapters; coef_a, coef_b: (m, k, n).
        projections: ``coef_a G_A`` and ``coef_b G_B`` in float64, where the caller has them.

    Returns:
        Per module ``(cross, merged_sq)``: ⟨ΔW_merge, w_t ΔW_t⟩ per adapter of ``owners``, and ‖ΔW_merge‖².
    """
    coef_a, coef_b = coef_a.astype(np.float64), coef_b.astype(np.float64)
    fold = units.fold_a.astype(np.float64) * units.fold_b  # (m, n)
    proj_a, proj_b = projections or (coef_a @ units.gram_a.astype(np.float64), coef_b @ units.gram_b.astype(np.float64))
    per_unit = (proj_a * proj_b).sum(axis=-2) * fold  # (m, n): ⟨ΔW_merge, unit i⟩
    cross = (per_unit[..., None, :] @ _sources_one_hot(units, owners))[..., 0, :]  # (m, T)
    merged_sq = ((proj_a @ np.swapaxes(coef_a, -1, -2)) * (proj_b @ np.swapaxes(coef_b, -1, -2))).sum(axis=(-2, -1))
    return [(cross[i, present].tolist(), float(merged_sq[i])) for i, present in enumerate(owners)]


def _gram_coefficients(
    units: _Units, owners: Sequence[list[int]], labels: np.ndarray, k: int, reweight: str, output: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Centroid coefficients of a batch of modules, reweighted from their Gram matrices, before any weight is read.

    The centroid of each cluster is the mean of its (folded, possibly canonical) members, so
    ``c_a = coef_a A`` and ``c_b = coef_b Bᵀ`` with (k, n) coefficients. ``l2`` rescales it to the
    members' mean norm, and the norms come from the Gram matrices (``‖c_a‖² = coef_a G_A coef_aᵀ``),
    so both reweightings fold into the coefficients and the weights are read once more only for
    the products themselves.

    Args:
        units: a batch of m modules with n units each; owners: each module's adapters.
        labels: (m, n) merged rank of each unit; k: the ranks.
        reweight: ``none`` or ``l2`` (``linf`` needs the centroids' entries: :func:`_centroids`).
        output: (m,) the output reweighting's factor on each half (1 where off).

    Returns:
        ``(coef_a, coef_b, products)``: (m, k, n) float32 each, and the report's products of each module.
    """
    avg_a, avg_b = units.avg_a.astype(np.float64), units.avg_b.astype(np.float64)
    onehot = (labels[..., None] == np.arange(k)).astype(np.float64)  # (m, n, k)
    mean = onehot / np.maximum(onehot.sum(axis=-2, keepdims=True), 1.0)
    coef_a, coef_b = np.swapaxes(mean * avg_a[..., None], -1, -2), np.swapaxes(mean * avg_b[..., None], -1, -2)  # (m, k, n)
    proj_a, proj_b = coef_a @ units.gram_a.astype(np.float64), coef_b @ units.gram_b.astype(np.float64)  # (m, k, n)
    factor = np.broadcast_to(output.astype(np.float64)[:, None], (len(output), k))
    if reweight == "l2":
        member = np.sqrt(np.maximum(avg_a**2 * units.sq_a + avg_b**2 * units.sq_b, 0))
        current = np.sqrt(np.maximum((proj_a * coef_a).sum(-1) + (proj_b * coef_b).sum(-1), 0))  # (m, k) ‖[c_a; c_b]‖
        target = (np.swapaxes(mean, -1, -2) @ member[..., None])[..., 0]
        factor = factor * np.where(current > _TINY, target / np.maximum(current, _TINY), 0.0)
    elif reweight != "none":
        raise ValueError(f"reweight {reweight!r} needs the centroids themselves")
    scale = factor[..., None]
    coef_a, coef_b, proj_a, proj_b = coef_a * scale, coef_b * scale, proj_a * scale, proj_b * scale
    # The report describes these float64 coefficients: within float32 rounding of the float32 ones the
    # centroids are made with, as the centroids' own float32 products are.
    products = _report_products(units, owners, coef_a, coef_b, (proj_a, proj_b))
    return coef_a.astype(np.float32), coef_b.astype(np.float32), products


def lsq_scales(A: np.ndarray, B: np.ndarray, units: _Units, c_a: np.ndarray, c_b: np.ndarray) -> np.ndarray:
    """Per-unit scales ``s`` minimising ``‖Σ_j s_j b_j a_jᵀ − Σ_t w_t ΔW_t‖_F`` (ARCHITECTURE §5.2).

    The normal equations ``G s = h`` need only factor products: ``G = (C_b C_bᵀ) ∘ (C_a C_aᵀ)`` and
    ``h_j = Σ_i (b_jᵀ b̃_i)(ã_iᵀ a_j)`` over the folded, weighted units ``ã_i = α_i A[i]``, ``b̃_i = β_i B[:, i]``.
    Solved in float64 by least squares, so coinciding or zero units (a singular G) get the minimum-norm answer.

    Args:
        A: (n, d_in) and B: (d_out, n) the stacked factors; units: their folding factors.
        c_a: (k, d_in) merged A rows; c_b: (k, d_out) merged B columns, as rows.

    Returns:
        ``s`` (k,), float32.
    """
    with one_blas_thread():
        proj_b = (c_b @ B) * units.fold_b  # (k, n)
        proj_a = (A @ c_a.T) * units.fold_a[:, None]  # (n, k)
    h = (proj_b.astype(np.float64) * proj_a.T).sum(axis=1)
    c_a, c_b = c_a.astype(np.float64), c_b.astype(np.float64)
    gram = (c_b @ c_b.T) * (c_a @ c_a.T)  # (k, k)
    return np.linalg.lstsq(gram, h, rcond=None)[0].astype(np.float32)


def _dims(adapters: Sequence[LoraAdapter], name: str) -> tuple[int, int]:
    lora = next(a.modules[name] for a in adapters if name in a.modules)
    return lora.d_in, lora.d_out


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from lego_viz.merge.base import MergeError

        raise MergeError("device='cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return torch.device(choice)


def _sketch_device(choice: str) -> str:
    """Where the sketch k-means runs: ``auto`` is cuda only where torch can see a GPU. torch is asked only
    where one may be there (it is already imported, or a GPU driver is loaded), so a merge on a machine
    without one never imports torch."""
    if choice != "auto":
        return choice
    linux_without_driver = sys.platform.startswith("linux") and not any(Path(p).exists() for p in _GPU_DRIVERS)
    if "torch" not in sys.modules and linux_without_driver:
        return "cpu"
    try:
        return _device("auto").type
    except ImportError:  # no torch to run on a GPU with
        return "cpu"


# Present where an NVIDIA (or ROCm) driver is loaded, the only way torch can see a GPU on Linux.
_GPU_DRIVERS = ("/proc/driver/nvidia/version", "/dev/kfd")


# Modules batched together hold at most this many Gram entries (float64 temporaries of 32 MiB).
BATCH_ENTRIES = 1 << 22


def _batches(names: list[str], n: int) -> list[list[str]]:
    """``names`` (modules of n units each) in batches of at most :data:`BATCH_ENTRIES` Gram entries."""
    size = max(1, BATCH_ENTRIES // (n * n))
    return [names[i : i + size] for i in range(0, len(names), size)]


@dataclass
class LegoClusters:
    """lego before its centroids: every module's units and clusters (O(n²) kept per module, numpy).

    :func:`lego_clusters` makes them from the adapters (or from their first pass, without reading
    a weight); the centroids then need the weights once more, module by module (:func:`lego`, or
    :meth:`centroids` on factors read by the caller).
    """

    units: dict[str, _Units]
    labels: dict[str, np.ndarray]  # per module, the merged rank of each unit (input order)
    reference_sq_norms: dict[str, float | None]
    unit_probes: dict[str, tuple[np.ndarray, np.ndarray]]
    details: dict
    timings: dict[str, float]
    # per module whose centroids need no more than its Gram matrices (reweighting none / l2): the
    # (k, n) coefficients on the raw stacked A rows and B columns, and the report's products
    coefficients: dict[str, tuple[np.ndarray, np.ndarray, tuple]] = dataclasses.field(default_factory=dict)
    source_sq: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per module, each ‖w_t ΔW_t‖²

    def centroids(
        self, name: str, A, B, fan_in_fan_out: bool = False, rank: int | None = None, options: dict | None = None,
    ) -> tuple[LoraModule, ReportProducts | None]:
        """Module ``name`` merged from its stacked factors ``A`` (n, d_in) and ``B`` (d_out, n): numpy arrays
        give a module of numpy arrays, torch tensors one of tensors.

        A module in :attr:`coefficients` needs one product per side; the others (``linf``, ``lsq``, the
        sketch route) are rescaled from the factors (:func:`_centroids`, :func:`lsq_scales`, on numpy),
        which needs the module's ``rank`` and lego's ``options``.

        Returns:
            The merged module (scale 1) and its report products (None where the units have no Gram matrices).
        """
        arrays = isinstance(A, np.ndarray)
        if name in self.coefficients:
            coef_a, coef_b, (cross, merged_sq) = self.coefficients[name]
            c_a, c_b = centroid_products(coef_a, coef_b, A, B)  # (k, d_in), (k, d_out)
            module = _merged_module(c_a, c_b, fan_in_fan_out)
            return module, ReportProducts(module, cross, self.source_sq[name], merged_sq)
        units = self.units[name]
        if not arrays and A.device.type != "cpu":
            A, B = A.cpu(), B.cpu()
        c_a, c_b, coef_a, coef_b = self._rescaled(name, A if arrays else A.numpy(), B if arrays else B.numpy(), rank, options)
        module = _merged_module(c_a if arrays else torch.from_numpy(c_a), c_b if arrays else torch.from_numpy(c_b), fan_in_fan_out)
        if units.gram_a is None:
            return module, None
        (cross, merged_sq), = _report_products(_Units.stack([units]), [units.owners], coef_a[None], coef_b[None])
        return module, ReportProducts(module, cross, self.source_sq[name], merged_sq)

    def _rescaled(self, name: str, A: np.ndarray, B: np.ndarray, rank: int, options: dict) -> tuple[np.ndarray, ...]:
        """:meth:`centroids` for a module outside :attr:`coefficients`: ``(c_a, c_b, coef_a, coef_b)``."""
        units = self.units[name]
        c_a, c_b, coef_a, coef_b = _centroids(A, B, units, self.labels[name], rank, options["param_reweight"])
        # the output reweighting, sqrt(r̄/k) on the update, split over both halves (r̄ = n / adapters)
        factor = (len(units.adapter_index) / len(units.owners) / rank) ** 0.25 if options["output_reweight"] else 1.0
        if factor != 1.0:
            c_a, c_b, coef_a, coef_b = c_a * factor, c_b * factor, coef_a * factor, coef_b * factor
        if options["rescale"] == "lsq":
            scales = lsq_scales(A, B, units, c_a, c_b)
            root = np.sqrt(np.abs(scales))[:, None]  # split over both halves; the sign goes with b
            signed = root * np.sign(scales)[:, None]
            c_a, c_b, coef_a, coef_b = c_a * root, c_b * signed, coef_a * root, coef_b * signed
        return c_a, c_b, coef_a, coef_b

    def record(self, out: MethodOutput, name: str, module: LoraModule, products: ReportProducts | None = None) -> None:
        """Put module ``name`` in ``out`` with what the report and the checks take from the clusters:
        its report products, ``‖Σ_t w_t ΔW_t‖²`` where known, and the units' probes."""
        out.modules[name] = module
        if products is not None:
            out.report_products[name] = products
            out.reference_sq_norms[name] = self.reference_sq_norms[name]
        if name in self.unit_probes:  # every module's, the sketch path's too
            out.unit_probes[name] = self.unit_probes[name]


def _merged_module(c_a, c_b, fan_in_fan_out: bool) -> LoraModule:
    """The merged module (scale 1) from its rows ``c_a`` (k, d_in) and ``c_b`` (k, d_out), numpy or torch."""
    if isinstance(c_a, np.ndarray):
        return LoraModule(A=np.ascontiguousarray(c_a), B=np.ascontiguousarray(c_b.T), scale=1.0, fan_in_fan_out=fan_in_fan_out)
    return LoraModule(A=c_a.contiguous(), B=c_b.T.contiguous(), scale=1.0, fan_in_fan_out=fan_in_fan_out)


def _output_factor(adapters: Sequence[LoraAdapter], name: str, owners: list[int], rank: int, options: dict) -> float:
    """The output reweighting, sqrt(r̄/k) on the update, split over both halves (1 where it is off)."""
    if not options["output_reweight"]:
        return 1.0
    ranks = [adapters[t].modules[name].r for t in owners]
    return (sum(ranks) / len(ranks) / rank) ** 0.25


@dataclass
class _Work:
    """What :func:`lego_clusters`' steps hand on to each other, per module, in the units' canonical order."""

    orders: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # canonical order of the units
    sorted_grams: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # feature Gram in that order
    sorted_labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # k-means' labels in that order
    by_size: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # Gram-route modules by unit count
    groups: dict[tuple[int, int], list[str]] = dataclasses.field(default_factory=dict)  # (n, k) -> modules
    batches: dict[tuple[str, ...], tuple[_Units, list[list[int]]]] = dataclasses.field(default_factory=dict)
    kmeans_seconds: float = 0.0  # the sketch k-means' share of the Gram step's time


def _sketch_step(
    adapters: Sequence[LoraAdapter], weights: list[float], names: list[str], k: Mapping[str, int], options: dict,
    clusters: LegoClusters, work: _Work,
) -> None:
    """Modules with too many units for n² (adapter libraries) cluster a sketch of their points here;
    the others are sorted by unit count into ``work.by_size`` for the Gram step."""
    for name in names:
        n = sum(a.modules[name].r for a in adapters if name in a.modules)
        if n <= GRAM_UNITS or k[name] >= n:
            work.by_size.setdefault(n, []).append(name)
            continue
        units, points, clusters.unit_probes[name], order = _sketch_units(adapters, weights, name, options["features"])
        clusters.units[name], work.orders[name] = units, order
        begin = time.perf_counter()
        work.sorted_labels[name] = _sketch_labels(points, k[name], options)
        work.kmeans_seconds += time.perf_counter() - begin


def _sketch_labels(points: np.ndarray, k: int, options: dict) -> np.ndarray:
    """The sketch k-means of ``points`` (n, d): numpy on the CPU (no torch), torch's on a GPU."""
    common = {"n_init": options["n_init"], "max_iter": options["max_iter"], "tol": options["tol"]}
    if _sketch_device(options["device"]) == "cpu":
        with one_blas_thread():  # bits that do not depend on the core count: the command's are the library's
            return numpy_sketch_kmeans(points, k, seed=options["seed"], copy_x=False, **common)[0]
    from lego_viz.units.kmeans import sketch_kmeans

    labels, _ = sketch_kmeans(torch.from_numpy(points).to(_device(options["device"])), k,
                              generator=torch.Generator().manual_seed(options["seed"]), **common)
    return labels.cpu().numpy()


def _gram_step(
    adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int], options: dict,
    summaries: Mapping[str, UnitSummary] | None, clusters: LegoClusters, work: _Work,
) -> None:
    """The Gram route (O(n²) kept per module), modules of one size at once: units, feature Gram in
    canonical order, the exact sum's norms and the units' probes."""
    for n, same in work.by_size.items():
        for batch in _batches(same, n):
            units, owners = _gram_units(adapters, weights, batch, options["features"], summaries)
            work.batches[tuple(batch)] = units, owners
            gram = units.gram()
            order = canonical_order(gram)
            reordered = _reordered(gram, order)
            references, source_sq = _pair_sums(units, owners)
            probe_x, probe_z = span_probes(units.gram_a, units.gram_b)
            for i, name in enumerate(batch):
                clusters.units[name] = units.module(i, owners[i])
                work.sorted_grams[name], work.orders[name] = reordered[i], order[i]
                clusters.reference_sq_norms[name] = references[i]
                clusters.source_sq[name] = source_sq[i]
                clusters.unit_probes[name] = (probe_x[i], probe_z[i])
                work.groups.setdefault((n, k[name]), []).append(name)


def _kmeans_step(
    adapters: Sequence[LoraAdapter], names: list[str], k: Mapping[str, int], options: dict, clusters: LegoClusters,
    work: _Work,
) -> None:
    """Gram k-means per group of modules with one (n, k), then every module's labels in input order."""
    for (n, rank), group in work.groups.items():
        if rank == n:  # every unit its own cluster; exact even when units coincide
            for name in group:
                work.sorted_labels[name] = np.arange(n)
            continue
        # n_features = d makes tol mean what it means in scikit-learn (relative to per-feature variance).
        dims = [sum(_dims(adapters, name)) for name in group]
        labels, _, _ = gram_kmeans(np.stack([work.sorted_grams[name] for name in group]), rank, n_init=options["n_init"],
                                   max_iter=options["max_iter"], tol=options["tol"], seed=options["seed"], n_features=dims)
        work.sorted_labels.update(zip(group, labels))
    for name in names:
        order = work.orders[name]
        labels = np.empty(order.shape[0], dtype=np.int64)
        labels[order] = _relabel_by_first_member(work.sorted_labels[name], k[name])
        clusters.labels[name] = labels


def _coefficients_step(adapters: Sequence[LoraAdapter], options: dict, clusters: LegoClusters, work: _Work) -> None:
    """Reweighting none / l2: every Gram-route module's centroid coefficients and report products, by batch."""
    for (n, rank), same in work.groups.items():
        for group in _batches(same, n):
            units, owners = work.batches.get(tuple(group)) or (_Units.stack([clusters.units[name] for name in group]),
                                                               [clusters.units[name].owners for name in group])
            output = np.array([_output_factor(adapters, name, o, rank, options) for name, o in zip(group, owners)])
            labels = np.stack([clusters.labels[name] for name in group])
            coef_a, coef_b, products = _gram_coefficients(units, owners, labels, rank, options["param_reweight"], output)
            for i, name in enumerate(group):
                clusters.coefficients[name] = (coef_a[i], coef_b[i], products[i])


def lego_clusters(
    adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int], options: dict,
    summaries: Mapping[str, UnitSummary] | None = None,
) -> LegoClusters:
    """lego's first pass and k-means over every module of ``adapters``.

    Modules with as many units run as one batch from their Gram matrices onwards: features,
    canonical order, k-means and (reweighting none / l2) the centroids' coefficients. With every
    module's first pass given, this reads no weight and imports no torch.

    Args:
        adapters, weights, k, options: as :func:`lego` gets them.
        summaries: the first pass made beforehand (:func:`lego_viz.merge.first_pass.summarize`); modules
            without one are read here (for a streamed merge, tensor by tensor).
    """
    names = module_order(adapters)
    if options["device"] == "cuda":
        _device("cuda")  # asked for by name: say so at once where there is no GPU, whichever k-means runs
    timings = {"gram": 0.0, "kmeans": 0.0}
    clusters = LegoClusters(units={}, labels={}, reference_sq_norms={}, unit_probes={}, details={}, timings=timings)
    work = _Work()
    start = time.perf_counter()
    _sketch_step(adapters, weights, names, k, options, clusters, work)
    _gram_step(adapters, weights, k, options, summaries, clusters, work)
    timings["gram"] = time.perf_counter() - start - work.kmeans_seconds
    # Which k-means ran, in modules: the report says so.
    sketched = len(work.sorted_labels)
    clusters.details["kmeans"] = {f"gram (n ≤ {GRAM_UNITS} units)": len(names) - sketched,
                                  f"sketch (n > {GRAM_UNITS} units)": sketched}
    start = time.perf_counter() - work.kmeans_seconds
    _kmeans_step(adapters, names, k, options, clusters, work)
    timings["kmeans"] = time.perf_counter() - start
    if options["param_reweight"] in ("none", "l2") and options["rescale"] == "none":
        start = time.perf_counter()
        _coefficients_step(adapters, options, clusters, work)
        timings["coefficients"] = time.perf_counter() - start
    return clusters


def lego(
    adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict,
    clusters: LegoClusters | None = None,
) -> MethodOutput:
    """LoRA-LEGO on every module of ``adapters``: :func:`lego_clusters` (or the ``clusters`` given,
    made beforehand over these modules and maybe more), then each cluster's centroid."""
    names = module_order(adapters)
    if clusters is None:
        clusters = lego_clusters(adapters, weights, k, options)
        out = MethodOutput(modules={}, timings=dict(clusters.timings), details=clusters.details)
    else:  # a streamed merge: the clusters' own cost and details are counted once, by the caller
        out = MethodOutput(modules={})
    start, buffers = time.perf_counter(), (StackBuffer(), StackBuffer())
    for name in names:  # pass 2: centroids, one product with the stacked factors per side
        units, labels, rank = clusters.units[name], clusters.labels[name], k[name]
        loras = [adapters[t].modules[name] for t in units.owners]
        fan_in_fan_out = loras[0].fan_in_fan_out
        A = stacked([lora.A for lora in loras], 0, buffers[0])  # no copy after a streamed read
        B = stacked([lora.B for lora in loras], 1, buffers[1])
        clusters.record(out, name, *clusters.centroids(name, A, B, fan_in_fan_out, rank, options))
        out.labels[name] = torch.from_numpy(labels)
        out.unit_owner[name] = torch.from_numpy(units.adapter_index)
    out.timings["centroids"] = time.perf_counter() - start
    return out



LEGO = MergeMethod(
    "lego",
    lego,
    "LoRA-LEGO: k-means over all units (MSUs) per module, one merged rank per cluster, dual reweighting.",
    options=LEGO_OPTIONS,
    takes_k=True,
    prepare=lego_clusters,
)
