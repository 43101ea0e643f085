"""What the MSU map shows: which modules form a panel, and the points, labels and hover data of each.

Vectors are only comparable between modules of the same shape, so a selection is split into
panels ("facets"), one per module type (all `q_proj`s across layers), never padded across shapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lego_viz.adapters import LoraAdapter, module_order
from lego_viz.units.msu import MSUTable, module_msus
from lego_viz.units.projection import ProjectionCache, ProjectionConfig

ALL = "all modules (one panel per type)"
_LAYER = re.compile(r"\.(\d+)\.")

# One cache per process: keyed by feature content, so sessions never see each other's data by mistake.
PROJECTIONS = ProjectionCache(max_entries=256)


def layer_of(module: str) -> int | None:
    """The layer index in a module path (`model.layers.3.mlp.up_proj` → 3), or None."""
    match = _LAYER.search(f".{module}.")
    return int(match.group(1)) if match else None


def type_of(module: str) -> str:
    """The module path without its layer index: `model.layers.*.mlp.up_proj`."""
    return _LAYER.sub(".*.", f".{module}.", count=1).strip(".")


def short_type(module_type: str) -> str:
    """The readable tail of a type: `model.layers.*.mlp.up_proj` → `mlp.up_proj`."""
    return module_type.split("*.", 1)[-1]


def selector_choices(adapters: Sequence[LoraAdapter]) -> list[str]:
    """Entries of the module/layer selector: all, each type, each layer, each module."""
    modules = module_order(adapters)
    types = list(dict.fromkeys(type_of(m) for m in modules))
    layers = sorted({layer for m in modules if (layer := layer_of(m)) is not None})
    return [
        ALL,
        *(f"type: {t}" for t in types),
        *(f"layer: {layer}" for layer in layers),
        *(f"module: {m}" for m in modules),
    ]


def select_modules(adapters: Sequence[LoraAdapter], choice: str) -> list[str]:
    """The modules a selector entry stands for (only those some adapter has)."""
    modules = module_order(adapters)
    if choice == ALL:
        chosen = modules
    elif choice.startswith("type: "):
        chosen = [m for m in modules if type_of(m) == choice[6:]]
    elif choice.startswith("layer: "):
        chosen = [m for m in modules if str(layer_of(m)) == choice[7:]]
    elif choice.startswith("module: "):
        chosen = [m for m in modules if m == choice[8:]]
    else:
        raise ValueError(f"unknown map selection {choice!r}; pick one from the list")
    if not chosen:
        raise ValueError(f"the selected adapters have no module matching {choice!r}; pick another entry")
    return chosen


def separation(table: MSUTable, features: str = "canonical") -> float | None:
    """How well a module's units separate by adapter: the mean silhouette of the adapter labels.

    Distance 1 − |cos| on the features k-means sees: a unit and its negation are the same update, and
    the sign canonical features pick is arbitrary between near-orthogonal units (measured on the zoo:
    signed-cosine silhouettes ≈ 0 in every module, |cos| ones 0.11–0.31). 1 means every unit is closer
    to its own adapter's units than to any other's, 0 no structure; None with fewer than two adapters.
    """
    labels = table.adapter_index
    present = torch.unique(labels)
    if len(present) < 2:
        return None
    vectors = table.features(features)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    distance = (1 - (vectors @ vectors.T).abs()).clamp_min(0)  # (n, n)
    members = (labels[:, None] == present[None, :]).float()  # (n, T)
    counts = members.sum(0)
    own = members.argmax(1)
    totals = distance @ members  # (n, T): summed distance to each adapter's units
    within = totals.gather(1, own[:, None]).squeeze(1) / (counts[own] - 1).clamp_min(1)
    others = (totals / counts).masked_fill(members.bool(), float("inf")).amin(1)
    score = (others - within) / torch.maximum(within, others).clamp_min(1e-12)
    score = torch.where(counts[own] > 1, score, torch.zeros_like(score))  # a lone unit has no silhouette
    return score.mean().item()


def most_separated_module(adapters: Sequence[LoraAdapter], weights: Sequence[float], features: str = "canonical") -> str:
    """The module whose units separate most by adapter (`separation`): the map's first view, coloured by adapter.

    Several modules at once, each clustered on its own, make "cluster" colours meaningless; one module
    where the adapters' units stand apart shows what an MSU is. Ties go to the earliest module.
    """
    scores = {}
    for module in module_order(adapters):
        value = separation(module_msus(adapters, module, weights), features)
        if value is not None:
            scores[module] = value
    if not scores:  # one adapter: any module shows its units
        return module_order(adapters)[0]
    return max(scores, key=scores.get)


@dataclass(frozen=True)
class Facet:
    """One panel of the map: MSUs of modules that share a type and a shape."""

    title: str
    coords: torch.Tensor  # (n, 2)
    adapter: list[str]
    module: list[str]
    layer: list[int]
    rank: list[int]
    norm_a: list[float]
    norm_b: list[float]
    cluster: list[int] | None  # cluster within its own module (labels of different modules are unrelated)

    @property
    def n(self) -> int:
        return self.coords.shape[0]


def _group_by_type(modules: Sequence[str], adapters: Sequence[LoraAdapter]) -> dict[str, list[str]]:
    shapes = {m: next((a.modules[m].d_in, a.modules[m].d_out) for a in adapters if m in a.modules) for m in modules}
    groups: dict[str, list[str]] = {}
    for m in modules:
        d_in, d_out = shapes[m]
        # Equal types normally share a shape; the key keeps them apart if a model breaks that (GPT-2 c_proj).
        groups.setdefault(f"{short_type(type_of(m))} {d_in}→{d_out}", []).append(m)
    return groups


def build_facets(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    modules: Sequence[str],
    features: str,
    projection: ProjectionConfig,
    labels: dict[str, torch.Tensor] | None = None,
) -> list[Facet]:
    """Project the MSUs of `modules` (one panel per type) with the features k-means sees.

    Args:
        adapters: the selected adapters.
        weights: one per adapter (scales the `b` half, as in the merge).
        modules: modules to show; they are grouped into panels by type and shape.
        features: "raw", "canonical" or "normalized".
        projection: UMAP or PCA settings; results are cached by feature content.
        labels: cluster label per MSU of each module (the merge's `labels`), if known.

    Returns:
        One `Facet` per panel, in first-seen order.
    """
    facets = []
    for title, group in _group_by_type(modules, adapters).items():
        tables = [module_msus(adapters, m, weights) for m in group]
        coords = PROJECTIONS.project(torch.cat([t.features(features) for t in tables]), projection)
        meta: dict[str, list] = {key: [] for key in ("adapter", "module", "layer", "rank", "norm_a", "norm_b")}
        clusters: list[int] | None = [] if labels is not None else None
        for table in tables:
            norms = table.norms()
            meta["adapter"] += [table.adapter_names[i] for i in table.adapter_index.tolist()]
            meta["module"] += [table.module] * table.n
            meta["layer"] += [layer_of(table.module) or 0] * table.n
            meta["rank"] += table.rank_index.tolist()
            meta["norm_a"] += norms["norm_a"].tolist()
            meta["norm_b"] += norms["norm_b"].tolist()
            if clusters is not None:
                clusters += labels[table.module].tolist() if table.module in labels else [-1] * table.n
        facets.append(Facet(title=title, coords=coords, cluster=clusters, **meta))
    return facets

