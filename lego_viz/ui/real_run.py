"""The run tab's real-base panel: load the adapters' own base model and see, on your text, how much of
each adapter the merge keeps (outputs, log-likelihood, KL retention, output-space checks).

The library work is in `lego_viz.models.base` and `lego_viz.models.compare`; this module resolves the base
for the session's adapters, lends one shared instance per request and formats the results.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
from plotly.colors import qualitative

from lego_viz.adapters import LoraAdapter, same_base
from lego_viz.merge import MERGE_METHODS, MergeError
from lego_viz.models.base import (
    ALLOWLIST_ENV,
    BaseModelError,
    BaseSource,
    adapters_base,
    load_base,
    resolve_base,
)
from lego_viz.models.compare import (
    MAX_TEXTS,
    MAX_TOKENS,
    RetentionReport,
    greedy_outputs,
    model_variants,
    output_retention,
    output_space_checks,
    parse_texts,
    read_texts,
)
from lego_viz.ui.errors import user_errors
from lego_viz.ui.merging import run_merge
from lego_viz.ui.models import ModelPool, fits_model
from lego_viz.ui.runtime import check_allowed_path, device, on_gpu
from lego_viz.ui.state import Session

# Distinct real bases held in memory at once (each pool lends one instance at a time: a second
# copy of a 1 B model would double the memory for little gain on a shared CPU).
MAX_BASES = 1
DEFAULT_METHODS = ("lego", "svd", "linear")
OUTPUT_TOKENS = 24  # greedy tokens per model: a sentence's worth, (T + 2) models deep
RETENTION_HEADERS = ["merge", "adapter", "KL(adapter‖merge)", "KL(adapter‖base)", "kept"]
CHECK_HEADERS = ["check", "max |Δlogit|", "tolerance", "expected", "result"]
_CHECK_NAMES = {
    "permutation": "permute ranks (rows of A with columns of B)",
    "concat_sum": "concatenate all adapters = all applied together",
    "permutation_a_only": "shuffle rows of A only (pairing broken)",
}
LEARN = f"""
### Run real adapters on their real base
The base is the one the adapters name (`base_model_name_or_path`), found in your Hugging Face cache
(works offline) or on the Hub; or type a local folder or hub id. It loads once and is shared.

