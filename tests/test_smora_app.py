"""The SMoRA router tab: its handlers called directly and its endpoints through gradio_client.

A tiny zoo-shaped base and two SMoRA adapters (a plain one and a router over "merged" units) are built
in a temporary folder, so the tab is tested without the shipped assets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import pytest
import torch

import lego_viz.smora.assets as assets
from lego_viz.smora import SMoRAConfig, inject_smora, save_smora, smora_layers
from lego_viz.ui import smora_tab
from lego_viz.zoo.model import TARGET_MODULES, ZooModelConfig, build_model
from lego_viz.zoo.tokenizer import build_tokenizer

gradio_client = pytest.importorskip("gradio_client")

MODULE = "model.layers.1.mlp.down_proj"
SOURCES = ("reverse", "sort", "add")


def tiny_zoo_base(zoo: Path):
    """A small random zoo-shaped base (2 layers, width 32), saved as `zoo/base` on first use."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(ZooModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), tokenizer)
    if not (zoo / "base").is_dir():
        model.save_pretrained(zoo / "base")
        tokenizer.save_pretrained(zoo / "base")
    return model


def _save(zoo: Path, name: str, config: SMoRAConfig, seed: int, init: dict | None = None) -> None:
    model = tiny_zoo_base(zoo)
    torch.manual_seed(seed)
    inject_smora(model, config, init=init)
    with torch.no_grad():
        for layer in smora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
            layer.router.bias.uniform_(-0.01, 0.01)
    save_smora(model, zoo / "smora" / name)


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    _save(zoo, "multitask", SMoRAConfig(r=8, k=2, target_modules=TARGET_MODULES), seed=1)
    unit_source = torch.tensor([0, 0, 1, 1, 2, 2])
    merged = SMoRAConfig(r=6, k=2, lora_alpha=2.0, target_modules=TARGET_MODULES, train_lora=False, sources=SOURCES)
    names = [f"model.layers.{i}.{'mlp' if m.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{m}"
             for i in range(2) for m in TARGET_MODULES]
    _save(zoo, "merged_router", merged, seed=2, init={n: {"unit_source": unit_source} for n in names})
    runs = {"smora": {"load_balance": [3.0, 2.0, 1.5], "gamma": 0.01}, "smora_no_balance": {"load_balance": [3.0, 3.2, 3.1], "gamma": 0.0}}
    (zoo / "smora" / "results.json").write_text(json.dumps({"runs": runs}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(assets, "ZOO_DIR", zoo)
        patch.setattr(assets, "SMORA_DIR", zoo / "smora")
        for cached in (smora_tab._pool, smora_tab._units, smora_tab._task_routing):
            cached.cache_clear()
        yield zoo
        for cached in (smora_tab._pool, smora_tab._units, smora_tab._task_routing):
            cached.cache_clear()


def _titles(fig: go.Figure) -> tuple[str, str]:
    return fig.layout.xaxis.title.text, fig.layout.yaxis.title.text


def test_route_multitask_shows_gates_and_hides_sources(tiny_assets) -> None:
    completion, gates, sources = smora_tab.route("multitask", MODULE, "reverse: abc=")
    assert isinstance(completion, str)
    heat = gates.data[0]
    z = torch.tensor(heat.z)
    assert z.shape[1] == 8 and ((z != 0).sum(1) == 2).all()  # k = 2 of r = 8 per token
    assert z.shape[0] == len(heat.y) == 1 + len("reverse: abc=") + len(completion)
    assert "gate" in heat.hovertemplate
    assert gates.layout.yaxis.title.text and gates.layout.xaxis.title.text
    assert not sources.data and "merged_router" in sources.layout.annotations[0].text


def test_route_merged_router_colours_units_by_source(tiny_assets) -> None:
    _, gates, sources = smora_tab.route("merged_router", MODULE, "sort: 3141=")
    traces = {trace.name: trace for trace in gates.data}
    strip, heat = traces["source"], traces["gates"]
    assert list(strip.z[0]) == [0, 0, 1, 1, 2, 2]
    assert list(strip.customdata[0]) == ["reverse", "reverse", "sort", "sort", "add", "add"]
    assert list(heat.x) == ["reverse·0", "reverse·1", "sort·0", "sort·1", "add·0", "add·1"]
    assert [bar.name for bar in sources.data] == list(SOURCES)
    total = torch.tensor([bar.y for bar in sources.data]).sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)  # shares of each token's gate mass sum to 1


def test_task_stats_figures(tiny_assets) -> None:
    tasks, load = smora_tab.task_stats("multitask", MODULE)
    freq = torch.tensor(tasks.data[0].z)
    assert freq.shape == (len(tasks.data[0].y), 8)
    assert torch.allclose(freq.sum(1), torch.full((freq.shape[0],), 2.0), atol=1e-6)  # k ranks per token
    assert all(_titles(tasks)) and "picked by %{z" in tasks.data[0].hovertemplate
    bars, beta = load.data
    assert len(bars.y) == 8 and abs(sum(bars.y) / 8 - 1.0) < 1e-6  # c / mean(c) averages to 1
    saved = assets.saved_tensor(tiny_assets / "smora" / "multitask", f"{MODULE}.router.bias")
    assert torch.allclose(torch.tensor(beta.y), saved)
    assert "max(c)/mean(c)" in load.layout.title.text


def test_first_visit_draws_everything_once(tiny_assets) -> None:
    completion, gates, sources, tasks, load = smora_tab.first_visit("merged_router", MODULE, "sort: 3141=", "")
    assert isinstance(completion, str) and all(isinstance(f, go.Figure) and f.data for f in (gates, sources, tasks, load))
    again = smora_tab.first_visit("merged_router", MODULE, "sort: 3141=", completion or "shown")
    assert len(again) == 5 and all(isinstance(out, type(gr.skip())) for out in again)  # already shown: nothing recomputed


def test_choose_adapter_and_training_figure(tiny_assets) -> None:
    dropdown, training = smora_tab.choose_adapter("multitask")
    assert MODULE in [c[0] if isinstance(c, tuple) else c for c in dropdown.choices] and dropdown.value == MODULE
    assert [trace.name for trace in training.data] == ["with balancing (γ=0.01) · this adapter", "without balancing (γ=0)"]
    assert _titles(training) == ("training step", "max(c) / mean(c)")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: smora_tab.route("multitask", MODULE, "  "), "type a prompt"),
        (lambda: smora_tab.route("multitask", "lm_head", "x="), "no SMoRA layer"),
        (lambda: smora_tab.task_stats("nope", MODULE), "unknown SMoRA adapter"),
    ],
)
def test_bad_input_is_a_user_error(tiny_assets, call, message: str) -> None:
    with pytest.raises(gr.Error, match=message):
        call()


