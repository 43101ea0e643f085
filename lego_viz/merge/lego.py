"""LoRA-LEGO: cluster all units of a module with k-means and turn each cluster into one rank (DESIGN §4)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.first_pass import GRAM_UNITS, UnitSummary, one_blas_thread, summarize_module
from lego_viz.invariance import span_probes
from lego_viz.kmeans import GramKMeans, sketch_kmeans
from lego_viz.merge.base import MethodOutput, Option, register
from lego_viz.msu import FEATURE_MODES, StackBuffer, stacked
from lego_viz.retention import ReportProducts

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
    "device": Option("auto", "where k-means runs: auto (cuda if present), cpu or cuda", choices=("auto", "cpu", "cuda")),
}

_TINY = 1e-30


def _matmul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right``; on the CPU through numpy's BLAS, ~1.5× faster than torch's for the centroids'
    thin products ((k, n) × (n, d) with k, n ≤ 128; 0.43 s against 0.65 s at the reference shape)."""
    if left.device.type != "cpu":
        return left @ right
    with one_blas_thread():
        return torch.from_numpy(left.numpy() @ right.numpy())


@dataclass
class _Units:
    """What a module's merge needs to keep between the passes: O(n²), never O(n·d).

    Unit i of the module is ``ã_i = α_i A[i]``, ``b̃_i = β_i B[:, i]`` (scale folded, weight on b).
    Every feature mode is the raw rows times a per-unit factor, so all Gram matrices come from the
    two raw Gram matrices ``A Aᵀ`` and ``Bᵀ B`` — one matmul pass over the weights.

    The tensors may carry a leading batch dimension (modules with as many units, stacked): the
    methods below then answer for every module at once, and :meth:`module` takes one out.
    """

    owners: list[int]  # adapter index of each block of units (a batch: of its first module)
    adapter_index: torch.Tensor  # (n,)
    gram_a: torch.Tensor | None  # (n, n) raw A Aᵀ; None on the sketch path (too many units)
    gram_b: torch.Tensor | None  # (n, n) raw Bᵀ B
    avg_a: torch.Tensor  # (n,) factor of A[i] in the vectors averaged into centroids
    avg_b: torch.Tensor  # (n,)
    seen_a: torch.Tensor  # (n,) factor of A[i] in what k-means sees
    seen_b: torch.Tensor  # (n,)
    fold_a: torch.Tensor  # (n,) factor of A[i] in the folded, weighted unit ã_i
    fold_b: torch.Tensor  # (n,)
    sq_a: torch.Tensor  # (n,) ‖A[i]‖² (the Gram diagonal)
    sq_b: torch.Tensor  # (n,)

    def gram(self) -> torch.Tensor:
        """Gram matrix of the features k-means sees, (n, n) (a batch: (m, n, n))."""
        sa, sb = self.seen_a, self.seen_b
        gram = (sa[..., :, None] * self.gram_a).mul_(sa[..., None, :])
        return gram.add_((sb[..., :, None] * self.gram_b).mul_(sb[..., None, :]))

    def module(self, index: int, owners: list[int]) -> _Units:
        """Module ``index`` of a batch (views), whose units come from the adapters ``owners``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "owners"}
        return _Units(owners=owners, **{key: None if value is None else value[index] for key, value in fields.items()})

    @staticmethod
    def stack(units: Sequence[_Units]) -> _Units:
        """Modules with as many units as one batch (the ``owners`` of the first)."""
        fields = {f.name: [getattr(u, f.name) for u in units] for f in dataclasses.fields(_Units) if f.name != "owners"}
        return _Units(owners=units[0].owners, **{key: None if values[0] is None else torch.stack(values)
                                                 for key, values in fields.items()})


def _sources(adapters: Sequence[LoraAdapter], weights: list[float], name: str) -> tuple[list[int], list[tuple[int, float, float]]]:
    """The adapters holding ``name`` and, per stacked unit, its adapter, ``α = √scale`` and ``β = √scale · w``."""
    present = [(t, a.modules[name]) for t, a in enumerate(adapters) if name in a.modules]
    units = [(t, lora.scale**0.5, lora.scale**0.5 * weights[t]) for t, lora in present for _ in range(lora.r)]
    return [t for t, _ in present], units


def _unit_table(units: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_sources`'s units (of one module, or a list of modules) as ``(owner, alpha, beta)`` tensors."""
    table = torch.tensor(units, dtype=torch.float64)  # (..., n, 3)
    return table[..., 0].long(), table[..., 1].float(), table[..., 2].float()


