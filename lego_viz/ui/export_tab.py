"""Tab 5: download the current merge as a zipped PEFT folder, with the snippet that loads it."""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lego_viz.export.folder import export_adapter, export_task_type, zip_export
from lego_viz.merge import MERGE_METHODS
from lego_viz.ui import learn
from lego_viz.ui.errors import user_errors
from lego_viz.ui.merging import merged_session
from lego_viz.ui.state import Session


@dataclass
class ExportTab:
    """The components other tabs wire to."""

    button: gr.Button
    file: gr.File
    snippet: gr.Code
    summary: gr.Markdown


def _folder_name(session: Session) -> str:
    settings = session.settings
    spec = MERGE_METHODS.get(settings.method)
    name = f"{settings.method}_k{settings.k}_merge" if spec and spec.takes_k else f"{settings.method}_merge"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


INPUTS_DTYPE = "as the inputs"


@user_errors
def export(session: Session, dtype: str = INPUTS_DTYPE, max_rank: float | None = 0) -> tuple[Session, str, str, str]:
    """Write the current merge (computed if needed) as a PEFT folder + report + recipe + model card, zipped.

    Args:
        dtype: ``fp32``/``bf16``/``fp16`` for the saved weights, or the inputs' own.
        max_rank: refuse a merge above this rank in any module (0 or empty: no cap).

    Returns:
        (session, zip path, loading snippet, summary markdown)
    """
    session = merged_session(session)
    adapters, _ = session.selected()
    # One temp folder per export; the previous one goes now, the last one with the session.
    if session.export_dir:
        shutil.rmtree(session.export_dir, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix="lego_viz_export_"))
    session = dataclasses.replace(session, export_dir=str(workdir))
    name = _folder_name(session)
    folder = export_adapter(session.merged, workdir / name, adapters=adapters, advice=session.advice,
                            dtype=None if dtype in (None, INPUTS_DTYPE) else dtype, max_rank=int(max_rank) if max_rank else None)
    archive = zip_export(folder, workdir / f"{name}.zip")
    snippet = learn.peft_snippet(session.merged.base_model or "<base model>", name, export_task_type(session.merged))
    ranks = sorted(set(session.merged.ranks.values()))
    summary = (
        f"`{archive.name}` · {archive.stat().st_size / 1024:.0f} KiB · method **{session.merged.method}**, "
        f"rank {', '.join(map(str, ranks))}, {len(session.merged.modules)} modules from {len(adapters)} adapters."
    )
    return session, str(archive), snippet, summary


def build(session: gr.State) -> ExportTab:
    """Lay out the export tab and wire its button."""
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                dtype = gr.Dropdown([INPUTS_DTYPE, "fp32", "bf16", "fp16"], value=INPUTS_DTYPE, label="Saved dtype",
                                    elem_id="export-dtype")
                max_rank = gr.Number(0, precision=0, minimum=0, label="Max rank (0: no cap; vLLM's default is 16)",
                                     elem_id="export-max-rank")
            button = gr.Button("Build the merged adapter (.zip)", variant="primary", elem_id="export")
            summary = gr.Markdown(elem_id="export-summary")
            file = gr.File(label="Merged adapter: PEFT folder + merge_report.json + recipe.yaml + README.md", interactive=False, elem_id="export-file")
            snippet = gr.Code(learn.peft_snippet("<base model>", "<merge folder>"), language="python", label="Load it with PEFT", interactive=False)
        with gr.Column(scale=2):
            gr.Markdown(learn.EXPORT)
    button.click(export, [session, dtype, max_rank], [session, file, snippet, summary], api_name="export")
    return ExportTab(button, file, snippet, summary)
