"""Tab 2: the MSU map and the merge controls. Changing k re-clusters and recolours; the map stays put."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from lego_viz.merge import MERGE_METHODS
from lego_viz.ui import learn
from lego_viz.ui.errors import user_errors
from lego_viz.ui.merging import max_k, merged_session
from lego_viz.ui.msu_map import (
    ALL,
    build_facets,
    most_separated_module,
    select_modules,
    selector_choices,
    separation,
)
from lego_viz.ui.plots import COLOUR_BY, cluster_heatmap, msu_map_figure
from lego_viz.ui.state import RESCALE_MODES, MergeSettings, Session
from lego_viz.units.msu import FEATURE_MODES, module_msus
from lego_viz.units.projection import PROJECTION_METHODS, ProjectionConfig

PARAM_REWEIGHT = ("none", "l2", "linf")


@dataclass
class MapTab:
    """The components other tabs wire to."""

    selection: gr.Dropdown
    projection: gr.Radio
    colour_by: gr.Radio
    method: gr.Dropdown
    k: gr.Slider
    features: gr.Radio
    param_reweight: gr.Radio
    output_reweight: gr.Checkbox
    rescale: gr.Radio
    seed: gr.Number
    button: gr.Button
    plot: gr.Plot
    heatmap: gr.Plot
    summary: gr.Markdown

    @property
    def inputs(self) -> list:
        """Inputs of `cluster`, after the session state."""
        return [
            self.selection, self.projection, self.colour_by, self.method, self.k, self.features,
            self.param_reweight, self.output_reweight, self.seed, self.rescale,
        ]

    @property
    def outputs(self) -> list:
        """Outputs of `cluster`, after the session state."""
        return [self.plot, self.heatmap, self.summary]


@user_errors
def refresh_controls(session: Session, selection: str, k: float) -> tuple:
    """Fit the selector entries and the k range to the selected adapters.

    A selection the adapters lack (before the first load: none) becomes the module whose units separate
    most by adapter — the first view shows structure, not per-module cluster colours across many modules.
    """
    adapters, weights = session.selected()
    choices = selector_choices(adapters)
    top = max_k(adapters)
    if selection not in choices:
        selection = f"module: {most_separated_module(adapters, weights)}"
    return (
        gr.update(choices=choices, value=selection),
        gr.update(maximum=top, value=min(int(k), top)),
    )


def _summary(session: Session) -> str:
    merged, settings, gaps = session.merged, session.settings, session.merge_errors
    spec = MERGE_METHODS[settings.method]
    ranks = sorted(set(merged.ranks.values()))
    rank = ranks[0] if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    mean_gap = sum(gaps.values()) / len(gaps)
    lines = [
        f"**{settings.method}** → merged rank **{rank}** on {len(merged.modules)} modules "
        f"in {merged.timings.get('total', 0.0) * 1000:.0f} ms. *{spec.description}*",
        f"Distance to the exact weighted sum Σ w·ΔW: mean **{mean_gap:.1%}**, worst {max(gaps.values()):.1%} (relative Frobenius error).",
    ]
    if not merged.labels:
        lines.append("This method does not cluster MSUs, so *colour by cluster* has nothing to show; colour by adapter instead.")
    lines += [f"⚠ {w}" for w in dict.fromkeys(merged.warnings)][:3]
    return "\n\n".join(lines)


@user_errors
def cluster(
    session: Session, selection: str, projection: str, colour_by: str, method: str, k: float, features: str,
    param_reweight: str, output_reweight: bool, seed: float, rescale: str = "none",
    progress=gr.Progress(),  # noqa: B008 (Gradio's way)
) -> tuple:
    """Merge with the controls' settings (reused if unchanged) and draw the map and the cluster heatmap.

    Returns:
        (session, map figure, heatmap figure or None, summary markdown)
    """
    settings = MergeSettings(method, int(k), features, param_reweight, bool(output_reweight), int(seed), rescale)
    session = merged_session(session, settings, lambda done, total: progress(done / total, desc=f"merged {done}/{total} modules"))
    adapters, weights = session.selected()
    merged = session.merged
    # No selection (an API call that leaves it out): the first view, one module where the adapters separate.
    modules = select_modules(adapters, selection) if selection else [most_separated_module(adapters, weights, features)]
    # The projection seed is fixed: a new merge seed must not move the points.
    facets = build_facets(adapters, weights, modules, features, ProjectionConfig(method=projection), merged.labels or None)
    subtitle = f"{sum(f.n for f in facets)} MSUs · {projection.upper()} of {features} features · coloured by {colour_by}"
    if colour_by == "cluster" and len(modules) > 1:
        subtitle += " (each module has its own clusters)"
    if len(modules) == 1 and (score := separation(module_msus(adapters, modules[0], weights), features)) is not None:
        subtitle += f"<br>{modules[0]} · separation by adapter (mean silhouette, 1 − |cos|): {score:.2f}"
    figure = msu_map_figure(facets, colour_by, subtitle)
    heatmap = None
    if merged.labels:
        focus = modules[0]
        heatmap = cluster_heatmap(merged.cluster_composition(focus).T, [a.name for a in adapters], focus)
    return session, figure, heatmap, _summary(session)


def build(session: gr.State) -> MapTab:
    """Lay out the map tab and wire its own events."""
    defaults = MergeSettings()
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            selection = gr.Dropdown(
                # No value until a load: then the module whose adapters separate most is chosen (refresh_controls).
                [ALL], value=None, label="Show", info="one module, one type across layers, one layer, or all", elem_id="map-selection",
                # API callers never see the refreshed choices; select_modules validates the value instead.
                allow_custom_value=True,
            )
            projection = gr.Radio(list(PROJECTION_METHODS), value="umap", label="Projection", info="UMAP keeps neighbours; PCA is linear and instant")
            colour_by = gr.Radio(list(COLOUR_BY), value="adapter", label="Colour by", elem_id="colour-by")
            method = gr.Dropdown(list(MERGE_METHODS), value=defaults.method, label="Merge method", elem_id="merge-method")
            # The range fits the selection after each load; API callers get this wide one and merge() checks k.
            k = gr.Slider(1, 256, value=defaults.k, step=1, label="k — rank of the merge (clusters per module)", elem_id="k-slider")
            features = gr.Radio(list(FEATURE_MODES), value=defaults.features, label="Features k-means sees")
            param_reweight = gr.Radio(list(PARAM_REWEIGHT), value=defaults.param_reweight, label="Parameter reweighting")
            output_reweight = gr.Checkbox(value=defaults.output_reweight, label="Output reweighting (× sqrt(r̄ / k))")
            rescale = gr.Radio(
                list(RESCALE_MODES), value=defaults.rescale, label="Rescale merged ranks (lego)", elem_id="lego-rescale",
                info="lsq: one scale per rank, fitted to the exact sum from factors (replaces both reweightings' scales)",
            )
            seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
            button = gr.Button("Merge and draw", variant="primary", elem_id="cluster")
        with gr.Column(scale=3):
            plot = gr.Plot(label="MSU map", elem_id="msu-map")
            summary = gr.Markdown(elem_id="merge-summary")
            heatmap = gr.Plot(label="Cluster composition", elem_id="cluster-heatmap")
    with gr.Accordion("Learn: what is on this map?", open=True):
        gr.Markdown(learn.MAP)
    tab = MapTab(
        selection, projection, colour_by, method, k, features, param_reweight, output_reweight, rescale, seed, button, plot, heatmap, summary
    )
    cluster_args = {"fn": cluster, "inputs": [session, *tab.inputs], "outputs": [session, *tab.outputs]}
    redraw = {**cluster_args, "api_visibility": "private", "trigger_mode": "always_last", "show_progress": "minimal"}
    button.click(**cluster_args, api_name="cluster")
    # Slider and text-like controls fire on release/submit, so dragging does not queue a merge per pixel.
    k.release(**redraw)
    seed.submit(**cluster_args, api_visibility="private")
    # k means nothing to methods whose rank is fixed by the inputs (linear, PEFT-style).
    method.change(lambda m: gr.update(interactive=MERGE_METHODS[m].takes_k), method, k, api_visibility="private", queue=False)
    for control in (projection, colour_by, features, param_reweight, output_reweight, rescale):
        control.input(**redraw)
    # A dropdown fires .input twice per pick with the mouse (Gradio 6.31): two merges, every error shown twice.
    # .change fires once per new value, typed or picked.
    selection.change(**redraw)
    # A refused method (e.g. ties on unequal ranks) goes back in the dropdown to the method the map shows.
    method.change(**redraw).failure(shown_method, session, method, api_visibility="private", queue=False)
    return tab


def shown_method(session: Session) -> str:
    """The method of the merge the session holds (the default before any)."""
    return session.settings.method
