"""Tab "SMoRA router": which ranks a router picks, per token and per task, and where the picked units come from.

All numbers come from `lego_viz.smora` (probes on the shipped SMoRA adapters, or on the zoo base with
zero-shot Arrow-style routing over the zoo adapters' units applied); this module only turns them into
Plotly figures and wires them to widgets.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from lego_viz.adapters import load_adapter
from lego_viz.models.arrow import ArrowConfig, ArrowRouting, arrow_routing
from lego_viz.smora.assets import (
    adapter_modules,
    load_shipped,
    saved_tensor,
    shipped_adapters,
    shipped_results,
)
from lego_viz.smora.io import read_smora_config
from lego_viz.smora.probe import TaskRouting, TokenRouting, task_routing, token_routing
from lego_viz.smora.routing import load_balance
from lego_viz.smora.stats import source_share
from lego_viz.ui.errors import user_errors
from lego_viz.ui.models import ModelPool, zoo_pool
from lego_viz.ui.plots import PALETTE
from lego_viz.ui.runtime import device, on_gpu
from lego_viz.zoo.evaluate import generate
from lego_viz.zoo.model import adapter_dirs
from lego_viz.zoo.tasks import TASKS, held_out

# Held-out texts per task behind the task × rank and load figures (one batch per task: fast).
TASK_TEXTS = 48
# Which experiment runs draw the load-balance-over-training figure of each shipped adapter.
TRAINING_RUNS = {
    "multitask": {"smora": "with balancing", "smora_no_balance": "without balancing"},
    "merged_router": {"merged_router_balanced": "with balancing", "merged_router": "without balancing"},
}
# The run whose weights are the shipped adapter of that name.
SHIPPED_RUN = {"multitask": "smora", "merged_router": "merged_router"}
DEFAULT_MODULE = "model.layers.1.mlp.down_proj"
# Zero-shot routers over the zoo task adapters' units, offered beside the trained ones: k = 8 units per
# token like the shipped router over merged MSUs, and Arrow as published (top-1 / top-2 adapters).
ZERO_SHOT = {c.label: c for c in (ArrowConfig("unit", 8), ArrowConfig("adapter", 1), ArrowConfig("adapter", 2))}
_GATE_SCALE = [[0.0, "#ffffff"], [1e-6, "#e3eef9"], [1.0, "#08306b"]]  # 0 (inactive) stays white
_LAYOUT = {"template": "plotly_white", "margin": {"l": 10, "r": 10, "t": 50, "b": 10}}

INTRO = """
**SMoRA** treats each rank of a LoRA as an expert: per token, a router scores the ranks
(`σ = sigmoid(W_g x)`), adds a balancing bias `β`, keeps the top-k and gates them so the gates sum to k.
*multitask* is one SMoRA adapter trained on all zoo tasks; *merged_router* keeps the zoo task adapters'
MSUs frozen, concatenated, and only trains a router that picks k of them per token — a dynamic merge.
*arrow* routes the same units with **no training** (Arrow-style): per token, the top-k units whose input
direction `ã_i` best matches the hidden state `x` (`|ã_i·x|/‖ã_i‖`, gate 1 each), or the top-k adapters by
`|v_t·x|` (`v_t` the top right singular vector of the adapter's ΔW) weighted by a softmax of those scores.
"""


@functools.cache
def _pool(name: str) -> ModelPool:
    return ModelPool(lambda: load_shipped(name, device=device())[:2], max_size=1)


def _folder(name: str) -> Path:
    folders = shipped_adapters()
    if name not in folders:
        raise ValueError(f"unknown SMoRA adapter {name!r}; choose one of {sorted(folders) + list(ZERO_SHOT)}")
    return folders[name]


@functools.cache
def _zero_shot(name: str) -> ArrowRouting:
    """Zero-shot routing over the zoo task adapters' units (built once per choice)."""
    dirs = adapter_dirs()
    if not dirs:
        raise FileNotFoundError("zero-shot routing needs the demo zoo's task adapters; build them with `python scripts/build_zoo.py`")
    config = ZERO_SHOT[name]
    return arrow_routing([load_adapter(path, name=task) for task, path in dirs.items()], config.top_k, config.granularity)


def _modules(name: str) -> list[str]:
    return list(_zero_shot(name).layers) if name in ZERO_SHOT else adapter_modules(_folder(name))


def unit_labels(sources: Sequence[str], source: torch.Tensor) -> list[str]:
    """A label per unit from its source index: "reverse·3" is the 4th unit that came from the reverse adapter."""
    seen: dict[int, int] = {}
    labels = []
    for s in source.tolist():
        labels.append(f"{sources[s]}·{seen.setdefault(s, 0)}")
        seen[s] += 1
    return labels


@functools.cache
def _units(name: str) -> tuple[list[str], list[str], torch.Tensor | None]:
    """Unit labels, source names and per-unit source index (None for a plain SMoRA adapter)."""
    if name in ZERO_SHOT:
        routing = _zero_shot(name)
        source = next(iter(routing.layers.values())).unit_source.cpu()  # every zoo adapter targets every module
        return unit_labels(routing.source_names, source), routing.source_names, source
    config, _ = read_smora_config(_folder(name))
    if not config.sources:
        return [f"rank {i}" for i in range(config.r)], [], None
    folder = _folder(name)
    source = saved_tensor(folder, f"{adapter_modules(folder)[0]}.unit_source")  # the same in every layer
    return unit_labels(config.sources, source), list(config.sources), source


@contextlib.contextmanager
def _routed_model(name: str) -> Iterator[tuple[object, object, dict | None]]:
    """`(model, tokenizer, routed layers)`: a shipped SMoRA model (layers None), or the zoo base routed zero-shot."""
    if name not in ZERO_SHOT:
        with _pool(name).borrow() as (model, tokenizer):
            yield model, tokenizer, None
        return
    routing = _zero_shot(name)
    with zoo_pool().borrow() as (model, tokenizer), routing.applied(model):
        yield model, tokenizer, routing.layers


@on_gpu
def _route(name: str, prompt: str) -> tuple[str, TokenRouting]:
    with _routed_model(name) as (model, tokenizer, layers):
        completion = generate(model, tokenizer, [prompt])[0]
        return completion, token_routing(model, tokenizer, prompt + completion, layers=layers)


@functools.cache
@on_gpu
def _task_routing(name: str) -> TaskRouting:
    texts = {task: [p + a for p, a in held_out(task, TASK_TEXTS)] for task in TASKS}
    with _routed_model(name) as (model, tokenizer, layers):
        return task_routing(model, tokenizer, texts, layers=layers)


# ----------------------------------------------------------------------------- figures


def _token_labels(tokens: Sequence[str]) -> list[str]:
    # position first: the same character twice must stay two rows
    return [f"{i:>2} {t}" for i, t in enumerate(tokens)]


def gates_figure(tokens: Sequence[str], gates: torch.Tensor, units: Sequence[str], sources: Sequence[str],
                 unit_source: torch.Tensor | None, title: str) -> go.Figure:
    """Token × rank heatmap of gates (0 = inactive); for merged units a strip shows each unit's source."""
    rows = 2 if unit_source is not None else 1
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, row_heights=[0.06, 0.94][-rows:], vertical_spacing=0.01)
    labels = _token_labels(tokens)
    heat = go.Heatmap(
        z=gates.tolist(), x=list(units), y=labels, name="gates", colorscale=_GATE_SCALE, zmin=0, colorbar={"title": "gate"},
        hovertemplate="token %{y}<br>%{x}<br>gate %{z:.3f}<extra></extra>",
    )
    fig.add_trace(heat, row=rows, col=1)
    if unit_source is not None:
        fig.add_trace(_source_strip(units, sources, unit_source), row=1, col=1)
        fig.update_yaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(title_text="token (position, character)", autorange="reversed", type="category", dtick=1, row=rows, col=1)
    fig.update_xaxes(title_text="rank (unit)", type="category", row=rows, col=1)
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=max(320, 80 + 18 * len(tokens)), **_LAYOUT)
    return fig


