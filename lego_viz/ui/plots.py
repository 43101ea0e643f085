"""Plotly figures of the app: the MSU map, the cluster × adapter heatmap, the k-sweep, retention vs number of adapters."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from lego_viz.ui.msu_map import Facet, short_type, type_of

COLOUR_BY = ("cluster", "adapter", "layer", "module type")
PALETTE = qualitative.Dark24 + qualitative.Light24
_MAP_COLUMNS = 3
_HOVER = (
    "<b>%{customdata[0]}</b> · rank %{customdata[2]}<br>%{customdata[1]}<br>"
    "‖a‖ = %{customdata[3]:.3g}, ‖b‖ = %{customdata[4]:.3g}<br>cluster %{customdata[5]}<extra></extra>"
)


def _categories(facet: Facet, colour_by: str) -> list[str]:
    if colour_by == "cluster":
        return [f"cluster {c}" if c >= 0 else "no cluster" for c in facet.cluster] if facet.cluster else ["not clustered by this method"] * facet.n
    if colour_by == "adapter":
        return facet.adapter
    if colour_by == "layer":
        return [f"layer {layer}" for layer in facet.layer]
    if colour_by == "module type":
        return [short_type(type_of(m)) for m in facet.module]
    raise ValueError(f"unknown colouring {colour_by!r}; expected one of {COLOUR_BY}")


def _sort_key(label: str) -> tuple[str, int]:
    # "cluster 10" after "cluster 9"
    head, _, tail = label.rpartition(" ")
    return (head, int(tail)) if tail.isdigit() else (label, -1)


def msu_map_figure(facets: Sequence[Facet], colour_by: str, subtitle: str = "") -> go.Figure:
    """One scatter panel per facet, one point per MSU, a shared legend of the colour categories."""
    per_facet = [_categories(f, colour_by) for f in facets]
    order = sorted({c for cats in per_facet for c in cats}, key=_sort_key)
    if colour_by == "adapter":  # keep the load order, so colours match across tabs
        order = list(dict.fromkeys(a for f in facets for a in f.adapter))
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(order)}
    cols = min(_MAP_COLUMNS, len(facets))
    rows = math.ceil(len(facets) / cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[f"{f.title} · {f.n}" for f in facets],
        horizontal_spacing=0.04, vertical_spacing=0.12 / rows,
    )
    fig.update_annotations(font_size=12)  # the subplot titles
    shown: set[str] = set()
    for i, (facet, cats) in enumerate(zip(facets, per_facet)):
        row, col = divmod(i, cols)
        cluster = facet.cluster or [-1] * facet.n
        custom = list(zip(facet.adapter, facet.module, facet.rank, facet.norm_a, facet.norm_b, cluster))
        xy = facet.coords.tolist()
        for cat in order:
            idx = [j for j, c in enumerate(cats) if c == cat]
            if not idx:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[xy[j][0] for j in idx], y=[xy[j][1] for j in idx], mode="markers", name=cat,
                    legendgroup=cat, showlegend=cat not in shown,
                    marker={"color": colour[cat], "size": 7, "opacity": 0.85, "line": {"width": 0.5, "color": "white"}},
                    customdata=[custom[j] for j in idx], hovertemplate=_HOVER,
                ),
                row=row + 1, col=col + 1,
            )
            shown.add(cat)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_layout(
        height=max(420, 300 * rows), margin={"l": 10, "r": 10, "t": 60, "b": 10},
        title={"text": subtitle, "font": {"size": 14}}, legend={"title": {"text": colour_by}, "itemsizing": "constant"},
        template="plotly_white", hoverlabel={"align": "left"},
    )
    return fig


def cluster_heatmap(counts: torch.Tensor, adapter_names: Sequence[str], module: str) -> go.Figure:
    """Adapters × clusters counts of one module, clusters sorted by size, sizes in the column labels."""
    sizes = counts.sum(0)
    order = torch.argsort(sizes, descending=True, stable=True).tolist()
    z = counts[:, order].tolist()
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[f"c{j} ({int(sizes[j])})" for j in order], y=list(adapter_names), colorscale="Blues",
            text=z, texttemplate="%{text}", hovertemplate="%{y} → %{x}: %{z} MSUs<extra></extra>", showscale=False,
        )
    )
    fig.update_layout(
        title={"text": f"MSUs per adapter in each cluster · {module}", "font": {"size": 13}},
        height=120 + 28 * len(adapter_names), margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis={"title": "cluster (size)", "type": "category"}, yaxis={"autorange": "reversed", "type": "category"},
        template="plotly_white",
    )
    return fig


def _error_band(series: Mapping[str, Sequence[float]]) -> dict | None:
    """Plotly error bars from a series' 95% interval (`low`, `high`), if it has one."""
    if "low" not in series or "high" not in series:
        return None
    up = [high - acc for acc, high in zip(series["accuracy"], series["high"])]
    down = [acc - low for acc, low in zip(series["accuracy"], series["low"])]
    return {"type": "data", "symmetric": False, "array": up, "arrayminus": down, "thickness": 1, "width": 3}


