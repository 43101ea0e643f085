"""The run tab's SmolLM2 skills panel: greedy answers of the base, each skill and the merge side by side,
each with the skill rules it satisfies, and the composition lab read from ``assets/skills/lab.json``.

The model work is in :mod:`lego_viz.models.batched` (every variant in one batch, KV cache) and the
rules in :mod:`lego_viz.llm.skills`; the base is the real-base panel's shared instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from lego_viz.adapters import LoraAdapter
from lego_viz.llm.assets import LAB_FILE, lab_rows, read_lab
from lego_viz.llm.generate import chat_texts
from lego_viz.llm.skills import SKILLS, rules_met
from lego_viz.models.base import BaseSource, check_fit
from lego_viz.models.batched import greedy_batched
from lego_viz.models.compare import model_variants
from lego_viz.ui import real_run
from lego_viz.ui.errors import user_errors
from lego_viz.ui.runtime import on_gpu
from lego_viz.ui.state import Session

ANSWER_TOKENS = 32
EXAMPLES = ["What is the capital of France?", "Give one tip for staying focused.", "What is 7 plus 5?"]
OUTPUT_HEADERS = ["model", "greedy answer", "rules it satisfies", "its skills' rules"]
LAB_HEADERS = ["skills", "method", "k", "all rules hold", "95% interval", "each rule", "n", "note"]
INTRO = f"""
### SmolLM2 skills: does the merge keep both?
After **Load SmolLM2 skills** (tab 1), the base (SmolLM2-135M-Instruct) answers your prompt beside each
selected skill alone and their merge (the map tab's method and k), {ANSWER_TOKENS} tokens each, greedy. Each
answer lists the skill rules it satisfies; the last column checks the rules of the skills in that model.
"""


@dataclass
class SkillsPanel:
    """The components tests wire to."""

    prompt: gr.Textbox
    button: gr.Button
    outputs_table: gr.Dataframe
    lab_table: gr.Dataframe
    lab_notes: gr.Markdown


@on_gpu
def _answers(source: BaseSource, adapters: Sequence[LoraAdapter], merges: Mapping[str, dict], prompt: str) -> list[tuple[str, str]]:
    with real_run.base_pool(source).borrow() as (model, tokenizer):
        check_fit(model, adapters, source.name)
        variants, _ = model_variants(model, adapters, merges)
        answers = greedy_batched(model, tokenizer, chat_texts(tokenizer, [prompt]), variants, ANSWER_TOKENS)
    return [(v.label, a[0]) for v, a in zip(variants, answers)]


def _own_rules(label: str, skills: Sequence[str], merges: Mapping[str, dict]) -> list[str]:
    if label in merges:
        return [s for s in skills if s in SKILLS]
    return [label] if label in SKILLS else []


def output_rows(answers: Sequence[tuple[str, str]], skills: Sequence[str], merges: Mapping[str, dict]) -> list[list[str]]:
    """One row per model: its answer, every rule the answer satisfies, and ✓/✗ per rule of its own skills."""
    rows = []
    for label, answer in answers:
        own = _own_rules(label, skills, merges)
        held = set(rules_met(answer))
        checks = " ".join(f"{s} {'✓' if s in held else '✗'}" for s in own) or "—"
        rows.append([label, answer, ", ".join(sorted(held)) or "none", checks])
    return rows


def handler(public: bool):
    """The outputs button's handler, bound to the app's public flag."""

    @user_errors
    def outputs(session: Session, prompt: str, progress=gr.Progress()) -> list[list[str]]:  # noqa: B008 (Gradio's progress idiom)
        if not prompt or not prompt.strip():
            raise ValueError("type a prompt first, e.g. 'What is the capital of France?'")
        adapters, _ = session.selected()
        progress(0.05, desc="finding the base")
        source, _ = real_run.resolve_for(adapters, "", public)
        progress(0.2, desc=f"merging ({session.settings.method})")
        merges = real_run.merges_for(session, [session.settings.method])
        progress(0.4, desc=f"{len(adapters) + 2} models answer together, {ANSWER_TOKENS} tokens")
        answers = _answers(source, adapters, merges, prompt.strip())
        return output_rows(answers, [a.name for a in adapters], merges)

    return outputs


def lab_view(path=None) -> tuple[pd.DataFrame | None, str]:
    """The composition table from the lab file, and a note (what it is, or that there is none yet)."""
    try:
        data = read_lab(path)
    except ValueError as exc:
        return None, f"*{exc}*"
    if data is None:
        return None, (f"*No composition lab file yet (assets/{LAB_FILE.parent.name}/{LAB_FILE.name}): it is written by the "
                      "skill zoo's build scripts once the skills are trained.*")
    rows = []
    for row in lab_rows(data):
        ci = row.get("ci") or [None, None]
        interval = f"{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%" if None not in ci[:2] and len(ci) >= 2 else ""
        rate = "" if row.get("refused") else f"{100 * float(row['rate']):.0f}%"
        each = ", ".join(f"{s} {held}" for s, held in (row.get("per_rule") or {}).items()) if rate else ""
        rows.append(["+".join(map(str, row["skills"])), str(row["label"]), str(row.get("k") or ""), rate,
                     interval if rate else "", each, str(row.get("n", "")), str(row.get("refused", ""))[:120]])
    if not rows:
        return None, f"*{LAB_FILE.name} holds no measured rows.*"
    note = ("Stored measurement (`assets/skills/lab.json`): the share of held-out prompts where the merged model's greedy "
            "answer satisfies **every** merged skill's rule, per method at equal rank, with 95% Wilson intervals.")
    return pd.DataFrame(rows, columns=LAB_HEADERS), note


def build(session: gr.State, public: bool) -> SkillsPanel:
    """Lay out the panel (inside the run tab) and wire its button."""
    frame, note = lab_view()
    with gr.Column(elem_id="skills-run"):
        gr.Markdown(INTRO)
        with gr.Row():
            prompt = gr.Textbox(EXAMPLES[0], label="Prompt (a user message; the chat template is applied)", scale=3,
                                elem_id="skills-prompt")
            button = gr.Button("Answers: base, each skill, the merge", variant="primary", scale=1, elem_id="skills-run-button")
        gr.Examples([[e] for e in EXAMPLES], inputs=prompt, label="Try")
        outputs_table = gr.Dataframe(headers=OUTPUT_HEADERS, value=[], interactive=False, wrap=True, label="Greedy answers",
                                     elem_id="skills-outputs", column_widths=["16%", "54%", "15%", "15%"])
        gr.Markdown("#### Composition lab: every method on every compatible pair of skills")
        lab_notes = gr.Markdown(note, elem_id="skills-lab-notes")
        lab_table = gr.Dataframe(value=frame, headers=LAB_HEADERS, interactive=False, wrap=True, label="All rules hold (%)",
                                 elem_id="skills-lab", max_height=600)
    button.click(handler(public), [session, prompt], outputs_table, api_name="skills_outputs")
    return SkillsPanel(prompt, button, outputs_table, lab_table, lab_notes)