def _source_strip(units: Sequence[str], sources: Sequence[str], unit_source: torch.Tensor) -> go.Heatmap:
    n = max(len(sources), 2)
    scale = [[i / (n - 1), PALETTE[min(round(i), len(sources) - 1) % len(PALETTE)]] for i in range(n)]
    return go.Heatmap(
        z=[unit_source.tolist()], x=list(units), y=["source"], name="source", colorscale=scale, zmin=0, zmax=n - 1, showscale=False,
        customdata=[[sources[s] for s in unit_source.tolist()]], hovertemplate="%{x}: from %{customdata}<extra></extra>",
    )


def sources_figure(tokens: Sequence[str], share: torch.Tensor, sources: Sequence[str]) -> go.Figure:
    """Per token, the share of gate mass on units of each source adapter (stacked bars)."""
    labels = _token_labels(tokens)
    fig = go.Figure([
        go.Bar(x=labels, y=share[:, t].tolist(), name=source, marker_color=PALETTE[t % len(PALETTE)],
               hovertemplate=f"token %{{x}}<br>{source}: %{{y:.0%}}<extra></extra>")
        for t, source in enumerate(sources)
    ])
    fig.update_layout(
        barmode="stack", title={"text": "Which source adapter the selected units come from, per token", "font": {"size": 13}},
        xaxis={"title": "token (position, character)", "type": "category"}, yaxis={"title": "share of gate mass", "tickformat": ".0%"},
        height=360, **_LAYOUT,
    )
    return fig


