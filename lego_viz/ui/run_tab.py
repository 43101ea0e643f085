"""Tab 4: run the base, each adapter and the merge on a prompt; the merge lab (accuracy table with a random
control, retention against the number of adapters merged, k-sweep), scored by `lego_viz.zoo.lab`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.checks.invariance import lora_hooks
from lego_viz.ui import learn
from lego_viz.ui.errors import user_errors
from lego_viz.ui.merging import merged_session
from lego_viz.ui.models import fits_model, zoo_pool
from lego_viz.ui.plots import k_sweep_figure, retention_figure
from lego_viz.ui.runtime import on_gpu
from lego_viz.ui.state import Session
from lego_viz.zoo import lab
from lego_viz.zoo.evaluate import generate
from lego_viz.zoo.harness import Scorer
from lego_viz.zoo.tasks import TASKS

Modules = Mapping[str, LoraModule]


@dataclass
class RunTab:
    """The components other tabs wire to."""

    prompt: gr.Textbox
    run_button: gr.Button
    outputs_table: gr.Dataframe
    n_eval: gr.Slider
    accuracy_button: gr.Button
    accuracy_table: gr.Dataframe
    lab_notes: gr.Markdown
    retention_button: gr.Button
    retention_plot: gr.Plot
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


# ----------------------------------------------------------------------------- the merge lab


def _scorer(adapters: Sequence[LoraAdapter], n: float) -> Scorer:
    """A scorer that borrows a zoo base from the pool for each merge it decodes (other users' runs interleave)."""

    @contextlib.contextmanager
    def borrow() -> Iterator[tuple]:
        with zoo_pool().borrow() as (model, tokenizer):
            _require_fit(model, adapters)
            yield model, tokenizer

    return Scorer(borrow, int(n))


def _lab_selection(session: Session) -> tuple[list[LoraAdapter], list[float]]:
    """The selected zoo task adapters and their weights; other adapters are named in a warning."""
    adapters, weights = session.selected()
    kept, left_out = lab.lab_adapters(adapters)
    if left_out:
        gr.Warning(f"left out of the merge lab (not a zoo task adapter, or a second one of a task): {', '.join(left_out)}")
    by_name = dict(zip((a.name for a in adapters), weights))
    return kept, [by_name[a.name] for a in kept]


def _reporter(progress) -> Callable[[int, int, str], None]:
    return lambda done, total, what: progress((done, total), desc=what)


@on_gpu
def _measure(experiment: Callable, *args, **kwargs):
    """Run a lab experiment (a wrapper so ZeroGPU lends a GPU for its duration)."""
    return experiment(*args, **kwargs)


def table_view(table: Mapping) -> tuple[pd.DataFrame, str]:
    """The accuracy table (`LabTable.to_dict()`) as a data frame, and notes: what was measured, who refused and why."""
    header, rows = lab.table_cells(table)
    ks = " and ".join(map(str, table["k"]))
    notes = [
        f"Exact match (%) on **{table['n_per_task']}** held-out prompts per task; methods at equal rank k = {ks} "
        "(mean source rank r̄ and 2·r̄; methods whose rank is fixed by the inputs once). "
        f"*mean* has its 95% Wilson interval; *retention* = accuracy / each adapter's own; *control* = the same merge "
        f"of random adapters with the same shapes and unit norms (seed {table['control_seed']}); *margin* = mean − control, in points."
    ]
    if any(row["method"] == "arrow" for row in table["rows"]):
        notes.append(f"*{lab.ROUTED_NOTE}*.")
    notes += [f"**Refused** — {', '.join(labels)}: {reason}" for reason, labels in _group(table["refused"]).items()]
    return pd.DataFrame(rows, columns=header), "\n\n".join(notes)


@user_errors
def accuracy_table(session: Session, n: float, progress=gr.Progress()) -> tuple[pd.DataFrame, str]:  # noqa: B008 (Gradio's progress idiom)
    """Every merge method at equal rank beside its random control, the exact sum, the base and each adapter alone."""
    adapters, weights = _lab_selection(session)
    table = _measure(lab.accuracy_table, adapters, _scorer(adapters, n), weights, on_step=_reporter(progress))
    frame, notes = table_view(table.to_dict())
    for reason, labels in _group(table.refused).items():
        gr.Warning(f"{', '.join(labels)} refused: {reason}")
    return frame, notes


def _group(refused: Mapping[str, str]) -> dict[str, list[str]]:
    by_reason: dict[str, list[str]] = {}
    for label, reason in refused.items():
        by_reason.setdefault(reason, []).append(label)
    return by_reason


def _retention_title(curve: Mapping, what: str) -> str:
    return f"Retention vs number of adapters merged<br><sup>{what}; n = {curve['n_per_task']} per task; mean ± sd over subsets; k = r̄ of each subset</sup>"


@user_errors
def retention(session: Session, n: float, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
    """Mean retention against the number of adapters merged (2 … all selected), per method, a few seeded subsets each."""
    adapters, _ = _lab_selection(session)
    if len(adapters) < 2:
        raise ValueError("retention against the number of adapters needs at least two zoo task adapters selected")
    curve = _measure(lab.retention_curve, adapters, _scorer(adapters, n), on_step=_reporter(progress))
    if not curve["methods"]:
        raise ValueError(
            "none of the selected adapters solves its own task on these prompts, so retention (accuracy / own accuracy) "
            "is undefined; select trained zoo task adapters"
        )
    return retention_figure(curve, _retention_title(curve, "your selection"))


def _sweep_title(sweep: Mapping, what: str) -> str:
    return f"Accuracy and distance to the exact sum against k<br><sup>{what}; n = {sweep['n_per_task']} per task; bars: 95% intervals</sup>"


@user_errors
def k_sweep(session: Session, n: float, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
    """Mean accuracy and relative ΔW error against k for every method that takes k."""
    adapters, weights = _lab_selection(session)
    sweep = _measure(lab.k_sweep, adapters, _scorer(adapters, n), weights, on_step=_reporter(progress))
    return k_sweep_figure(sweep["methods"], _sweep_title(sweep, "your selection"))


def shipped_view() -> tuple[pd.DataFrame | None, str, object, object]:
    """The stored measurement on the whole zoo (table, notes, retention figure, k-sweep figure), or empty views."""
    results = lab.shipped_results()
    if results is None:
        return None, "No stored measurement for these zoo adapters (run `python scripts/merge_lab_table.py`); use the buttons.", None, None
    frame, notes = table_view(results["table"])
    curve, sweep = results.get("retention_curve"), results.get("k_sweep")
    shown = "Shown: the stored measurement on all zoo task adapters (`assets/zoo/merge_lab.json`); the buttons recompute it on your selection.\n\n"
    return (
        frame, shown + notes,
        retention_figure(curve, _retention_title(curve, "all zoo adapters, stored")) if curve else None,
        k_sweep_figure(sweep["methods"], _sweep_title(sweep, "all zoo adapters, stored")) if sweep else None,
    )


def build(session: gr.State) -> RunTab:
    """Lay out the run tab and wire its buttons."""
    examples = [[p] for task in TASKS.values() for p in task.example_prompts[:1]]
    frame, notes, curve_figure, sweep_figure = shipped_view()
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                prompt = gr.Textbox(examples[0][0], label="Prompt", scale=3, elem_id="run-prompt")
                run_button = gr.Button("Run", variant="primary", scale=1, elem_id="run")
            gr.Examples(examples, inputs=prompt, label="One example per zoo task")
            outputs_table = gr.Dataframe(headers=["model", "output"], value=[], interactive=False, label="Outputs", elem_id="run-outputs")
        with gr.Column(scale=2):
            gr.Markdown(learn.RUN)
    # The lab spans the page: its table is wide and its figures need the room.
    gr.Markdown("### Merge lab: does the merge keep the tasks?")
    with gr.Row(equal_height=True):
        n_eval = gr.Slider(10, 200, value=50, step=10, label="held-out prompts per task (more = slower, steadier)", scale=2)
        accuracy_button = gr.Button("Accuracy table (every method, with control)", elem_id="accuracy", scale=1)
        retention_button = gr.Button("Retention vs number of adapters", elem_id="retention", scale=1)
        sweep_button = gr.Button("k-sweep (every method that takes k)", elem_id="k-sweep", scale=1)
    scores = gr.Dataframe(value=frame, interactive=False, label="Exact-match accuracy (%)", elem_id="accuracy-table", max_height=900)
    lab_notes = gr.Markdown(notes, elem_id="lab-notes")
    retention_plot = gr.Plot(value=curve_figure, label="Retention vs number of adapters", elem_id="retention-plot")
    sweep_plot = gr.Plot(value=sweep_figure, label="k-sweep", elem_id="k-sweep-plot")
    run_button.click(run, [session, prompt], [session, outputs_table], api_name="run")
    prompt.submit(run, [session, prompt], [session, outputs_table], api_visibility="private")
    accuracy_button.click(accuracy_table, [session, n_eval], [scores, lab_notes], api_name="accuracy")
    retention_button.click(retention, [session, n_eval], retention_plot, api_name="retention")
    sweep_button.click(k_sweep, [session, n_eval], sweep_plot, api_name="k_sweep")
    return RunTab(prompt, run_button, outputs_table, n_eval, accuracy_button, scores, lab_notes, retention_button, retention_plot, sweep_button, sweep_plot)
