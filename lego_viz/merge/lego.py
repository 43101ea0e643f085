"""LoRA-LEGO: cluster all units of a module with k-means and turn each cluster into one rank (DESIGN §4)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.kmeans import GramKMeans
from lego_viz.merge.base import MethodOutput, Option, register
from lego_viz.msu import FEATURE_MODES, MSUTable, canonicalize, module_msus

PRESETS = {
    # The published behaviour, kept for comparison with the other presets.
    "paper": {"features": "raw", "param_reweight": "linf", "output_reweight": True},
}

LEGO_OPTIONS = {
    "features": Option("canonical", "what k-means sees: raw [ã; b̃], canonical (scale/sign fixed), normalized (directions)", choices=FEATURE_MODES),
    "param_reweight": Option("l2", "rescale each centroid to its members' mean norm (l2 / linf) or not", choices=("none", "l2", "linf")),
    "output_reweight": Option(True, "scale the merged update by sqrt(mean source rank / k)", kind=bool),
    "seed": Option(0, "k-means random seed", kind=int, minimum=0),
    "n_init": Option(10, "k-means restarts (best inertia kept)", kind=int, minimum=1, maximum=1000),
    "max_iter": Option(100, "Lloyd iterations per restart", kind=int, minimum=1, maximum=10000),
    "tol": Option(1e-4, "k-means convergence tolerance (relative centre shift)", kind=float, minimum=0.0),
    "device": Option("auto", "where k-means runs: auto (cuda if present), cpu or cuda", choices=("auto", "cpu", "cuda")),
}

_TINY = 1e-30


def _averaged_and_seen(table: MSUTable, features: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(vectors averaged into centroids, vectors k-means sees), each as (a-half, b-half)."""
    if features == "raw":
        pair = (table.a, table.b)
        return pair, pair
    a, b = canonicalize(table.a, table.b)
    if features == "canonical":
        return (a, b), (a, b)
    seen = (a / a.norm(dim=1, keepdim=True).clamp_min(_TINY), b / b.norm(dim=1, keepdim=True).clamp_min(_TINY))
    return (a, b), seen


def canonical_order(gram: torch.Tensor) -> torch.Tensor:
    """An order of the points that does not depend on the order they came in.

    k-means++ seeding draws indices, so without this a permutation of the input ranks could land
    in another local optimum. Sorting by (squared norm, sum of inner products) — both
    permutation-equivariant — makes the whole merge permutation-invariant.
    """
    g = gram.double()
    diag, rowsum = g.diagonal(), g.sum(dim=1)
    order = torch.argsort(rowsum, stable=True)
    return order[torch.argsort(diag[order], stable=True)]


def _relabel_by_first_member(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number clusters in order of their first member, so output ranks come out in a fixed order."""
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.long).scatter_reduce(0, labels, torch.arange(n), reduce="amin")
    rank_of = torch.empty(k, dtype=torch.long)
    rank_of[torch.argsort(first)] = torch.arange(k)
    return rank_of[labels]


def _centroids(labels: torch.Tensor, k: int, pair: tuple[torch.Tensor, torch.Tensor], reweight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members, optionally rescaled to the members' mean norm."""
    a, b = pair
    onehot = torch.zeros(labels.shape[0], k, dtype=a.dtype)
    onehot[torch.arange(labels.shape[0]), labels] = 1.0
    counts = onehot.sum(dim=0).clamp_min(1.0)
    mean = onehot / counts  # (n, k)
    c_a, c_b = mean.T @ a, mean.T @ b  # (k, d_in), (k, d_out)
    if reweight != "none":
        if reweight == "l2":
            member = (a.square().sum(1) + b.square().sum(1)).sqrt()
            current = (c_a.square().sum(1) + c_b.square().sum(1)).sqrt()
        else:
            member = torch.maximum(a.abs().amax(1), b.abs().amax(1))
            current = torch.maximum(c_a.abs().amax(1), c_b.abs().amax(1))
        target = mean.T @ member
        factor = torch.where(current > _TINY, target / current.clamp_min(_TINY), torch.zeros_like(current))
        c_a, c_b = c_a * factor[:, None], c_b * factor[:, None]
    return c_a, c_b


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from lego_viz.merge.base import MergeError

        raise MergeError("device='cuda' was asked for but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return torch.device(choice)


@register(
    "lego",
    "LoRA-LEGO: k-means over all units (MSUs) per module, one merged rank per cluster, dual reweighting.",
    options=LEGO_OPTIONS,
    takes_k=True,
)
def lego(adapters: Sequence[LoraAdapter], weights: list[float], k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    out = MethodOutput(modules={})
    timings = {"gram": 0.0, "kmeans": 0.0, "centroids": 0.0}
    device = _device(options["device"])
    prepared = {}
    groups: dict[tuple[int, int], list[str]] = {}
    start = time.perf_counter()
    for name in module_order(adapters):
        table = module_msus(adapters, name, weights)
        averaged, seen = _averaged_and_seen(table, options["features"])
        fa, fb = seen[0].to(device), seen[1].to(device)
        gram = fa @ fa.T + fb @ fb.T  # (n, n): all k-means needs
        order = canonical_order(gram).to(device)
        prepared[name] = (table, averaged, gram[order][:, order], order.cpu())
        groups.setdefault((table.n, k[name]), []).append(name)
    timings["gram"] = time.perf_counter() - start

    start = time.perf_counter()
    sorted_labels: dict[str, torch.Tensor] = {}
    for (n, rank), names in groups.items():
        if rank == n:  # every unit its own cluster; exact even when units coincide
            for name in names:
                sorted_labels[name] = torch.arange(n)
            continue
        grams = torch.stack([prepared[name][2] for name in names])
        km = GramKMeans(rank, n_init=options["n_init"], max_iter=options["max_iter"], tol=options["tol"],
                        random_state=options["seed"]).fit(gram=grams)
        for name, lab in zip(names, km.labels_.cpu()):
            sorted_labels[name] = lab
    timings["kmeans"] = time.perf_counter() - start

    start = time.perf_counter()
    for name in module_order(adapters):
        table, averaged, _, order = prepared[name]
        rank = k[name]
        labels = torch.empty(table.n, dtype=torch.long)
        labels[order] = _relabel_by_first_member(sorted_labels[name], rank)
        c_a, c_b = _centroids(labels, rank, averaged, options["param_reweight"])
        if options["output_reweight"]:
            ranks = [adapters[t].modules[name].r for t in torch.unique(table.adapter_index).tolist()]
            factor = (sum(ranks) / len(ranks) / rank) ** 0.25  # sqrt(r̄/k) on the update, split over both halves
            c_a, c_b = c_a * factor, c_b * factor
        out.modules[name] = LoraModule(A=c_a.contiguous(), B=c_b.T.contiguous(), scale=1.0, fan_in_fan_out=table.fan_in_fan_out)
        out.labels[name] = labels
        out.unit_owner[name] = table.adapter_index
    timings["centroids"] = time.perf_counter() - start
    out.timings = timings
    return out
