"""The map tab's "Which k?" panel (error against k, the knee, a rank budget) and the retention bars of the merge."""

from __future__ import annotations

import dataclasses

import gradio as gr
import plotly.graph_objects as go

from lego_viz.checks.retention import retention
from lego_viz.merge.advise import Advice, advise
from lego_viz.ui.errors import user_errors
from lego_viz.ui.plots import PALETTE
from lego_viz.ui.state import Session

LEARN = """
**Which k?** For every module, how far a rank-k merge is from the exact weighted sum
‖ΔW_k − Σ w·ΔW‖ / ‖Σ w·ΔW‖, averaged over modules: `svd` is the best any rank-k update can do
(the tail of the singular values), `lego` is what clustering gives (with its reweighting, which trades
closeness for output scale). The suggested k sits at the knee, where more rank stops paying. The
budget splits a total number of ranks over the modules where they cut the error most; the export
then carries per-module ranks (`rank_pattern`) and the suggestion in `merge_report.json`.

**Retention** of each adapter: ⟨ΔW_merge, w·ΔW_t⟩ / ‖w·ΔW_t‖², the share of its update the merge
keeps (1 = all of it; above 1 when other adapters push the same way), mean over its modules.
"""


def curves_figure(advice: Advice) -> go.Figure:
    """Mean relative error against k for each method, the knee marked, the uniform k the budget buys."""
    fig = go.Figure()
    for i, method in enumerate(advice.knee):
        ks, errors = advice.mean_curve(method)
        colour = PALETTE[i]
        fig.add_trace(go.Scatter(x=ks, y=errors, name=method, mode="lines+markers", line={"color": colour},
                                 hovertemplate=f"{method} k=%{{x}}: %{{y:.3f}}<extra></extra>"))
        k = advice.knee[method]
        fig.add_trace(go.Scatter(x=[k], y=[errors[ks.index(k)]], name=f"{method} knee: k={k}", mode="markers",
                                 marker={"color": colour, "size": 14, "symbol": "star"}))
    fig.add_trace(go.Scatter(x=[advice.uniform_k], y=[advice.allocated_error], mode="markers",
                             name=f"budget {advice.budget}: per-module ranks",
                             marker={"color": "black", "size": 12, "symbol": "diamond-open", "line": {"width": 2}}))
    fig.update_layout(
        height=380, margin={"l": 10, "r": 10, "t": 50, "b": 10}, template="plotly_white",
        title={"text": f"Which k? Mean over {len(advice.curves)} modules", "font": {"size": 13}},
        xaxis={"title": "k (rank of the merge, per module)"},
        yaxis={"title": "relative error vs the exact sum", "rangemode": "tozero"},
        legend={"title": {"text": "method"}},
    )
    return fig


def _advice_text(advice: Advice) -> str:
    knees = ", ".join(f"**{m}: k = {k}**" for m, k in advice.knee.items())
    return (
        f"Suggested k (knee of the mean curve): {knees}.\n\n"
        f"A budget of **{advice.budget}** ranks over {len(advice.curves)} modules: uniform k = {advice.uniform_k} "
        f"→ mean error {advice.uniform_error:.3f}; spent per module → **{advice.allocated_error:.3f}** "
        f"(ranks {min(advice.allocation.values())}–{max(advice.allocation.values())}, svd curve). "
        "The export tab's report records this suggestion."
    )


@user_errors
def suggest(session: Session, budget: float) -> tuple:
    """Compute the curves for the selected adapters and allocate the budget (0 or below the module count: the default)."""
    adapters, weights = session.selected()
    n_modules = len({m for a in adapters for m in a.modules})
    advice = advise(adapters, weights, budget=int(budget) if budget and budget >= n_modules else None,
                    seed=session.settings.seed)
    session = dataclasses.replace(session, advice=advice.summary())
    top = n_modules * max(c.max_k for c in advice.curves)
    slider = gr.update(minimum=n_modules, maximum=top, value=advice.budget)
    return session, advice, curves_figure(advice), _advice_text(advice), slider


@user_errors
def rebudget(session: Session, advice: Advice | None, budget: float) -> tuple:
    """Reallocate the same curves under a new budget (no merges run)."""
    if advice is None:
        raise gr.Error("press “Suggest k” first: the budget splits the curves it draws.", print_exception=False)
    advice = advice.with_budget(int(budget))
    return dataclasses.replace(session, advice=advice.summary()), advice, curves_figure(advice), _advice_text(advice)


def retention_figure(session: Session) -> go.Figure | None:
    """Bars: how much of each selected adapter the current merge keeps (mean over its modules)."""
    if session.merged is None:
        return None
    adapters, weights = session.selected()
    scores = retention(session.merged.modules, adapters, weights)
    names = list(scores)
    fig = go.Figure(go.Bar(
        x=[scores[n]["mean"] for n in names], y=names, orientation="h",
        marker={"color": [PALETTE[i % len(PALETTE)] for i in range(len(names))]},
        text=[f"{scores[n]['mean']:.2f}" for n in names], textposition="auto",
        hovertemplate="%{y}: %{x:.3f}<extra></extra>", showlegend=False,
    ))
    fig.add_vline(x=1.0, line_dash="dot", line_color="grey", annotation_text="all of it", annotation_position="top")
    fig.update_layout(
        height=110 + 30 * len(names), margin={"l": 10, "r": 10, "t": 40, "b": 10}, template="plotly_white",
        title={"text": f"Retention in weight space · {session.merged.method}, rank {max(session.merged.ranks.values())}",
               "font": {"size": 13}},
        xaxis={"title": "⟨ΔW_merge, w·ΔW_t⟩ / ‖w·ΔW_t‖² (mean over modules)"},
        yaxis={"title": "source adapter", "autorange": "reversed", "type": "category"},
    )
    return fig


@user_errors
def retention_bars(session: Session) -> go.Figure | None:
    return retention_figure(session)


def build(session: gr.State, summary: gr.Markdown) -> None:
    """Lay out the retention bars and the "Which k?" panel under the map; `summary` changes after every merge."""
    bars = gr.Plot(label="Retention of each adapter", elem_id="retention-bars")
    # A new merge rewrites the summary; redraw the bars from the session it left.
    summary.change(retention_bars, session, bars, api_visibility="private", queue=False)
    advice_state = gr.State(None)
    with gr.Accordion("Which k?", open=False, elem_id="which-k"):
        with gr.Row():
            budget = gr.Slider(0, 1024, value=0, step=1, label="Total rank budget over all modules (0: modules × the knee)",
                               elem_id="rank-budget")
            button = gr.Button("Suggest k", elem_id="suggest-k")
        text = gr.Markdown(elem_id="advice-text")
        curves = gr.Plot(label="Error against k", elem_id="advice-curves")
        gr.Markdown(LEARN)
    button.click(suggest, [session, budget], [session, advice_state, curves, text, budget], api_name="advise")
    budget.release(rebudget, [session, advice_state, budget], [session, advice_state, curves, text], api_visibility="private")
