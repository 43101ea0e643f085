"""Which k? Reconstruction error against rank per module, a knee, and ranks under a total budget.

Everything comes from the factors: the ``svd`` curve is the tail energy of the small core's singular
values (one QR + one n×n SVD per module gives every k at once), the ``lego`` curve one merge per k
on a grid, measured against the exact weighted sum with factored inner products. The budget allocation is greedy on
the marginal drop of squared relative error; on the svd curve those drops are the normalised
squared singular values, which never increase with k, so greedy is optimal there.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from lego_viz.adapters import AdapterError, LoraAdapter, adapter_weights, check_compatible, module_order
from lego_viz.checks.retention import factored_inner
from lego_viz.units.msu import module_msus

CURVE_METHODS = ("svd", "lego")


@dataclass(frozen=True)
class ModuleCurve:
    """Relative error ``‖ΔW_k − Σ w_t ΔW_t‖_F / ‖Σ w_t ΔW_t‖_F`` of one module at k = 1..max_k."""

    module: str
    n: int  # units (MSUs) the module has: k ≤ n
    svd: list[float]  # at k = 1..max_k
    lego_k: list[int] = field(default_factory=list)  # the ks lego was measured at (a grid: one merge each)
    lego: list[float] = field(default_factory=list)

    @property
    def max_k(self) -> int:
        return len(self.svd)


@dataclass(frozen=True)
class Advice:
    """Curves, suggested ranks and a budget allocation for one adapter set (JSON-ready via :meth:`to_dict`)."""

    curves: list[ModuleCurve]
    knee: dict[str, int]  # method → suggested global k (knee of the mean curve)
    module_knee: dict[str, int]  # module → knee of its svd curve
    budget: int
    allocation: dict[str, int]  # module → k under the budget
    allocated_error: float  # mean relative error (svd) at the allocation
    uniform_k: int  # the global k the same budget buys
    uniform_error: float  # mean relative error (svd) at uniform_k

    def mean_curve(self, method: str) -> tuple[list[int], list[float]]:
        """``(ks, mean relative error over modules)``; past its own largest k a module keeps its last value."""
        series = [(c.lego_k if method == "lego" else list(range(1, c.max_k + 1)), getattr(c, method)) for c in self.curves]
        series = [(ks, errors) for ks, errors in series if errors]
        if not series:
            return [], []
        grid = sorted({k for ks, _ in series for k in ks})
        means = []
        for k in grid:
            values = [errors[max(i for i, kk in enumerate(ks) if kk <= k)] for ks, errors in series]
            means.append(sum(values) / len(values))
        return grid, means

    def with_budget(self, budget: int) -> Advice:
        """The same curves with ranks allocated under another total budget (cheap: no merge runs)."""
        allocation = allocate(self.curves, budget)
        uniform = max(1, budget // len(self.curves))
        return dataclasses.replace(
            self, budget=budget, allocation=allocation, allocated_error=_error_at(self.curves, allocation),
            uniform_k=uniform, uniform_error=_error_at(self.curves, dict.fromkeys(allocation, uniform)),
        )

    def summary(self) -> dict:
        """What ``merge_report.json`` keeps: the suggestions and the allocation, without the per-module curves."""
        mean = {}
        for method in CURVE_METHODS:
            ks, errors = self.mean_curve(method)
            if ks:
                mean[method] = {"k": ks, "relative_error": errors}
        return {"suggested_k": self.knee, "budget": self.budget, "allocation": self.allocation,
                "allocated_error": self.allocated_error, "uniform_k": self.uniform_k, "uniform_error": self.uniform_error,
                "mean_curve": mean}

    def to_dict(self) -> dict:
        return {**self.summary(), "module_knee": self.module_knee, "curves": [asdict(c) for c in self.curves]}


def svd_curve(B: torch.Tensor, A: torch.Tensor, max_k: int) -> list[float]:
    """Relative error of the best rank-k approximation of ``B A`` for k = 1..max_k (Eckart–Young tail)."""
    r_b = torch.linalg.qr(B.double(), mode="r").R
    r_a = torch.linalg.qr(A.T.double(), mode="r").R
    energy = torch.linalg.svdvals(r_b @ r_a.T).square()
    total = float(energy.sum())
    if total == 0.0:
        return [0.0] * max_k
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j ≥ i} σ_j²
    return [float((tail[k] / total).clamp_min(0).sqrt()) if k < tail.shape[0] else 0.0 for k in range(1, max_k + 1)]


def knee(ks: Sequence[int], errors: Sequence[float]) -> int:
    """The k where an error curve bends most: the point farthest below the chord from its first to its last point.

    A curve with no point below its chord (straight, concave, or under three points) gives its first k.
    """
    if len(errors) < 3:
        return ks[0]
    (k0, e0), (k1, e1) = (ks[0], errors[0]), (ks[-1], errors[-1])
    gaps = [e0 + (e1 - e0) * (k - k0) / (k1 - k0) - e for k, e in zip(ks, errors)]
    best = max(range(len(errors)), key=lambda i: (gaps[i], -i))
    return ks[best] if gaps[best] > 0 else ks[0]


def k_grid(top: int) -> list[int]:
    """The ks the lego curve is measured at: every k up to 8, then steps of about ×1.5, and ``top``."""
    grid, k = list(range(1, min(top, 8) + 1)), 8
    while k < top:
        k = min(top, max(k + 1, round(k * 1.5)))
        grid.append(k)
    return grid


def allocate(curves: Sequence[ModuleCurve], budget: int, method: str = "svd") -> dict[str, int]:
    """Per-module ranks summing to at most ``budget`` that minimise Σ (relative error)², greedily.

    Every module gets at least rank 1 (a PEFT module needs one); each further rank goes where it
    lowers the squared relative error most.

    Raises:
        AdapterError: the budget is smaller than the number of modules.
    """
    if budget < len(curves):
        raise AdapterError(f"a budget of {budget} ranks cannot give each of the {len(curves)} modules rank 1; "
                           f"give --budget ≥ {len(curves)}.")
    ranks = {c.module: 1 for c in curves}
    by_name = {c.module: getattr(c, method) for c in curves}

    def gain(name: str) -> float:
        errors, k = by_name[name], ranks[name]
        return errors[k - 1] ** 2 - errors[k] ** 2

    heap = [(-gain(c.module), i, c.module) for i, c in enumerate(curves) if len(by_name[c.module]) > 1]
    heapq.heapify(heap)
    left = budget - len(curves)
    while left > 0 and heap:
        _, i, name = heapq.heappop(heap)
        ranks[name] += 1
        left -= 1
        if ranks[name] < len(by_name[name]):
            heapq.heappush(heap, (-gain(name), i, name))
    return ranks


def k_patterns(ranks: Mapping[str, int]) -> dict[str, int]:
    """Per-module ranks as a ``k`` mapping for :func:`lego_viz.merge.merge`: each full name escaped, so
    it matches only itself (k patterns are regexes matched at the end of a module name)."""
    return {re.escape(name): k for name, k in ranks.items()}


def _error_at(curves: Sequence[ModuleCurve], ranks: Mapping[str, int]) -> float:
    return sum(c.svd[min(ranks[c.module], c.max_k) - 1] for c in curves) / len(curves)


def lego_curves(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], max_k: Mapping[str, int], **options
) -> dict[str, tuple[list[int], list[float]]]:
    """Relative error of a lego merge on :func:`k_grid` up to each module's ``max_k`` (one merge per k).

    The error uses ``‖M − T‖² = ‖T‖² − 2⟨M, T⟩ + ‖M‖²`` with factored inner products (float64):
    O(d·n·k) per module instead of a QR of the difference, and exact enough at these error sizes.
    """
    from lego_viz.merge import merge

    names = list(max_k)
    targets = {}
    for name in names:
        B, A = module_msus(adapters, name, weights).factors()
        targets[name] = (B, A, factored_inner(B, A, B, A))
    curves: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in names}
    for k in k_grid(max(max_k.values())):
        todo = [name for name in names if k <= max_k[name]]
        # Modules past their max_k ride along at rank 1 (cheap) and are not recorded.
        ranks = {name: (k if name in todo else 1) for name in names}
        merged = merge(adapters, "lego", k=k_patterns(ranks), weights=list(weights), allow_base_mismatch=True, **options)
        for name in todo:
            B, A, norm = targets[name]
            lora = merged.modules[name]
            b_m = lora.B * lora.scale
            square = norm - 2 * factored_inner(b_m, lora.A, B, A) + factored_inner(b_m, lora.A, b_m, lora.A)
            curves[name][0].append(k)
            curves[name][1].append((max(square, 0.0) / norm) ** 0.5 if norm > 0 else 0.0)
    return curves


def advise(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    budget: int | None = None,
    max_rank: int | None = None,
    lego: bool = True,
    allow_base_mismatch: bool = False,
    **lego_options,
) -> Advice:
    """Reconstruction error against k per module (svd, and lego unless ``lego=False``), the knee, and
    per-module ranks under a total rank budget.

    Args:
        adapters: the adapters to merge (same base model and shapes: checked).
        weights: one per adapter, default 1.
        budget: total ranks over all modules; default: the number of modules × the svd knee.
        max_rank: the largest k considered per module (default: twice the largest source rank,
            capped at each module's number of units).
        lego: also compute the lego curve (one merge per grid k; the svd curve is nearly free).
        allow_base_mismatch: accept different base-model names when shapes agree.
        **lego_options: options for the lego merges (``seed``, ``n_init``, ...).

    Returns:
        An :class:`Advice`.
    """
    adapters = list(adapters)
    if not adapters:
        raise AdapterError("give at least one adapter to advise on.")
    check_compatible(adapters, allow_base_mismatch=allow_base_mismatch)
    weights = adapter_weights(adapters, weights)
    if max_rank is not None and max_rank < 1:
        raise AdapterError(f"max_rank must be at least 1, got {max_rank}.")
    top = max_rank or 2 * max(max(a.ranks) for a in adapters)
    curves, limits = [], {}
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        limits[name] = min(top, table.n)
        curves.append(ModuleCurve(name, table.n, svd_curve(*table.factors(), limits[name])))
    if lego:
        measured = lego_curves(adapters, weights, limits, **lego_options)
        curves = [ModuleCurve(c.module, c.n, c.svd, *measured[c.module]) for c in curves]
    draft = Advice(curves, {}, {}, 0, {}, 0.0, 0, 0.0)
    knees = {m: knee(*draft.mean_curve(m)) for m in CURVE_METHODS if draft.mean_curve(m)[0]}
    module_knee = {c.module: knee(range(1, c.max_k + 1), c.svd) for c in curves}
    draft = dataclasses.replace(draft, knee=knees, module_knee=module_knee)
    return draft.with_budget(len(curves) * knees["svd"] if budget is None else budget)
