"""The SMoRA tab's real-model panel: zero-shot Arrow routing over the SmolLM2 skills' units, per token.

No router is trained: per token and module, the top-k pooled units of all skills whose input direction
best matches the hidden state are applied (:func:`lego_viz.models.arrow.arrow_routing`, unit granularity)
on the real base. The heatmap shows which units each token of the prompt and the answer picked.
"""

from __future__ import annotations

import functools

import gradio as gr

from lego_viz.llm.assets import BUILD_HINT, skill_dirs
from lego_viz.llm.generate import chat_texts, greedy
from lego_viz.models.arrow import ArrowRouting, arrow_routing
from lego_viz.models.base import BaseSource, check_fit
from lego_viz.smora.probe import TokenRouting, token_routing
from lego_viz.smora.stats import source_share
from lego_viz.ui import real_run
from lego_viz.ui.errors import user_errors
from lego_viz.ui.load_tab import skill_adapters
from lego_viz.ui.runtime import on_gpu
from lego_viz.ui.smora_tab import gates_figure, sources_figure, unit_labels

ANSWER_TOKENS = 24
DEFAULT_K = 8  # units per token: the rank of one skill, like a static merge at k = 8
INTRO = """
### Zero-shot routing over the SmolLM2 skills (real model)
Every unit of every skill adapter is pooled; per token, each module applies the **top-k units** whose
input direction best matches the token's hidden state (`|ã_i·x|/‖ã_i‖`, gate 1), with no training.
The heatmap shows the gates of each token of your prompt and the routed model's greedy answer.
"""


@functools.lru_cache(maxsize=4)
def _routing(top_k: int) -> ArrowRouting:
    return arrow_routing(skill_adapters(), top_k, "unit")


def _source(public: bool) -> BaseSource:
    source, _ = real_run.resolve_for(skill_adapters(), "", public)
    return source


@on_gpu
def _route(source: BaseSource, top_k: int, prompt: str) -> tuple[str, TokenRouting, int]:
    """(answer, routing of the chat text + answer, tokens before the user's message)."""
    routing = _routing(top_k)
    with real_run.base_pool(source).borrow() as (model, tokenizer):
        check_fit(model, skill_adapters(), source.name)
        with routing.applied(model):
            answer = greedy(model, tokenizer, [prompt], max_new_tokens=ANSWER_TOKENS)[0]
            text = chat_texts(tokenizer, [prompt])[0]
            recorded = token_routing(model, tokenizer, text + answer, layers=routing.layers)
        skipped = len(tokenizer(text[: text.rindex(prompt)], add_special_tokens=False).input_ids)
    return answer, recorded, skipped


def handler(public: bool):
    """The route button's handler, bound to the app's public flag."""

    @user_errors
    def route(module: str, top_k: float, prompt: str, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        if not prompt or not prompt.strip():
            raise ValueError("type a prompt first, e.g. 'What is the capital of France?'")
        progress(0.05, desc="finding the base")
        routing = _routing(int(top_k))
        if module not in routing.layers:
            raise ValueError(f"the skills have no module {module!r}; pick one from the list")
        source = _source(public)
        progress(0.3, desc="routing and decoding")
        answer, recorded, skipped = _route(source, int(top_k), prompt.strip())
        layer = routing.layers[module]
        tokens = [t.replace("Ġ", "·").replace("Ċ", "⏎") for t in recorded.tokens[skipped:]]
        gates = recorded.gates[module][skipped:]
        units = unit_labels(routing.source_names, layer.unit_source.cpu())
        title = f"Gates per token · top-{int(top_k)} of {layer.lora_A.shape[0]} skill units · {module}"
        heat = gates_figure(tokens, gates, units, routing.source_names, layer.unit_source.cpu(), title)
        share = source_share(gates, layer.unit_source.cpu(), len(routing.source_names))
        return answer, heat, sources_figure(tokens, share, routing.source_names)

    return route


def build(public: bool) -> None:
    """Lay out the panel (inside the SMoRA tab) and wire it; a note instead when no skill is built."""
    gr.Markdown(INTRO)
    if not skill_dirs():
        gr.Markdown(f"*No SmolLM2 skill adapters found under assets/skills; {BUILD_HINT}.*")
        return
    try:
        adapters = skill_adapters()
    except (ValueError, OSError) as exc:  # a damaged skill folder must not keep the app from starting
        gr.Markdown(f"*The SmolLM2 skills cannot be loaded: {exc}; rebuild them ({BUILD_HINT}).*")
        return
    modules = sorted({name for a in adapters for name in a.modules}, key=_module_order)
    with gr.Row():
        module = gr.Dropdown(modules, value=modules[-1], label="layer / module", elem_id="skills-route-module")
        top_k = gr.Slider(1, 32, value=DEFAULT_K, step=1, label="units per token (k)", elem_id="skills-route-k")
    with gr.Row():
        prompt = gr.Textbox("What is the capital of France?", label="Prompt", scale=3, elem_id="skills-route-prompt")
        button = gr.Button("Route over the skills", variant="primary", scale=1, elem_id="skills-route")
    answer = gr.Textbox(label="Routed model's answer (greedy)", interactive=False, elem_id="skills-route-answer")
    heat = gr.Plot(label="Gates per token", elem_id="skills-route-gates")
    share = gr.Plot(label="Units by source skill", elem_id="skills-route-sources")
    button.click(handler(public), [module, top_k, prompt], [answer, heat, share], api_name="smora_skills_route")


def _module_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))
