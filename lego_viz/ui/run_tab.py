"""Tab 4: run the base, each adapter and the merge on a prompt; the zoo accuracy table and the k-sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.export import reconstruction_errors
from lego_viz.invariance import lora_hooks
from lego_viz.merge import MERGE_METHODS, MergeError
from lego_viz.ui import learn
from lego_viz.ui.errors import user_errors
from lego_viz.ui.merging import max_k, merged_session, run_merge
from lego_viz.ui.models import fits_model, zoo_pool
from lego_viz.ui.plots import k_sweep_figure
from lego_viz.ui.runtime import on_gpu
from lego_viz.ui.state import Session
from lego_viz.zoo.evaluate import evaluate, generate
from lego_viz.zoo.tasks import TASKS

Modules = Mapping[str, LoraModule]
SWEEP_METHODS = ("lego", "svd")
_K_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class RunTab:
    """The components other tabs wire to."""

    prompt: gr.Textbox
    run_button: gr.Button
    outputs_table: gr.Dataframe
    n_eval: gr.Slider
    accuracy_button: gr.Button
    accuracy_table: gr.Dataframe
    sweep_button: gr.Button
    sweep_plot: gr.Plot


def _require_fit(model, adapters: Sequence[LoraAdapter]) -> None:
    if not fits_model(model, adapters):
        bases = ", ".join(sorted({f"'{a.base_model}'" for a in adapters if a.base_model})) or "another base model"
        raise ValueError(
            f"these adapters are for {bases}, which this panel cannot run: only the demo zoo's base is bundled. "
            "The map, the weight-space checks and the export work for them; run them on their own base in "
            "'Real adapters on their real base model' below."
        )


@on_gpu
def complete(prompt: str, variants: Sequence[tuple[str, Modules | None]], adapters: Sequence[LoraAdapter]) -> list[list[str]]:
    """Greedy completions of `prompt` by the base with each module set added (None: the base alone)."""
    rows = []
    with zoo_pool().borrow() as (model, tokenizer):
        _require_fit(model, adapters)
        for label, modules in variants:
            with lora_hooks(model, *([modules] if modules else [])):
                rows.append([label, generate(model, tokenizer, [prompt])[0]])
    return rows


@on_gpu
def accuracy(modules: Modules | None, tasks: Sequence[str], n: int, adapters: Sequence[LoraAdapter]) -> dict[str, float]:
    """Exact-match accuracy of the base plus `modules` on the held-out prompts of `tasks`."""
    with zoo_pool().borrow() as (model, tokenizer):
        _require_fit(model, adapters)
        with lora_hooks(model, *([modules] if modules else [])):
            return evaluate(model, tokenizer, tasks, n=n)


def _zoo_tasks(adapters: Sequence[LoraAdapter]) -> list[str]:
    tasks = [a.name for a in adapters if a.name in TASKS]
    if not tasks:
        raise ValueError(f"accuracy needs zoo task adapters ({', '.join(TASKS)}); load the demo zoo first")
    return tasks


@user_errors
def run(session: Session, prompt: str) -> tuple[Session, list[list[str]]]:
    """Outputs of the base, each selected adapter (alone, weight 1) and the current merge on `prompt`."""
    if not prompt or not prompt.strip():
        raise ValueError("type a prompt first, e.g. 'reverse: lego='")
    session = merged_session(session)
    adapters, _ = session.selected()
    variants = [("base", None), *((f"adapter · {a.name}", a.modules) for a in adapters)]
    variants.append((f"merge · {session.settings.method} (k={session.settings.k})", session.merged.modules))
    return session, complete(prompt.strip(), variants, adapters)


@user_errors
def accuracy_table(session: Session, n: float, progress=gr.Progress()) -> pd.DataFrame:  # noqa: B008 (Gradio's progress idiom)
    """Tasks × methods exact-match accuracy: base, each task's own adapter, and every merge method."""
    adapters, weights = session.selected()
    tasks, n = _zoo_tasks(adapters), int(n)
    own = {a.name: a for a in adapters}
    columns: dict[str, dict[str, float]] = {}
    skipped: dict[str, list[str]] = {}  # reason → methods, so one reason is shown once
    steps = ["base", "own adapter", *MERGE_METHODS]
    for i, step in enumerate(steps):
        progress((i, len(steps)), desc=f"evaluating {step}")
        if step == "base":
            columns[step] = accuracy(None, tasks, n, adapters)
        elif step == "own adapter":
            columns[step] = {t: accuracy(own[t].modules, [t], n, adapters)[t] for t in tasks}
        else:
            settings = dataclasses.replace(session.settings, method=step)
            try:
                merged = run_merge(adapters, weights, settings)
            except MergeError as exc:
                skipped.setdefault(str(exc), []).append(step)
                continue
            columns[f"{step} (k={settings.k})" if MERGE_METHODS[step].takes_k else step] = accuracy(merged.modules, tasks, n, adapters)
    for reason, methods in skipped.items():
        gr.Warning(f"{', '.join(methods)} skipped: {reason}")
    rows = [[task, *(f"{col[task]:.0%}" for col in columns.values())] for task in tasks]
    rows.append(["mean", *(f"{sum(col.values()) / len(col):.0%}" for col in columns.values())])
    return pd.DataFrame(rows, columns=["task", *columns])


