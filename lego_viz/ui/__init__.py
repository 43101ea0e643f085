"""The Gradio explorer: `build_demo()` assembles the tabs; the only package of lego_viz that imports gradio."""

from __future__ import annotations

import gradio as gr

from lego_viz.ui import (
    advise_panel,
    export_tab,
    invariance_tab,
    learn,
    load_tab,
    map_tab,
    real_run,
    run_tab,
    skills_routing,
    skills_run,
)
from lego_viz.ui.runtime import CONCURRENCY, MAX_FILE_SIZE, SESSION_TTL_S
from lego_viz.ui.smora_tab import build_smora_tab
from lego_viz.ui.state import Session, cleanup
from lego_viz.units.projection import warm_up

CSS = """
.lego-badges { line-height: 2.1; }
.lego-checked { opacity: 0.75; font-size: 0.9em; }
.lego-badge { color: white; border-radius: 999px; padding: 2px 10px; font-weight: 600; font-size: 0.85em; }
"""

# Sliders act on release, which Gradio fires on pointer-up and when the slider's number box loses
# focus: without this, a number typed + Enter or a move with the arrow keys would change nothing.
JS = """
() => {
  const number = "input[data-testid=number-input]";
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.matches?.(number)) e.target.blur();
  });
  document.addEventListener("keyup", (e) => {
    if (!e.target.matches?.("input[data-testid=range-input]") || !/^(Arrow|Page|Home|End)/.test(e.key)) return;
    const box = e.target.closest(".block")?.querySelector(number);
    if (box) { box.focus(); box.blur(); e.target.focus(); }
  });
}
"""


def launch_options() -> dict:
    """Keyword arguments for `demo.launch` that the app relies on (upload limit, styling, slider keys)."""
    return {"max_file_size": MAX_FILE_SIZE, "css": CSS, "js": JS, "theme": gr.themes.Soft()}


def build_demo(public: bool = False) -> gr.Blocks:
    """Build the explorer app.

    Args:
        public: a public deployment (a Space): typed local paths and hub ids are refused, only uploads load.

    Returns:
        The `gr.Blocks` app, with its queue configured; call `.launch(**launch_options())`.
    """
    warm_up()  # import umap and compile its kernels while the user reads the first tab
    with gr.Blocks(title="LoRA-LEGO explorer", delete_cache=(1800, 3600)) as demo:
        session = gr.State(Session(), time_to_live=SESSION_TTL_S, delete_callback=cleanup)
        gr.Markdown(learn.INTRO)
        with gr.Tabs():
            with gr.Tab("1 · Load adapters", id="load"):
                load = load_tab.build(session, public)
            with gr.Tab("2 · MSU map & merge", id="map"):
                msu_map = map_tab.build(session)
                advise_panel.build(session, msu_map.summary)
            with gr.Tab("3 · Invariance checks", id="invariance"):
                checks = invariance_tab.build(session)
            with gr.Tab("4 · Run the models", id="run"):
                run_tab.build(session)
                skills_run.build(session, public)
                real_run.build(session, public)
            with gr.Tab("5 · Export", id="export"):
                export_tab.build(session)
            with gr.Tab("6 · SMoRA", id="smora") as smora:
                build_smora_tab(smora)
                skills_routing.build(public)
        _wire_follow_ups(session, load, msu_map, checks)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    return demo


def _wire_follow_ups(session: gr.State, load: load_tab.LoadTab, msu_map: map_tab.MapTab, checks: invariance_tab.InvarianceTab) -> None:
    """After a load or a selection change: fit the map controls, redraw the map, re-run the checks."""
    refresh = {"fn": map_tab.refresh_controls, "inputs": [session, msu_map.selection, msu_map.k], "outputs": [msu_map.selection, msu_map.k]}
    redraw = {"fn": map_tab.cluster, "inputs": [session, *msu_map.inputs], "outputs": [session, *msu_map.outputs]}
    recheck = {"fn": invariance_tab.check, "inputs": [session, *checks.inputs], "outputs": checks.outputs}
    for event in load.loaded:
        # .success: a failed load shows its error and leaves everything else alone.
        event.success(**refresh, api_visibility="private").success(**redraw, api_visibility="private").success(
            **recheck, api_visibility="private"
        )
    for event in load.selected:
        event.success(**refresh, api_visibility="private").success(**redraw, api_visibility="private")