def task_figure(routing: TaskRouting, module: str, units: Sequence[str]) -> go.Figure:
    """Task × rank selection frequency (fraction of the task's tokens that picked each rank)."""
    freq = routing.frequency(module)
    fig = go.Figure(go.Heatmap(
        z=freq.tolist(), x=list(units), y=routing.tasks, colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "freq."},
        hovertemplate="task %{y}<br>%{x}<br>picked by %{z:.0%} of tokens<extra></extra>",
    ))
    fig.update_layout(
        title={"text": f"Selection frequency per task · {module} ({TASK_TEXTS} held-out texts per task)", "font": {"size": 13}},
        xaxis={"title": "rank (unit)", "type": "category", "tickangle": -90}, yaxis={"title": "task", "autorange": "reversed"},
        height=140 + 30 * len(routing.tasks), **_LAYOUT,
    )
    return fig


def load_figure(load: torch.Tensor, bias: torch.Tensor, units: Sequence[str], module: str,
                unit_source: torch.Tensor | None = None) -> go.Figure:
    """Per-rank load `c_i / mean(c)` as bars, with the balancing bias β on a second axis."""
    relative = (load / load.mean()).tolist()
    beta = bias.repeat_interleave(len(units) // bias.numel()).tolist()  # one β per block of rank_partition ranks
    colours = [PALETTE[s % len(PALETTE)] for s in unit_source.tolist()] if unit_source is not None else PALETTE[0]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=list(units), y=relative, name="load c / mean(c)", marker_color=colours,
                         hovertemplate="%{x}<br>load %{y:.2f} × mean<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=list(units), y=beta, name="bias β", mode="markers", marker={"color": "#d62728", "symbol": "diamond"},
                             hovertemplate="%{x}<br>β = %{y:.4f}<extra></extra>"), secondary_y=True)
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", secondary_y=False)
    fig.update_xaxes(title_text="rank (unit)", type="category", tickangle=-90)  # upright labels stay inside the figure
    # Axis titles name the two series, so no legend competes with the upright rank labels.
    fig.update_yaxes(title_text="load c / mean(c) (bars)", secondary_y=False)
    fig.update_yaxes(title_text="bias β (◆)", secondary_y=True, showgrid=False)
    fig.update_layout(
        title={"text": f"Load per rank · max(c)/mean(c) = {load_balance(load):.2f}"
                       f"<br><sup>held-out texts of all tasks · {module}</sup>", "font": {"size": 13}},
        height=400, showlegend=False, **{**_LAYOUT, "margin": {**_LAYOUT["margin"], "t": 70}},
    )
    return fig