def _with_features(
    owners: list[int], owner: torch.Tensor, gram_a: torch.Tensor | None, gram_b: torch.Tensor | None, alpha: torch.Tensor,
    beta: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, row_max: torch.Tensor, row_min: torch.Tensor, features: str,
) -> _Units:
    """The units' factors for ``features`` (element-wise, so the tensors may be batches of modules)."""
    head = (owners, owner, gram_a, gram_b)
    if features == "raw":
        return _Units(*head, alpha, beta, alpha, beta, alpha, beta, sq_a, sq_b)
    raw_na = sq_a.clamp_min(0).sqrt()  # ‖A[i]‖
    raw_nb = sq_b.clamp_min(0).sqrt()
    norm_a, norm_b = alpha * raw_na, beta.abs() * raw_nb  # ‖ã_i‖, ‖b̃_i‖
    zero = (norm_a <= _TINY) | (norm_b <= _TINY)
    # canonical: equal halves (c = sqrt(‖b̃‖/‖ã‖)), sign so that the largest |entry| of ã is positive
    c = torch.exp(0.5 * (torch.log(norm_b.clamp_min(_TINY)) - torch.log(norm_a.clamp_min(_TINY))))
    sign = torch.where(-row_min > row_max, -1.0, 1.0)  # of the largest |entry| (ties count as +)
    keep = (~zero).to(torch.float32)
    avg_a, avg_b = alpha * c * sign * keep, beta / c * sign * keep
    if features == "canonical":
        return _Units(*head, avg_a, avg_b, avg_a, avg_b, alpha, beta, sq_a, sq_b)
    seen_a = sign * keep / raw_na.clamp_min(_TINY)
    seen_b = sign * torch.sign(beta) * keep / raw_nb.clamp_min(_TINY)
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

    def batch(field: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(summary, field) for summary in found]))

    gram_a, gram_b = batch("gram_a"), batch("gram_b")
    owner, alpha, beta = _unit_table(per_unit)
    units = _with_features(owners[0], owner, gram_a, gram_b, alpha, beta, gram_a.diagonal(dim1=-2, dim2=-1),
                           gram_b.diagonal(dim1=-2, dim2=-1), batch("row_max"), batch("row_min"), features)
    return units, owners


def _units(
    adapters: Sequence[LoraAdapter], weights: list[float], name: str, features: str, gram: bool = True,
    summary: UnitSummary | None = None,
) -> tuple[_Units, torch.Tensor | None]:
    """One module's units, and (``gram=False``, for the sketch path) the points k-means sees (n, d_in + d_out)."""
    if gram:
        units, owners = _gram_units(adapters, weights, [name], features, None if summary is None else {name: summary})
        return units.module(0, owners[0]), None
    present, per_unit = _sources(adapters, weights, name)
    owner, alpha, beta = _unit_table(per_unit)
    loras = [adapters[t].modules[name] for t in present]
    A, B = stacked([lora.A for lora in loras], 0), stacked([lora.B for lora in loras], 1)  # (n, d_in), (d_out, n)
    # amax/amin read A once with no |A| temporary, ~10× faster than abs().argmax() (torch 2.13)
    units = _with_features(present, owner, None, None, alpha, beta, A.square().sum(dim=1), B.square().sum(dim=0),
                           A.amax(dim=1), A.amin(dim=1), features)
    points = torch.cat([units.seen_a[:, None] * A, units.seen_b[:, None] * B.T], dim=1)
    return units, points


