"""LoRA-LEGO: cluster all units of a module with k-means and turn each cluster into one rank (DESIGN §4)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.first_pass import GRAM_UNITS, UnitSummary, one_blas_thread, summarize_module
from lego_viz.invariance import span_probes
from lego_viz.kmeans import GramKMeans, sketch_kmeans
from lego_viz.merge.base import MethodOutput, Option, register
from lego_viz.msu import FEATURE_MODES, stacked
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
    """

    owners: list[int]  # adapter index of each block of units
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

    def reference_sq_norm(self) -> float | None:
        """‖Σ_i b̃_i ã_iᵀ‖_F² = Σ_ij (ã_i·ã_j)(b̃_i·b̃_j), in float64 from the Gram matrices (None without them)."""
        if self.gram_a is None:
            return None
        fa, fb = self.fold_a.double(), self.fold_b.double()
        return float(((fa[:, None] * self.gram_a.double() * fa[None]) * (fb[:, None] * self.gram_b.double() * fb[None])).sum())

    def gram(self) -> torch.Tensor:
        """Gram matrix of the features k-means sees, (n, n)."""
        sa, sb = self.seen_a, self.seen_b
        return sa[:, None] * self.gram_a * sa[None] + sb[:, None] * self.gram_b * sb[None]


def _units(
    adapters: Sequence[LoraAdapter], weights: list[float], name: str, features: str, gram: bool = True,
    summary: UnitSummary | None = None,
) -> tuple[_Units, torch.Tensor | None]:
    """The module's units, and (``gram=False``, for the sketch path) the points k-means sees (n, d_in + d_out).

    On the Gram route everything comes from the module's :class:`UnitSummary` (given, or computed
    here from the stacked factors the same way), so a given summary spares the pass over the weights.
    """
    present = [(t, a.modules[name]) for t, a in enumerate(adapters) if name in a.modules]
    alpha = torch.cat([torch.full((lora.r,), lora.scale**0.5) for _, lora in present])
    beta = torch.cat([torch.full((lora.r,), lora.scale**0.5 * weights[t]) for t, lora in present])
    owner = torch.cat([torch.full((lora.r,), t, dtype=torch.long) for t, lora in present])
    A = B = None
    if not gram or summary is None:
        # float32 whatever the storage (a bf16/fp16 Gram would lose the precision k-means needs); no copy
        # when a streamed merge read the factors side by side already.
        A = stacked([lora.A for _, lora in present], 0)  # (n, d_in)
        B = stacked([lora.B for _, lora in present], 1)  # (d_out, n)
    if gram:
        if summary is None:
            summary = summarize_module(A.cpu().numpy(), B.cpu().numpy())
        gram_a, gram_b = torch.from_numpy(summary.gram_a), torch.from_numpy(summary.gram_b)
        row_max, row_min = torch.from_numpy(summary.row_max), torch.from_numpy(summary.row_min)
        sq_a, sq_b = gram_a.diagonal(), gram_b.diagonal()
    else:
        gram_a = gram_b = None
        sq_a, sq_b = A.square().sum(dim=1), B.square().sum(dim=0)
        # amax/amin read A once with no |A| temporary, ~10× faster than abs().argmax() (torch 2.13)
        row_max, row_min = A.amax(dim=1), A.amin(dim=1)
    head = ([t for t, _ in present], owner, gram_a, gram_b)
    if features == "raw":
        units = _Units(*head, alpha, beta, alpha, beta, alpha, beta, sq_a, sq_b)
    else:
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
            units = _Units(*head, avg_a, avg_b, avg_a, avg_b, alpha, beta, sq_a, sq_b)
        else:
            seen_a = sign * keep / raw_na.clamp_min(_TINY)
            seen_b = sign * torch.sign(beta) * keep / raw_nb.clamp_min(_TINY)
            units = _Units(*head, avg_a, avg_b, seen_a, seen_b, alpha, beta, sq_a, sq_b)
    points = None if gram else torch.cat([units.seen_a[:, None] * A, units.seen_b[:, None] * B.T], dim=1)
    return units, points


def canonical_order(gram: torch.Tensor | None = None, points: torch.Tensor | None = None) -> torch.Tensor:
    """An order of the points that does not depend on the order they came in.

    k-means++ seeding draws indices, so without this a permutation of the input ranks could land
    in another local optimum. Sorting by (squared norm, sum of inner products) — both
    permutation-equivariant — makes the whole merge permutation-invariant. From the Gram matrix,
    or from the points themselves (``x_i · Σ_j x_j``) when there are too many for one.
    """
    if gram is not None:
        g = gram.double()
        diag, rowsum = g.diagonal(), g.sum(dim=1)
    else:
        x = points.double()
        diag, rowsum = x.square().sum(dim=1), x @ x.sum(dim=0)
    order = torch.argsort(rowsum, stable=True)
    return order[torch.argsort(diag[order], stable=True)]


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