def training_figure(results: dict | None, name: str) -> go.Figure:
    """The load-balance figure `max(c)/mean(c)` (mean over layers) at every training step."""
    if name in ZERO_SHOT:
        return _note("zero-shot routing: nothing was trained (no balancing bias β either)")
    fig = go.Figure()
    runs = (results or {}).get("runs", {})
    for i, (key, label) in enumerate(TRAINING_RUNS.get(name, {}).items()):
        if key in runs:
            values = runs[key]["load_balance"]
            gamma = runs[key].get("gamma", 0.0)
            fig.add_trace(go.Scatter(
                x=list(range(1, len(values) + 1)), y=values, mode="lines", line={"color": PALETTE[i]},
                name=f"{label} (γ={gamma:g})" + (" · this adapter" if SHIPPED_RUN.get(name) == key else ""),
                hovertemplate="step %{x}<br>max(c)/mean(c) = %{y:.2f}<extra></extra>",
            ))
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey", annotation_text="even load")
    fig.update_layout(
        title={"text": "Load balance during training (mean over layers; 1 = even)", "font": {"size": 13}},
        xaxis={"title": "training step"}, yaxis={"title": "max(c) / mean(c)"}, height=340,
        legend={"orientation": "h", "y": -0.25}, **_LAYOUT,
    )
    return fig if fig.data else _note("no training record for this adapter")


