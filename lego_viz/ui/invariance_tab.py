"""Tab 3: the live invariance panel: permute and concatenate, check in weight and output space."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from lego_viz.checks.invariance import DEFAULT_TOLERANCE, check_concat_sum, check_outputs, check_permutation
from lego_viz.ui import learn
from lego_viz.ui.errors import user_errors
from lego_viz.ui.models import fits_model, zoo_available, zoo_pool
from lego_viz.ui.runtime import on_gpu
from lego_viz.ui.state import Session

# Max |Δlogit|: float32 logits of size ~10 computed with sums in another order differ by ~1e-6.
OUTPUT_TOLERANCE = 1e-4
DEFAULT_PROMPT = "reverse: lego="
HEADERS = ["check", "space", "error", "tolerance", "expected", "result"]
_CHECKS = {
    "permutation": "permute ranks (rows of A with columns of B)",
    "concat_sum": "concatenate all adapters = weighted sum",
    "permutation_a_only": "shuffle rows of A only (pairing broken)",
}


@dataclass
class InvarianceTab:
    """The components other tabs wire to."""

    prompt: gr.Textbox
    seed: gr.Number
    button: gr.Button
    badges: gr.HTML
    table: gr.Dataframe

    @property
    def inputs(self) -> list:
        return [self.prompt, self.seed]

    @property
    def outputs(self) -> list:
        return [self.badges, self.table]


@on_gpu
def output_checks(adapters, weights, prompt: str, seed: int) -> dict[str, float] | None:
    """Logit differences of both invariances (and the broken shuffle) on the zoo base, or None if it does not fit."""
    if not zoo_available():
        return None
    with zoo_pool().borrow() as (model, tokenizer):
        if not fits_model(model, adapters):
            return None
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        return check_outputs(model, input_ids, adapters, weights, seed=seed)


def _row(name: str, space: str, error: float | None, tolerance: float, expect_pass: bool) -> list[str]:
    expected = "unchanged" if expect_pass else "changes"
    if error is None:
        return [_CHECKS[name], space, "n/a", f"{tolerance:.0e}", expected, "needs the zoo base model"]
    ok = (error <= tolerance) == expect_pass
    verdict = ("PASS" if expect_pass else "BREAKS, as it should") if ok else ("FAIL" if expect_pass else "did not break?!")
    return [_CHECKS[name], space, f"{error:.2e}", f"{tolerance:.0e}", expected, verdict]


def _badges(rows: list[list[str]], header: str) -> str:
    pills = [f'<span class="lego-checked">{html.escape(header)}</span>']
    for check, space, error, _, _, verdict in rows:
        good = verdict.startswith(("PASS", "BREAKS"))
        colour = "#1a7f37" if good else ("#9a6700" if error == "n/a" else "#cf222e")
        pills.append(
            f'<span class="lego-badge" style="background:{colour}">{html.escape(verdict)}</span> '
            f"{html.escape(check)} · {html.escape(space)}: <code>{html.escape(error)}</code>"
        )
    return '<div class="lego-badges">' + "<br>".join(pills) + "</div>"


@user_errors
def check(session: Session, prompt: str, seed: float) -> tuple[str, list[list[str]]]:
    """Run every check on the selected adapters.

    Returns:
        (badges html, table rows)
    """
    adapters, weights = session.selected()
    seed = int(seed)
    weight_space = [
        check_permutation(adapters, seed=seed),
        check_concat_sum(adapters, weights),
        check_permutation(adapters, seed=seed, shuffle="a_only"),
    ]
    outputs = output_checks(adapters, weights, prompt or DEFAULT_PROMPT, seed)
    rows = []
    for result in weight_space:
        rows.append(_row(result.name, "weights: ‖ΔW′−ΔW‖/‖ΔW‖", result.max_rel_error, result.tolerance, result.expect_pass))
        error = None if outputs is None else outputs[result.name]
        rows.append(_row(result.name, "outputs: max |Δlogit|", error, OUTPUT_TOLERANCE, result.expect_pass))
    names = ", ".join(a.name for a in adapters)
    return _badges(rows, f"{len(adapters)} adapters ({names}) · permutation seed {seed} · prompt {prompt or DEFAULT_PROMPT!r}"), rows


def build(session: gr.State) -> InvarianceTab:
    """Lay out the invariance tab and wire its button."""
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt for the output-space check", scale=3)
                seed = gr.Number(0, precision=0, minimum=0, label="Permutation seed", scale=1)
            button = gr.Button("Permute, concatenate and check", variant="primary", elem_id="check")
            badges = gr.HTML(elem_id="invariance-badges")
            table = gr.Dataframe(headers=HEADERS, value=[], interactive=False, wrap=True, label="Results", elem_id="invariance-table")
            gr.Markdown(f"Weight-space tolerance {DEFAULT_TOLERANCE:.0e} (relative, float32); output-space tolerance {OUTPUT_TOLERANCE:.0e} (absolute logits).")
        with gr.Column(scale=2):
            gr.Markdown(learn.INVARIANCE)
    tab = InvarianceTab(prompt, seed, button, badges, table)
    button.click(check, [session, *tab.inputs], tab.outputs, api_name="invariance")
    return tab