@user_errors
def k_sweep(session: Session, n: float, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
    """Mean accuracy and relative ΔW error against k for lego (current settings) and svd."""
    adapters, weights = session.selected()
    tasks, n = _zoo_tasks(adapters), int(n)
    ks = sorted({k for k in (*_K_GRID, session.settings.k) if k <= max_k(adapters)})
    sweep = {m: {"k": [], "accuracy": [], "error": []} for m in SWEEP_METHODS}
    total, done = len(ks) * len(SWEEP_METHODS), 0
    for method in SWEEP_METHODS:
        for k in ks:
            progress((done, total), desc=f"{method}, k={k}")
            merged = run_merge(adapters, weights, dataclasses.replace(session.settings, method=method, k=k))
            errors = reconstruction_errors(merged, adapters)
            scores = accuracy(merged.modules, tasks, n, adapters)
            sweep[method]["k"].append(k)
            sweep[method]["accuracy"].append(sum(scores.values()) / len(scores))
            sweep[method]["error"].append(sum(errors.values()) / len(errors))
            done += 1
    return k_sweep_figure(sweep)


def build(session: gr.State) -> RunTab:
    """Lay out the run tab and wire its buttons."""
    examples = [[p] for task in TASKS.values() for p in task.example_prompts[:1]]
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                prompt = gr.Textbox(examples[0][0], label="Prompt", scale=3, elem_id="run-prompt")
                run_button = gr.Button("Run", variant="primary", scale=1, elem_id="run")
            gr.Examples(examples, inputs=prompt, label="One example per zoo task")
            outputs_table = gr.Dataframe(headers=["model", "output"], value=[], interactive=False, label="Outputs", elem_id="run-outputs")
            gr.Markdown("### Zoo accuracy")
            n_eval = gr.Slider(10, 200, value=50, step=10, label="held-out prompts per task (more = slower, steadier)")
            with gr.Row():
                accuracy_button = gr.Button("Accuracy table (tasks × methods)", elem_id="accuracy")
                sweep_button = gr.Button("k-sweep: lego vs svd", elem_id="k-sweep")
            scores = gr.Dataframe(value=[], interactive=False, label="Exact-match accuracy", elem_id="accuracy-table")
            sweep_plot = gr.Plot(label="k-sweep", elem_id="k-sweep-plot")
        with gr.Column(scale=2):
            gr.Markdown(learn.RUN)
    run_button.click(run, [session, prompt], [session, outputs_table], api_name="run")
    prompt.submit(run, [session, prompt], [session, outputs_table], api_visibility="private")
    accuracy_button.click(accuracy_table, [session, n_eval], scores, api_name="accuracy")
    sweep_button.click(k_sweep, [session, n_eval], sweep_plot, api_name="k_sweep")
    return RunTab(prompt, run_button, outputs_table, n_eval, accuracy_button, scores, sweep_button, sweep_plot)