def _note(text: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(height=120, xaxis={"visible": False}, yaxis={"visible": False}, **_LAYOUT)
    return fig


# ----------------------------------------------------------------------------- handlers


def _check_module(name: str, module: str) -> None:
    if module not in _modules(name):
        raise ValueError(f"adapter {name!r} has no SMoRA layer {module!r}; pick one from the list")


@user_errors
def route(name: str, module: str, prompt: str):
    """Generate an answer to `prompt`, then show the gates of every token (prompt and answer) in `module`."""
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first, e.g. 'reverse: lego='")
    _check_module(name, module)
    completion, routing = _route(name, prompt.strip())
    units, sources, unit_source = _units(name)
    gates = routing.gates[module]
    title = f"Gates per token · {name} · {module} (0 = rank not selected)"
    gates_plot = gates_figure(routing.tokens, gates, units, sources, unit_source, title)
    if unit_source is None:
        return completion, gates_plot, _note("This adapter's ranks are its own: pick merged_router to see source adapters.")
    share = source_share(gates, unit_source, len(sources))
    return completion, gates_plot, sources_figure(routing.tokens, share, sources)


@user_errors
def task_stats(name: str, module: str):
    """Task × rank selection frequency and the per-rank load with the bias vector, for `module`."""
    _check_module(name, module)
    routing = _task_routing(name)
    units, _, unit_source = _units(name)
    # Zero-shot routing has no balancing bias: β = 0 is exactly what steers its selection.
    bias = torch.zeros(len(units)) if name in ZERO_SHOT else saved_tensor(_folder(name), f"{module}.router.bias")
    return task_figure(routing, module, units), load_figure(routing.load(module), bias, units, module, unit_source)


@user_errors
def choose_adapter(name: str, module: str | None = None):
    """Module choices (keeping `module` when adapter `name` has it) and the training figure of `name`."""
    modules = _modules(name)
    value = module if module in modules else DEFAULT_MODULE if DEFAULT_MODULE in modules else modules[0]
    return gr.Dropdown(choices=modules, value=value), training_figure(shipped_results(), name)


def first_visit(name: str, module: str, prompt: str, shown: str):
    """On opening the tab: route the example prompt and draw every figure, unless already shown."""
    if shown:
        return (gr.skip(),) * 5
    return (*route(name, module, prompt), *task_stats(name, module))


def build_smora_tab(tab: gr.Tab | None = None) -> None:
    """Lay out the SMoRA router tab (inside `tab`, the caller's `gr.Tab`) and wire its events.

    With `tab`, the first time it is opened routes the example prompt, so no figure starts empty.
    """
    folders = shipped_adapters()
    gr.Markdown(INTRO)
    if not folders:
        gr.Markdown("*No SMoRA adapters found: build them with `python scripts/train_smora.py` (needs the demo zoo).*")
        return
    name = "multitask" if "multitask" in folders else next(iter(folders))
    modules = adapter_modules(folders[name])
    examples = [[p] for task in TASKS.values() for p in task.example_prompts[:1]]
    with gr.Row():
        # Zero-shot routing needs the zoo task adapters beside the base.
        choices = list(folders) + (list(ZERO_SHOT) if adapter_dirs() else [])
        adapter = gr.Dropdown(choices, value=name, label="SMoRA adapter (trained) or zero-shot router", elem_id="smora-adapter")
        module = gr.Dropdown(modules, value=DEFAULT_MODULE if DEFAULT_MODULE in modules else modules[0],
                             label="layer / module", elem_id="smora-module")
    with gr.Row():
        prompt = gr.Textbox(examples[0][0], label="Prompt", scale=3, elem_id="smora-prompt")
        button = gr.Button("Route", variant="primary", scale=1, elem_id="smora-route")
    gr.Examples(examples, inputs=prompt, label="One example per zoo task")
    completion = gr.Textbox(label="Model output (greedy)", interactive=False, elem_id="smora-output")
    gates_plot = gr.Plot(label="Gates per token", elem_id="smora-gates")
    sources_plot = gr.Plot(label="Units by source adapter", elem_id="smora-sources")
    with gr.Row():
        tasks_plot = gr.Plot(label="Selection frequency per task", elem_id="smora-tasks")
        load_plot = gr.Plot(label="Load per rank and bias", elem_id="smora-load")
    training_plot = gr.Plot(training_figure(shipped_results(), name), label="Load balance over training", elem_id="smora-training")

    # Every event of the tab shares one queue slot, so they finish in the order they were asked for:
    # otherwise the first-open routing of the default adapter (slow while the model loads) could land
    # after a quick switch to another adapter and paint the old adapter's figures under the new name.
    one_at_a_time = {"concurrency_id": "smora", "concurrency_limit": 1}
    route_io = {"fn": route, "inputs": [adapter, module, prompt], "outputs": [completion, gates_plot, sources_plot], **one_at_a_time}
    tasks_io = {"fn": task_stats, "inputs": [adapter, module], "outputs": [tasks_plot, load_plot], **one_at_a_time}
    button.click(**route_io, api_name="smora_route").then(**tasks_io, api_name="smora_tasks")
    prompt.submit(**route_io, api_visibility="private")
    module.change(**route_io, api_visibility="private").then(**tasks_io, api_visibility="private")
    # Route again at once: the output and figures of the previous adapter must not stay under the new name.
    adapter.change(choose_adapter, [adapter, module], [module, training_plot], api_name="smora_adapter", **one_at_a_time).success(
        **route_io, api_visibility="private"
    ).success(**tasks_io, api_visibility="private")
    if tab is not None:
        tab.select(first_visit, [adapter, module, prompt, completion], route_io["outputs"] + tasks_io["outputs"],
                   api_visibility="private", **one_at_a_time)