def k_sweep_figure(sweep: Mapping[str, Mapping[str, Sequence[float]]], title: str = "") -> go.Figure:
    """Mean accuracy (with its 95% interval when given) and relative ΔW error against k, one line per method.

    Args:
        sweep: `{method: {"k": [...], "accuracy": [...], "error": [...], optional "low"/"high": [...]}}`.
        title: the figure title (what was measured, on how many prompts).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=["mean accuracy on held-out prompts", "relative ‖ΔW − Σ w·ΔW‖ error"])
    for i, (method, series) in enumerate(sweep.items()):
        style = {"color": PALETTE[i % len(PALETTE)]}
        fig.add_trace(
            go.Scatter(x=series["k"], y=series["accuracy"], error_y=_error_band(series), name=method, legendgroup=method, line=style, mode="lines+markers"),
            row=1, col=1,
        )
        fig.add_trace(
            go.Scatter(x=series["k"], y=series["error"], name=method, legendgroup=method, line=style, mode="lines+markers", showlegend=False),
            row=1, col=2,
        )
    fig.update_xaxes(title_text="k (rank of the merge)")
    fig.update_yaxes(title_text="exact match, mean over tasks", range=[0, 1.02], tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="relative error (0 = the exact sum)", rangemode="tozero", row=1, col=2)
    # The top margin keeps the panel titles clear of the "k-sweep" label Gradio draws over the plot.
    fig.update_layout(
        height=460, margin={"l": 10, "r": 10, "t": 110 if title else 70, "b": 10}, template="plotly_white",
        # Centred: Gradio draws the plot's label over the top-left corner.
        title={"text": title, "font": {"size": 14}, "x": 0.5, "xanchor": "center", "y": 0.97}, legend={"title": {"text": "method"}},
    )
    return fig


def retention_figure(curve: Mapping, title: str = "") -> go.Figure:
    """Mean retention against the number of adapters merged, one line per method, ± sd over subsets as error bars.

    Args:
        curve: `lego_viz.zoo.lab.retention_curve`'s result.
        title: the figure title.
    """
    fig = go.Figure()
    for i, (method, series) in enumerate(curve["methods"].items()):
        fig.add_trace(
            go.Scatter(
                x=series["sizes"], y=series["mean"], name=method, mode="lines+markers",
                line={"color": PALETTE[i % len(PALETTE)], "dash": "solid" if i < 10 else "dot"},
                error_y={"type": "data", "array": series["sd"], "thickness": 1, "width": 3},
                customdata=[[len(runs), sd] for runs, sd in zip(series["runs"], series["sd"])],
                hovertemplate=f"{method}<br>%{{x}} adapters: %{{y:.0%}} ± %{{customdata[1]:.0%}} (%{{customdata[0]}} subsets)<extra></extra>",
            )
        )
    sizes = sorted({size for series in curve["methods"].values() for size in series["sizes"]})
    fig.update_xaxes(title_text="number of adapters merged", tickvals=sizes)
    fig.update_yaxes(title_text="retention (share of each adapter's own accuracy)", tickformat=".0%", rangemode="tozero")
    fig.update_layout(
        height=440, margin={"l": 10, "r": 10, "t": 80, "b": 10}, template="plotly_white",
        title={"text": title, "font": {"size": 14}, "x": 0.5, "xanchor": "center"}, legend={"title": {"text": "method"}},
    )
    return fig