def _report_products(units: _Units, coef_a: torch.Tensor, coef_b: torch.Tensor, module: LoraModule) -> ReportProducts:
    """The report's inner products of a merged module from the Gram matrices (O(k·n²), no pass over the weights).

    With ``c_a = coef_a A``, ``c_b = coef_b Bᵀ`` and unit i of the weighted sum ``(f_b,i B[:, i]) (f_a,i A[i])ᵀ``:
    ``⟨ΔW_merge, unit i⟩ = f_a,i f_b,i (coef_a G_A)[:, i] · (coef_b G_B)[:, i]``, and every other term
    is a sum of Gram entries the same way. float64 from the float32 Gram matrices.
    """
    gram_a, gram_b = units.gram_a.double(), units.gram_b.double()
    coef_a, coef_b = coef_a.double(), coef_b.double()
    fold = units.fold_a.double() * units.fold_b.double()  # (n,)
    proj_a, proj_b = coef_a @ gram_a, coef_b @ gram_b  # (k, n)
    per_unit = (proj_a * proj_b).sum(dim=0) * fold
    pairs = fold[:, None] * gram_a * gram_b * fold[None]  # (n, n): ⟨unit i, unit j⟩
    block = torch.unique_consecutive(units.adapter_index, return_inverse=True)[1]  # source of each unit
    sources = int(block[-1]) + 1
    cross = torch.zeros(sources, dtype=torch.float64).index_add_(0, block, per_unit)
    by_rows = torch.zeros(sources, pairs.shape[1], dtype=torch.float64).index_add_(0, block, pairs)
    source_sq = torch.zeros(sources, sources, dtype=torch.float64).index_add_(1, block, by_rows).diagonal()
    merged_sq = float(((proj_a @ coef_a.T) * (proj_b @ coef_b.T)).sum())
    return ReportProducts(module=module, cross=cross.tolist(), source_sq=source_sq.tolist(), merged_sq=merged_sq)


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


def lego_clusters(
    adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int], options: dict,
    summaries: Mapping[str, UnitSummary] | None = None,
) -> LegoClusters:
    """lego's first pass and k-means over every module of ``adapters``.

    Args:
        adapters, weights, k, options: as :func:`lego` gets them.
        summaries: the first pass made beforehand (:func:`lego_viz.first_pass.summarize`); modules
            without one are read here (for a streamed merge, tensor by tensor).
    """
    device = _device(options["device"])
    names = module_order(adapters)
    timings = {"gram": 0.0, "kmeans": 0.0}
    clusters = LegoClusters(units={}, labels={}, reference_sq_norms={}, unit_probes={}, details={}, timings=timings)
    prepared: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    sorted_labels: dict[str, torch.Tensor] = {}
    kmeans_seconds = 0.0
    start = time.perf_counter()
    for name in names:  # pass 1: Gram matrices only (O(n²) kept per module)
        n = sum(a.modules[name].r for a in adapters if name in a.modules)
        if n > GRAM_UNITS and k[name] < n:
            # An adapter library: n² no longer fits; k-means runs on a sketch of the points instead.
            units, points = _units(adapters, weights, name, options["features"], gram=False)
            order = canonical_order(points=points)
            clusters.units[name], prepared[name] = units, (None, order)
            begin = time.perf_counter()
            sorted_labels[name], _ = sketch_kmeans(
                points[order].to(device), k[name], n_init=options["n_init"], max_iter=options["max_iter"], tol=options["tol"],
                generator=torch.Generator().manual_seed(options["seed"]))
            sorted_labels[name] = sorted_labels[name].cpu()
            kmeans_seconds += time.perf_counter() - begin
            continue
        units, _ = _units(adapters, weights, name, options["features"], summary=(summaries or {}).get(name))
        gram = units.gram()
        order = canonical_order(gram)
        clusters.units[name], prepared[name] = units, (gram[order][:, order], order)
        clusters.reference_sq_norms[name] = units.reference_sq_norm()
        clusters.unit_probes[name] = span_probes(units.gram_a, units.gram_b)
        groups.setdefault((gram.shape[0], k[name]), []).append(name)
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
        grams = torch.stack([prepared[name][0] for name in group]).to(device)
        # n_features = d makes tol mean what it means in scikit-learn (relative to per-feature variance).
        dims = [sum(_dims(adapters, name)) for name in group]
        km = GramKMeans(rank, n_init=options["n_init"], max_iter=options["max_iter"], tol=options["tol"],
                        random_state=options["seed"]).fit(gram=grams, n_features=dims)
        for name, lab in zip(group, km.labels_.cpu()):
            sorted_labels[name] = lab
    for name in names:
        order = prepared[name][1]
        labels = torch.empty(order.shape[0], dtype=torch.long)
        labels[order] = _relabel_by_first_member(sorted_labels[name], k[name])
        clusters.labels[name] = labels
    timings["kmeans"] = time.perf_counter() - start
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
    start = time.perf_counter()
    for name in names:  # pass 2: centroids, one product with the stacked factors per side
        units, labels, rank = clusters.units[name], clusters.labels[name], k[name]
        c_a, c_b, coef_a, coef_b = _centroids(adapters, name, units, labels, rank, options["param_reweight"])
        if options["output_reweight"]:
            ranks = [adapters[t].modules[name].r for t in units.owners]
            factor = (sum(ranks) / len(ranks) / rank) ** 0.25  # sqrt(r̄/k) on the update, split over both halves
            c_a, c_b, coef_a, coef_b = c_a.mul_(factor), c_b.mul_(factor), coef_a * factor, coef_b * factor
        if options["rescale"] == "lsq":
            scales = lsq_scales(adapters, weights, name, units.owners, c_a, c_b)
            root = scales.abs().sqrt()[:, None]  # split over both halves; the sign goes with b
            signed = root * torch.sign(scales)[:, None]
            c_a, c_b, coef_a, coef_b = c_a * root, c_b * signed, coef_a * root, coef_b * signed
        fan_in_fan_out = adapters[units.owners[0]].modules[name].fan_in_fan_out
        out.modules[name] = LoraModule(A=c_a.contiguous(), B=c_b.T.contiguous(), scale=1.0, fan_in_fan_out=fan_in_fan_out)
        if units.gram_a is not None:
            out.report_products[name] = _report_products(units, coef_a, coef_b, out.modules[name])
            out.reference_sq_norms[name] = clusters.reference_sq_norms[name]
            out.unit_probes[name] = clusters.unit_probes[name]
        out.labels[name] = labels
        out.unit_owner[name] = units.adapter_index
    out.timings["centroids"] = time.perf_counter() - start
    return out