**kept** = 1 − KL(adapter ‖ merge) / KL(adapter ‖ base), averaged over every token of your text:
100% when the merge predicts exactly what the adapter alone does, 0% when it is no closer to the
adapter than the base is, below 0 when farther. *n/a* marks an adapter that barely changes the base
on this text (nothing to keep). No labels needed — paste text like the adapter's task
(≤ {MAX_TEXTS} lines, {MAX_TOKENS} tokens each). Task heads (`modules_to_save`) run with their own adapter
but are never part of a merge.
"""


@dataclass
class RealRunPanel:
    """The components tests and other tabs wire to."""

    base: gr.Textbox
    load_button: gr.Button
    status: gr.Markdown
    prompt: gr.Textbox
    outputs_button: gr.Button
    outputs_table: gr.Dataframe
    text: gr.Textbox
    upload: gr.File
    methods: gr.CheckboxGroup
    retention_button: gr.Button
    retention_table: gr.Dataframe
    retention_plot: gr.Plot
    retention_notes: gr.Markdown
    checks_button: gr.Button
    checks_table: gr.Dataframe


# --------------------------------------------------------------------------- the shared bases


_POOLS: collections.OrderedDict[tuple[str, str], ModelPool] = collections.OrderedDict()
_POOLS_LOCK = threading.Lock()


def base_pool(source: BaseSource) -> ModelPool:
    """The process-wide pool of `source` (created on first use; the least recently used base is dropped)."""
    key = (str(source.path), device())
    with _POOLS_LOCK:
        pool = _POOLS.pop(key, None) or ModelPool(functools.partial(load_base, source, device()), max_size=1)
        _POOLS[key] = pool
        while len(_POOLS) > MAX_BASES:
            _POOLS.popitem(last=False)  # borrowers of a dropped pool keep their model until they finish
        return pool


@functools.lru_cache(maxsize=16)
def _resolve(name: str, public: bool, where: str, env: tuple) -> BaseSource:
    # Counting parameters builds the model on the meta device; done once per name and setting.
    return resolve_base(name, public=public, device=where)


def resolve_for(adapters: Sequence[LoraAdapter], spec: str | None, public: bool) -> tuple[BaseSource, list[str]]:
    """The base for `adapters` (typed `spec` or their own), with notes on a name that differs from theirs."""
    typed = bool(spec and spec.strip())
    name = spec.strip() if typed else adapters_base(adapters)
    local = name.startswith(("/", "\\", ".", "~")) or Path(name).expanduser().exists()
    if local and not public:
        check_allowed_path(name)
    env = tuple(os.environ.get(k, "") for k in (ALLOWLIST_ENV, "LEGO_VIZ_MAX_BASE_PARAMS", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "LEGO_VIZ_CACHE"))
    source = _resolve(name, public, device(), env)
    # A typed hub id can be compared with the adapters' own; a local folder's name says nothing.
    notes = [
        f"{a.name} was trained on {a.base_model!r}, not {name!r}: its outputs mean something only on its own base."
        for a in adapters if typed and not local and a.base_model and not same_base(a.base_model, name)
    ]
    return source, notes


def _require_fit(model, adapters: Sequence[LoraAdapter], source: BaseSource) -> None:
    if not fits_model(model, adapters):
        raise BaseModelError(
            f"the adapters' layer shapes do not match {source.name} ({source.model_type}): they were trained on "
            f"{', '.join(sorted({str(a.base_model) for a in adapters}))}. Give that model as the base."
        )


# --------------------------------------------------------------------------- model-running (GPU) parts


@on_gpu
def _load_and_describe(source: BaseSource, adapters: Sequence[LoraAdapter]) -> tuple[str, list[str]]:
    """(where the model runs, notes on the adapters' heads)."""
    with base_pool(source).borrow() as (model, _):
        _require_fit(model, adapters, source)
        _, notes = model_variants(model, adapters, {})
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return f"{device()}, {dtype}", notes


@on_gpu
def _outputs(source, adapters, merges, prompt: str) -> list[tuple[str, str]]:
    with base_pool(source).borrow() as (model, tokenizer):
        _require_fit(model, adapters, source)
        variants, _ = model_variants(model, adapters, merges)
        return greedy_outputs(model, tokenizer, prompt, variants, OUTPUT_TOKENS)


@on_gpu
def _retention(source, adapters, merges, texts: Sequence[str]) -> RetentionReport:
    with base_pool(source).borrow() as (model, tokenizer):
        _require_fit(model, adapters, source)
        return output_retention(model, tokenizer, texts, adapters, merges)


@on_gpu
def _checks(source, adapters, weights, text: str, seed: int):
    with base_pool(source).borrow() as (model, tokenizer):
        _require_fit(model, adapters, source)
        return output_space_checks(model, tokenizer, text, adapters, weights, seed=seed)


# --------------------------------------------------------------------------- handlers


def merges_for(session: Session, methods: Sequence[str]) -> dict[str, dict]:
    """label → merged modules of the selection, one per method at the session's k and options."""
    adapters, weights = session.selected()
    merges, skipped = {}, {}
    for method in methods or [session.settings.method]:
        settings = dataclasses.replace(session.settings, method=method)
        try:
            merged = run_merge(adapters, weights, settings)
        except MergeError as exc:
            skipped.setdefault(str(exc), []).append(method)
            continue
        merges[f"{method} k={settings.k}" if MERGE_METHODS[method].takes_k else method] = merged.modules
    for reason, names in skipped.items():
        gr.Warning(f"{', '.join(names)} skipped: {reason}")
    if not merges:
        raise ValueError("no merge method could merge these adapters; pick another method.")
    return merges


def _texts(text: str | None, upload: str | None) -> tuple[list[str], list[str]]:
    if upload:
        return read_texts(upload)
    return parse_texts(text or "")


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def retention_rows(report: RetentionReport) -> list[list[str]]:
    """The retention table: one row per (merge, adapter)."""
    return [
        [r["merge"], r["adapter"], f"{r['kl_to_merge']:.4g}", f"{r['kl_to_base']:.4g}", _pct(r["kept"])]
        for r in report.rows()  # log-likelihoods are in the summary above the table
    ]


def retention_figure(report: RetentionReport) -> go.Figure:
    """Bars of `kept` per adapter, one colour per merge method (n/a adapters have no bar)."""
    fig = go.Figure()
    for i, merge in enumerate(report.merges):
        kept = [report.kept(merge, a) for a in report.adapters]
        fig.add_bar(
            name=merge, x=report.adapters, y=[None if math.isnan(v) else 100 * v for v in kept],
            marker_color=qualitative.Dark24[i % len(qualitative.Dark24)],
            text=[_pct(v) for v in kept], textposition="outside",
        )
    fig.add_hline(y=100, line_dash="dot", line_color="grey", annotation_text="merge = adapter", annotation_position="top left")
    fig.update_layout(
        barmode="group", height=400, margin={"l": 60, "r": 20, "t": 60, "b": 40},
        title=f"{report.n_texts} texts, {report.n_tokens} tokens", yaxis_title="kept (%)",
        legend={"orientation": "h", "y": 1.12, "x": 0},
    )
    return fig


def _summary(source: BaseSource, report: RetentionReport, notes: Sequence[str]) -> str:
    logliks = ", ".join(f"{label} {value:.3f}" for label, value in report.loglik.items())
    lines = [f"**{source.describe()}** · {report.n_texts} texts, {report.n_tokens} tokens.",
             f"Log-likelihood per token: {logliks}."]
    lines += [f"- {note}" for note in (*notes, *report.notes)]
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if lines[2:] else "")