# ----------------------------------------------------------------------------- zero-shot routing in the tab

ARROW_UNITS, ARROW_TOP1 = "arrow (units, top-8)", "arrow (adapter, top-1)"
ZERO_SHOT_TASKS = ("reverse", "sort", "caesar")  # r = 4 each: 12 units per module


@pytest.fixture(scope="module")
def zero_shot(tiny_assets):
    """Three random task adapters for the tiny base, and the zoo pool lending that base."""
    from conftest import make_adapter, save_peft_folder

    from lego_viz.ui.models import ModelPool
    from lego_viz.zoo.model import load_base

    dims = {"q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "o_proj": (32, 32),
            "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    shapes = {f"model.layers.{i}.{'mlp' if m in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{m}": dims[m]
              for i in range(2) for m in TARGET_MODULES}
    folders = {task: save_peft_folder(make_adapter(task, r=4, seed=i, shapes=shapes, base="zoo/base"), tiny_assets / "adapters" / task)
               for i, task in enumerate(ZERO_SHOT_TASKS)}
    pool = ModelPool(lambda: load_base(device="cpu", zoo_dir=tiny_assets), max_size=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smora_tab, "adapter_dirs", lambda: folders)
        patch.setattr(smora_tab, "zoo_pool", lambda: pool)
        caches = (smora_tab._zero_shot, smora_tab._units, smora_tab._task_routing)
        for cached in caches:
            cached.cache_clear()
        yield pool
        for cached in caches:
            cached.cache_clear()


def test_zero_shot_units_route_k_units_per_token_and_leave_no_hook(zero_shot) -> None:
    completion, gates, sources = smora_tab.route(ARROW_UNITS, MODULE, "sort: 3141=")
    traces = {trace.name: trace for trace in gates.data}
    z = torch.tensor(traces["gates"].z)
    assert z.shape == (1 + len("sort: 3141=") + len(completion), 12)
    assert set(z.unique().tolist()) == {0.0, 1.0} and (z.sum(1) == 8).all()  # gate 1 on 8 of the 12 units
    assert list(traces["gates"].x)[:5] == ["reverse·0", "reverse·1", "reverse·2", "reverse·3", "sort·0"]
    assert [bar.name for bar in sources.data] == list(ZERO_SHOT_TASKS)
    with zero_shot.borrow() as (model, _):
        assert not any(m._forward_hooks for m in model.modules())  # the routing was removed after use


def test_zero_shot_adapter_top1_sends_each_token_to_one_adapter(zero_shot) -> None:
    _, gates, sources = smora_tab.route(ARROW_TOP1, MODULE, "reverse: abc=")
    z = torch.tensor({trace.name: trace for trace in gates.data}["gates"].z)
    owner = torch.arange(3).repeat_interleave(4)
    for row in z:  # one adapter's 4 units, each with its whole update (softmax over one adapter = 1)
        assert row.sum() == 4 and owner[row != 0].unique().numel() == 1 and set(row[row != 0].tolist()) == {1.0}
    share = torch.tensor([bar.y for bar in sources.data])
    assert set(share.flatten().tolist()) <= {0.0, 1.0}


def test_zero_shot_task_stats_and_training_note(zero_shot) -> None:
    tasks, load = smora_tab.task_stats(ARROW_UNITS, MODULE)
    freq = torch.tensor(tasks.data[0].z)
    assert freq.shape[1] == 12 and torch.allclose(freq.sum(1), torch.full((freq.shape[0],), 8.0), atol=1e-6)
    assert list(load.data[1].y) == [0.0] * 12  # no balancing bias
    dropdown, training = smora_tab.choose_adapter(ARROW_TOP1, MODULE)
    assert dropdown.value == MODULE and "nothing was trained" in training.layout.annotations[0].text


@pytest.fixture(scope="module")
def client(tiny_assets):
    with gr.Blocks() as demo:
        smora_tab.build_smora_tab()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    yield gradio_client.Client(url, verbose=False)
    demo.close()


def _figure(plot: dict) -> dict:
    assert plot["type"] == "plotly"
    return json.loads(plot["plot"])


def test_client_endpoints_return_figures(client) -> None:
    completion, gates, sources = client.predict("merged_router", MODULE, "add: 12+34=", api_name="/smora_route")
    assert isinstance(completion, str)
    assert [t["type"] for t in _figure(gates)["data"]] == ["heatmap", "heatmap"]
    assert [t["type"] for t in _figure(sources)["data"]] == ["bar"] * len(SOURCES)
    tasks, load = client.predict("merged_router", MODULE, api_name="/smora_tasks")
    assert _figure(tasks)["data"][0]["type"] == "heatmap"
    assert [t["type"] for t in _figure(load)["data"]] == ["bar", "scatter"]
    _, training = client.predict("multitask", api_name="/smora_adapter")
    assert len(_figure(training)["data"]) == 2


def test_client_bad_input_is_an_app_error(client) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="type a prompt"):
        client.predict("multitask", MODULE, " ", api_name="/smora_route")


def test_adapter_trained_on_another_base_is_refused(tiny_assets, tmp_path) -> None:
    stale = tmp_path / "smora" / "stale"
    shutil.copytree(tiny_assets / "smora" / "multitask", stale)
    payload = json.loads((stale / "smora_config.json").read_text())
    payload["extra"]["base_sha256"] = assets.base_fingerprint(tiny_assets)
    (stale / "smora_config.json").write_text(json.dumps(payload))
    model, _, config = assets.load_shipped("stale", device="cpu", smora_dir=tmp_path / "smora", zoo_dir=tiny_assets)
    assert config.r == 8 and len(smora_layers(model)) == 2 * len(TARGET_MODULES)

    payload["extra"]["base_sha256"] = "0" * 64
    (stale / "smora_config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="re-run `python scripts/train_smora.py`"):
        assets.load_shipped("stale", device="cpu", smora_dir=tmp_path / "smora", zoo_dir=tiny_assets)