def canonical_order(gram: torch.Tensor | None = None, points: torch.Tensor | None = None) -> torch.Tensor:
    """An order of the points that does not depend on the order they came in.

    k-means++ seeding draws indices, so without this a permutation of the input ranks could land
    in another local optimum. Sorting by (squared norm, sum of inner products) — both
    permutation-equivariant — makes the whole merge permutation-invariant. From the Gram matrix,
    or from the points themselves (``x_i · Σ_j x_j``) when there are too many for one.
    """
    if gram is not None:  # (..., n, n): one order per matrix of a batch
        g = gram.double()
        diag, rowsum = g.diagonal(dim1=-2, dim2=-1), g.sum(dim=-1)
    else:
        x = points.double()
        diag, rowsum = x.square().sum(dim=1), x @ x.sum(dim=0)
    order = torch.argsort(rowsum, dim=-1, stable=True)
    return order.gather(-1, torch.argsort(diag.gather(-1, order), dim=-1, stable=True))


def _reordered(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``gram[order][:, order]`` for every matrix of a batch (..., n, n) and its order (..., n)."""
    n = gram.shape[-1]
    flat = (order[..., :, None] * n + order[..., None, :]).flatten(-2)  # (..., n²): entry (order_i, order_j)
    return gram.flatten(-2).gather(-1, flat).view(gram.shape)


def _relabel_by_first_member(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number clusters in order of their first member, so output ranks come out in a fixed order."""
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, labels, torch.arange(n), reduce="amin")
    rank_of = torch.empty(k, dtype=torch.long)
    rank_of[torch.argsort(first)] = torch.arange(k)
    return rank_of[labels]