def handlers(public: bool):
    """The panel's event handlers, bound to the app's public flag."""

    @user_errors
    def load(session: Session, base: str) -> str:
        adapters, _ = session.selected()
        source, notes = resolve_for(adapters, base, public)
        where, head_notes = _load_and_describe(source, adapters)
        notes += [*head_notes, "merges hold LoRA units only: no task head or modules_to_save is carried into them."]
        return f"Loaded **{source.describe()}** on {where}.\n" + "".join(f"\n- {n}" for n in notes)

    @user_errors
    def outputs(session: Session, base: str, prompt: str) -> list[list[str]]:
        adapters, _ = session.selected()
        if not prompt or not prompt.strip():
            raise ValueError("type a prompt first.")
        source, _ = resolve_for(adapters, base, public)
        merges = merges_for(session, [session.settings.method])
        return [list(row) for row in _outputs(source, adapters, merges, prompt)]

    @user_errors
    def retention(session: Session, base: str, text: str, upload: str | None, methods: list[str],
                  progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        adapters, _ = session.selected()
        texts, notes = _texts(text, upload)
        progress(0.05, desc="finding the base (the first use of a packaged base converts it once)")
        source, base_notes = resolve_for(adapters, base, public)
        progress(0.2, desc="merging")
        merges = merges_for(session, methods)
        progress(0.4, desc=f"{1 + len(adapters) + len(merges)} models on {len(texts)} text(s)")
        report = _retention(source, adapters, merges, texts)
        return retention_rows(report), retention_figure(report), _summary(source, report, [*base_notes, *notes])

    @user_errors
    def checks(session: Session, base: str, text: str, upload: str | None) -> list[list[str]]:
        adapters, weights = session.selected()
        texts, _ = _texts(text, upload)
        source, _ = resolve_for(adapters, base, public)
        rows = []
        for check in _checks(source, adapters, weights, texts[0], seed=0):
            verdict = ("PASS" if check.expect_pass else "BREAKS, as it should") if check.passed else (
                "FAIL" if check.expect_pass else "did not break?!")
            rows.append([_CHECK_NAMES[check.name], f"{check.max_abs_diff:.2e}", f"{check.tolerance:.1e}",
                         "unchanged" if check.expect_pass else "changes", verdict])
        return rows

    return load, outputs, retention, checks


def build(session: gr.State, public: bool) -> RealRunPanel:
    """Lay out the panel (inside the run tab) and wire its buttons."""
    load, outputs, retention, checks = handlers(public)
    with gr.Column(elem_id="real-run"):
        gr.Markdown("## Real adapters on their real base model", elem_id="real-run-title")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    hint = f"an allowed hub id ({ALLOWLIST_ENV})" if public else "a local folder or hub id"
                    base = gr.Textbox(
                        label=f"Base model: empty = the adapters' base_model_name_or_path (HF cache first), or {hint}",
                        placeholder="gpt2" if public else "gpt2  or  /models/my-base", scale=3, elem_id="real-base",
                    )
                    load_button = gr.Button("Load base", scale=1, elem_id="real-load-base")
                status = gr.Markdown(elem_id="real-base-status")
                with gr.Row():
                    prompt = gr.Textbox("The meaning of life is", label="Prompt", scale=3, elem_id="real-prompt")
                    outputs_button = gr.Button("Greedy outputs", scale=1, elem_id="real-outputs")
                outputs_table = gr.Dataframe(headers=["model", "greedy output"], value=[], interactive=False, wrap=True,
                                             label="Base, each adapter, the merge", elem_id="real-outputs-table")
            with gr.Column(scale=2):
                gr.Markdown(LEARN)
        with gr.Row():
            text = gr.Textbox(lines=5, label=f"Your text: one text per line (≤ {MAX_TEXTS})", scale=3, elem_id="real-text",
                              placeholder="Paste text like the adapters' task, one example per line…")
            upload = gr.File(label="…or a .txt / .jsonl file of prompts", file_types=[".txt", ".jsonl"], scale=2, elem_id="real-upload")
        methods = gr.CheckboxGroup(list(MERGE_METHODS), value=list(DEFAULT_METHODS), label="Merge methods (the map tab's k and options)",
                                   elem_id="real-methods")
        with gr.Row():
            retention_button = gr.Button("How much of each adapter does the merge keep?", variant="primary", elem_id="real-retention")
            checks_button = gr.Button("Output-space checks on this base", elem_id="real-checks")
        retention_notes = gr.Markdown(elem_id="real-retention-notes")
        with gr.Row():
            retention_table = gr.Dataframe(headers=RETENTION_HEADERS, value=[], interactive=False, wrap=True, scale=3,
                                           label="Retention per adapter and method", elem_id="real-retention-table")
            retention_plot = gr.Plot(label="kept per adapter", scale=2, elem_id="real-retention-plot")
        checks_table = gr.Dataframe(headers=CHECK_HEADERS, value=[], interactive=False, wrap=True,
                                    label="Output-space checks", elem_id="real-checks-table")
    load_button.click(load, [session, base], status, api_name="real_base")
    outputs_button.click(outputs, [session, base, prompt], outputs_table, api_name="real_outputs")
    retention_button.click(retention, [session, base, text, upload, methods], [retention_table, retention_plot, retention_notes],
                           api_name="real_retention")
    checks_button.click(checks, [session, base, text, upload], checks_table, api_name="real_checks")
    return RealRunPanel(base, load_button, status, prompt, outputs_button, outputs_table, text, upload, methods,
                        retention_button, retention_table, retention_plot, retention_notes, checks_button, checks_table)