def _centroids(
    adapters: Sequence[LoraAdapter], name: str, units: _Units, labels: torch.Tensor, k: int, reweight: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of each cluster's (folded, possibly canonical) members, optionally rescaled to the
    members' mean norm.

    Returns:
        ``(c_a (k, d_in), c_b (k, d_out), coef_a, coef_b)``: the merged rows, and the (k, n)
        coefficients that make them from the raw stacked factors, ``c_a = coef_a A`` and
        ``c_b = coef_b Bᵀ`` (what the report's products are computed from).
    """
    n = labels.shape[0]
    onehot = torch.zeros(n, k, dtype=units.avg_a.dtype)
    onehot[torch.arange(n), labels] = 1.0
    mean = onehot / onehot.sum(dim=0).clamp_min(1.0)  # (n, k)
    coef_a, coef_b = (mean * units.avg_a[:, None]).T, (mean * units.avg_b[:, None]).T  # (k, n)
    present = [adapters[t].modules[name] for t in units.owners]
    A = stacked([lora.A for lora in present], 0)  # no copy after a streamed read; else one, freed on return
    B = stacked([lora.B for lora in present], 1)
    c_a, c_b = _matmul(coef_a, A), _matmul(B, coef_b.T).T  # (k, d_in), (k, d_out)
    if reweight == "none":
        return c_a, c_b, coef_a, coef_b
    if reweight == "l2":
        member = (units.avg_a.square() * units.sq_a + units.avg_b.square() * units.sq_b).clamp_min(0).sqrt()
        current = (torch.linalg.vector_norm(c_a, dim=1).square() + torch.linalg.vector_norm(c_b, dim=1).square()).sqrt()
    else:
        peak_a = torch.maximum(A.amax(dim=1), -A.amin(dim=1))  # max |entry| of each unit
        peak_b = torch.maximum(B.amax(dim=0), -B.amin(dim=0))
        member = torch.maximum(units.avg_a.abs() * peak_a, units.avg_b.abs() * peak_b)
        current = torch.maximum(c_a.abs().amax(1), c_b.abs().amax(1))
    target = mean.T @ member
    factor = torch.where(current > _TINY, target / current.clamp_min(_TINY), torch.zeros_like(current))[:, None]
    return c_a.mul_(factor), c_b.mul_(factor), coef_a * factor, coef_b * factor


def _sources_one_hot(units: _Units, owners: Sequence[list[int]]) -> torch.Tensor:
    """(m, n, T) float64: which adapter each unit of each module of a batch comes from."""
    return torch.nn.functional.one_hot(units.adapter_index, max(max(o) for o in owners) + 1).double()


def _pair_sums(units: _Units, owners: Sequence[list[int]]) -> tuple[list[float], list[list[float]]]:
    """‖Σ_t w_t ΔW_t‖² and each ‖w_t ΔW_t‖², per module of a batch, from the Gram matrices (float64).

    ``⟨unit i, unit j⟩ = f_i f_j (G_A)_ij (G_B)_ij`` with ``f = f_a f_b`` the units' folded scales;
    the first sums every pair, the second the pairs within each adapter.
    """
    fold = units.fold_a.double() * units.fold_b.double()  # (m, n)
    source = _sources_one_hot(units, owners) * fold[..., None]  # (m, n, T)
    # G_A ∘ G_B in float64, converted on the fly (numpy; no float64 copies of the Gram matrices)
    hadamard = torch.from_numpy(np.multiply(units.gram_a.numpy(), units.gram_b.numpy(), dtype=np.float64))
    per_source = hadamard @ source  # (m, n, T): Σ_{j of t} ⟨unit i, unit j⟩ / f_i
    reference = (per_source.sum(dim=-1) * fold).sum(dim=-1)  # (m,)
    source_sq = (per_source * source).sum(dim=-2)  # (m, T)
    return reference.tolist(), [source_sq[i, present].tolist() for i, present in enumerate(owners)]


def _report_products(
    units: _Units, owners: Sequence[list[int]], coef_a: torch.Tensor, coef_b: torch.Tensor,
    projections: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    coef_a, coef_b = coef_a.double(), coef_b.double()
    fold = units.fold_a.double() * units.fold_b.double()  # (m, n)
    proj_a, proj_b = projections or (coef_a @ units.gram_a.double(), coef_b @ units.gram_b.double())  # (m, k, n)
    per_unit = (proj_a * proj_b).sum(dim=-2) * fold  # (m, n): ⟨ΔW_merge, unit i⟩
    cross = (per_unit[..., None, :] @ _sources_one_hot(units, owners))[..., 0, :]  # (m, T)
    merged_sq = ((proj_a @ coef_a.transpose(-1, -2)) * (proj_b @ coef_b.transpose(-1, -2))).flatten(-2).sum(-1)
    return [(cross[i, present].tolist(), float(merged_sq[i])) for i, present in enumerate(owners)]


def _gram_coefficients(
    units: _Units, owners: Sequence[list[int]], labels: torch.Tensor, k: int, reweight: str, output: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
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
    avg_a, avg_b = units.avg_a.double(), units.avg_b.double()
    gram_a, gram_b = units.gram_a.double(), units.gram_b.double()
    onehot = torch.zeros(*labels.shape, k, dtype=torch.float64).scatter_(-1, labels[..., None], 1.0)
    mean = onehot / onehot.sum(dim=-2, keepdim=True).clamp_min(1.0)  # (m, n, k)
    coef_a, coef_b = (mean * avg_a[..., None]).transpose(-1, -2), (mean * avg_b[..., None]).transpose(-1, -2)
    proj_a, proj_b = coef_a @ gram_a, coef_b @ gram_b  # (m, k, n)
    factor = output.double()[:, None].expand(-1, k)
    if reweight == "l2":
        member = (avg_a.square() * units.sq_a.double() + avg_b.square() * units.sq_b.double()).clamp_min(0).sqrt()
        current = ((proj_a * coef_a).sum(-1) + (proj_b * coef_b).sum(-1)).clamp_min(0).sqrt()  # (m, k) ‖[c_a; c_b]‖
        target = (mean.transpose(-1, -2) @ member[..., None])[..., 0]
        factor = factor * torch.where(current > _TINY, target / current.clamp_min(_TINY), torch.zeros_like(current))
    elif reweight != "none":
        raise ValueError(f"reweight {reweight!r} needs the centroids themselves")
    scale = factor[..., None]
    coef_a, coef_b, proj_a, proj_b = coef_a * scale, coef_b * scale, proj_a * scale, proj_b * scale
    # The report describes these float64 coefficients: within float32 rounding of the float32 ones the
    # centroids are made with, as the centroids' own float32 products are.
    products = _report_products(units, owners, coef_a, coef_b, (proj_a, proj_b))
    return coef_a.float(), coef_b.float(), products


def lsq_scales(
    adapters: Sequence[LoraAdapter], weights: list[float], name: str, owners: list[int], c_a: torch.Tensor, c_b: torch.Tensor
) -> torch.Tensor:
    """Per-unit scales ``s`` minimising ``‖Σ_j s_j b_j a_jᵀ − Σ_t w_t ΔW_t‖_F`` (DESIGN §5b).

    The normal equations ``G s = h`` need only factor products: ``G = (C_b C_bᵀ) ∘ (C_a C_aᵀ)`` and
    ``h_j = Σ_t b_jᵀ (w_t B̃_t)(Ã_t a_j)``, streamed adapter by adapter. Solved in float64 by
    least squares, so coinciding or zero units (a singular G) get the minimum-norm answer.

    Args:
        c_a: (k, d_in) merged A rows; c_b: (k, d_out) merged B columns, as rows.

    Returns:
        ``s`` (k,).
    """
    h = torch.zeros(c_a.shape[0], dtype=torch.float64)
    for t in owners:
        lora = adapters[t].modules[name]
        root = lora.scale**0.5
        proj_b = (c_b @ lora.B.float()) * (root * weights[t])  # (k, r_t)
        proj_a = (lora.A.float() @ c_a.T) * root  # (r_t, k)
        h += (proj_b * proj_a.T).sum(dim=1).double()
    c_a, c_b = c_a.double().cpu(), c_b.double().cpu()
    gram = (c_b @ c_b.T) * (c_a @ c_a.T)  # (k, k)
    return torch.linalg.lstsq(gram, h[:, None], driver="gelsd").solution[:, 0].float()


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


# Modules batched together hold at most this many Gram entries (float64 temporaries of 32 MiB).
BATCH_ENTRIES = 1 << 22


def _batches(names: list[str], n: int) -> list[list[str]]:
    """``names`` (modules of n units each) in batches of at most :data:`BATCH_ENTRIES` Gram entries."""
    size = max(1, BATCH_ENTRIES // (n * n))
    return [names[i : i + size] for i in range(0, len(names), size)]


@dataclass
class LegoClusters:
    """lego before its centroids: every module's units and clusters (O(n²) kept per module).

    :func:`lego_clusters` makes them from the adapters (or from their first pass, without reading
    a weight); :func:`lego` then needs the weights once more, module by module, for the centroids.
    """

    units: dict[str, _Units]
    labels: dict[str, torch.Tensor]  # per module, the merged rank of each unit (input order)
    reference_sq_norms: dict[str, float | None]
    unit_probes: dict[str, tuple[torch.Tensor, torch.Tensor]]
    details: dict
    timings: dict[str, float]
    # per module whose centroids need no more than its Gram matrices (reweighting none / l2): the
    # (k, n) coefficients on the raw stacked A rows and B columns, and the report's products
    coefficients: dict[str, tuple[torch.Tensor, torch.Tensor, tuple]] = dataclasses.field(default_factory=dict)
    source_sq: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per module, each ‖w_t ΔW_t‖²


def _output_factor(adapters: Sequence[LoraAdapter], name: str, owners: list[int], rank: int, options: dict) -> float:
    """The output reweighting, sqrt(r̄/k) on the update, split over both halves (1 where it is off)."""
    if not options["output_reweight"]:
        return 1.0
    ranks = [adapters[t].modules[name].r for t in owners]
    return (sum(ranks) / len(ranks) / rank) ** 0.25


def lego_clusters(
    adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int], options: dict,
    summaries: Mapping[str, UnitSummary] | None = None,
) -> LegoClusters:
    """lego's first pass and k-means over every module of ``adapters``.

    Modules with as many units run as one batch from their Gram matrices onwards: features,
    canonical order, k-means and (reweighting none / l2) the centroids' coefficients.

    Args:
        adapters, weights, k, options: as :func:`lego` gets them.
        summaries: the first pass made beforehand (:func:`lego_viz.first_pass.summarize`); modules
            without one are read here (for a streamed merge, tensor by tensor).
    """
    device = _device(options["device"])
    names = module_order(adapters)
    timings = {"gram": 0.0, "kmeans": 0.0}
    clusters = LegoClusters(units={}, labels={}, reference_sq_norms={}, unit_probes={}, details={}, timings=timings)
    sorted_grams: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}
    by_size: dict[int, list[str]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    sorted_labels: dict[str, torch.Tensor] = {}
    kmeans_seconds = 0.0
    start = time.perf_counter()
    for name in names:
        n = sum(a.modules[name].r for a in adapters if name in a.modules)
        if n > GRAM_UNITS and k[name] < n:
            # An adapter library: n² no longer fits; k-means runs on a sketch of the points instead.
            units, points = _units(adapters, weights, name, options["features"], gram=False)
            order = canonical_order(points=points)
            clusters.units[name], orders[name] = units, order
            begin = time.perf_counter()
            sorted_labels[name], _ = sketch_kmeans(
                points[order].to(device), k[name], n_init=options["n_init"], max_iter=options["max_iter"], tol=options["tol"],
                generator=torch.Generator().manual_seed(options["seed"]))
            sorted_labels[name] = sorted_labels[name].cpu()
            kmeans_seconds += time.perf_counter() - begin
            continue
        by_size.setdefault(n, []).append(name)
    # The Gram route (O(n²) kept per module): modules of one size at once.
    batches: dict[tuple[str, ...], tuple[_Units, list[list[int]]]] = {}
    for n, same in by_size.items():
        for batch in _batches(same, n):
            units, owners = _gram_units(adapters, weights, batch, options["features"], summaries)
            batches[tuple(batch)] = units, owners
            gram = units.gram()
            order = canonical_order(gram)
            reordered = _reordered(gram, order)
            references, source_sq = _pair_sums(units, owners)
            probe_x, probe_z = span_probes(units.gram_a, units.gram_b)
            for i, name in enumerate(batch):
                clusters.units[name] = units.module(i, owners[i])
                sorted_grams[name], orders[name] = reordered[i], order[i]
                clusters.reference_sq_norms[name] = references[i]
                clusters.source_sq[name] = source_sq[i]
                clusters.unit_probes[name] = (probe_x[i], probe_z[i])
                groups.setdefault((n, k[name]), []).append(name)
    timings["gram"] = time.perf_counter() - start - kmeans_seconds
    # Which k-means ran, in modules: the report says so.
    clusters.details["kmeans"] = {f"gram (n ≤ {GRAM_UNITS} units)": len(names) - len(sorted_labels),
                                  f"sketch (n > {GRAM_UNITS} units)": len(sorted_labels)}

    start = time.perf_counter() - kmeans_seconds
    for (n, rank), group in groups.items():
        if rank == n:  # every unit its own cluster; exact even when units coincide
            for name in group:
                sorted_labels[name] = torch.arange(n)
            continue
        grams = torch.stack([sorted_grams[name] for name in group]).to(device)
        # n_features = d makes tol mean what it means in scikit-learn (relative to per-feature variance).
        dims = [sum(_dims(adapters, name)) for name in group]
        km = GramKMeans(rank, n_init=options["n_init"], max_iter=options["max_iter"], tol=options["tol"],
                        random_state=options["seed"]).fit(gram=grams, n_features=dims)
        for name, lab in zip(group, km.labels_.cpu()):
            sorted_labels[name] = lab
    for name in names:
        order = orders[name]
        labels = torch.empty(order.shape[0], dtype=torch.long)
        labels[order] = _relabel_by_first_member(sorted_labels[name], k[name])
        clusters.labels[name] = labels
    timings["kmeans"] = time.perf_counter() - start

    if options["param_reweight"] in ("none", "l2") and options["rescale"] == "none":
        start = time.perf_counter()
        for (n, rank), same in groups.items():
            for group in _batches(same, n):
                units, owners = batches.get(tuple(group)) or (_Units.stack([clusters.units[name] for name in group]),
                                                              [clusters.units[name].owners for name in group])
                output = torch.tensor([_output_factor(adapters, name, o, rank, options) for name, o in zip(group, owners)],
                                      dtype=torch.float64)
                labels = torch.stack([clusters.labels[name] for name in group])
                coef_a, coef_b, products = _gram_coefficients(units, owners, labels, rank, options["param_reweight"], output)
                for i, name in enumerate(group):
                    clusters.coefficients[name] = (coef_a[i], coef_b[i], products[i])
        timings["coefficients"] = time.perf_counter() - start
    return clusters


@register(
    "lego",
    "LoRA-LEGO: k-means over all units (MSUs) per module, one merged rank per cluster, dual reweighting.",
    options=LEGO_OPTIONS,
    takes_k=True,
    prepare=lego_clusters,
)
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
        products = None
        if name in clusters.coefficients:  # reweighted from the Gram matrices already
            coef_a, coef_b, products = clusters.coefficients[name]
            A = stacked([lora.A for lora in loras], 0, buffers[0])  # no copy after a streamed read
            B = stacked([lora.B for lora in loras], 1, buffers[1])
            c_a, c_b = _matmul(coef_a, A), _matmul(B, coef_b.T).T  # (k, d_in), (k, d_out)
        else:
            c_a, c_b, coef_a, coef_b = _centroids(adapters, name, units, labels, rank, options["param_reweight"])
            factor = _output_factor(adapters, name, units.owners, rank, options)
            if factor != 1.0:
                c_a, c_b, coef_a, coef_b = c_a.mul_(factor), c_b.mul_(factor), coef_a * factor, coef_b * factor
            if options["rescale"] == "lsq":
                scales = lsq_scales(adapters, weights, name, units.owners, c_a, c_b)
                root = scales.abs().sqrt()[:, None]  # split over both halves; the sign goes with b
                signed = root * torch.sign(scales)[:, None]
                c_a, c_b, coef_a, coef_b = c_a * root, c_b * signed, coef_a * root, coef_b * signed
            if units.gram_a is not None:
                products = _report_products(_Units.stack([units]), [units.owners], coef_a[None], coef_b[None])[0]
        out.modules[name] = LoraModule(A=c_a.contiguous(), B=c_b.T.contiguous(), scale=1.0, fan_in_fan_out=loras[0].fan_in_fan_out)
        if products is not None:
            cross, merged_sq = products
            out.report_products[name] = ReportProducts(out.modules[name], cross, clusters.source_sq[name], merged_sq)
            out.reference_sq_norms[name] = clusters.reference_sq_norms[name]
            out.unit_probes[name] = clusters.unit_probes[name]
        out.labels[name] = labels
        out.unit_owner[name] = units.adapter_index
    out.timings["centroids"] = time.perf_counter() - start
    return out
