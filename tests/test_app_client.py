"""The launched app driven through its named API endpoints with gradio_client."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, save_peft_folder

from lego_viz.checks.invariance import logits_with
from lego_viz.ui import build_demo, launch_options
from lego_viz.ui.models import zoo_available
from lego_viz.ui.msu_map import ALL

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError

CLUSTER_DEFAULTS = {"selection": ALL, "projection": "pca", "colour_by": "cluster", "method": "lego", "features": "canonical",
                    "param_reweight": "l2", "output_reweight": True, "seed": 0}


@pytest.fixture(scope="module")
def app_url():
    demo = build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options())
    yield url
    demo.close()


@pytest.fixture
def client(app_url):
    return gradio_client.Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def toy_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [save_peft_folder(make_adapter(name, r=r, seed=seed), root / name) for name, r, seed in (("a", 4, 1), ("b", 2, 2))]


def _cluster(client, k: int, **overrides):
    return client.predict(**{**CLUSTER_DEFAULTS, **overrides, "k": k}, api_name="/cluster")


def _map_points(plot: dict) -> int:
    return sum(len(trace["x"]) for trace in json.loads(plot["plot"])["data"])


def _unzip(archive: str, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        names = {Path(n).name for n in zf.namelist()}
        zf.extractall(dest)
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json", "recipe.yaml"} <= names
    return next(p.parent for p in dest.rglob("adapter_config.json"))


def test_toy_adapters_load_cluster_check_export(client, toy_folders, toy_model, tmp_path):
    from peft import PeftModel

    table, status, *_ = client.predict(None, "\n".join(map(str, toy_folders)), True, api_name="/load")
    assert [row[0] for row in table["data"]] == ["a", "b"] and "36 MSUs" in status
    plot, heatmap, summary = _cluster(client, k=4)
    assert _map_points(plot) == 36 and "merged rank **4**" in summary
    assert sum(sum(row) for row in json.loads(heatmap["plot"])["data"][0]["z"]) == 6  # one module: ranks 4 + 2
    _, results = client.predict("reverse: ab=", 1, api_name="/invariance")
    weight_rows = [row for row in results["data"] if row[1].startswith("weights")]
    assert [row[5] for row in weight_rows] == ["PASS", "PASS", "BREAKS, as it should"]
    archive, snippet, _ = client.predict(api_name="/export")
    folder = _unzip(archive, tmp_path)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    peft_model = PeftModel.from_pretrained(copy.deepcopy(toy_model), folder).eval()
    assert "PeftModel.from_pretrained" in snippet
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    # The exported adapter is the merge the map showed: compare with a local merge of the same inputs.
    from lego_viz.adapters import load_adapter
    from lego_viz.merge import merge

    local = merge([load_adapter(f) for f in toy_folders], "lego", k=4, features="canonical", param_reweight="l2", output_reweight=True, seed=0)
    torch.testing.assert_close(got, logits_with(toy_model, ids, local.modules), rtol=1e-4, atol=1e-5)  # float32 round-off


def test_failed_load_keeps_the_session(client, toy_folders):
    client.predict(None, str(toy_folders[0]), True, api_name="/load")
    with pytest.raises(AppError, match="no such file or folder"):
        client.predict(None, str(toy_folders[0].parent / "nonexistent"), False, api_name="/load")
    plot, _, _ = _cluster(client, k=2)
    assert _map_points(plot) == 24  # still adapter "a" alone: 6 modules x rank 4


def test_sessions_do_not_share_state(client, app_url, toy_folders):
    client.predict(None, str(toy_folders[0]), True, api_name="/load")
    other = gradio_client.Client(app_url, verbose=False)
    with pytest.raises(AppError, match="no adapter selected"):
        _cluster(other, k=2)


def test_bad_k_is_a_message_not_a_crash(client, toy_folders):
    client.predict(None, str(toy_folders[1]), True, api_name="/load")
    with pytest.raises(AppError, match=r"k=5 is out of range"):
        _cluster(client, k=5)


@pytest.mark.slow
@pytest.mark.skipif(not zoo_available(), reason="the demo zoo is not built (python scripts/build_zoo.py)")
def test_zoo_load_cluster_check_run_export(client, tmp_path):
    from peft import PeftModel

    from lego_viz.zoo.evaluate import generate
    from lego_viz.zoo.model import load_base

    table, status, *_ = client.predict(api_name="/load_zoo")
    assert len(table["data"]) >= 2 and "Loaded" in status
    plot, heatmap, summary = _cluster(client, k=4, projection="umap")
    assert _map_points(plot) == sum(int(row[7]) for row in table["data"])
    assert "merged rank **4**" in summary and heatmap is not None
    _, results = client.predict("reverse: lego=", 0, api_name="/invariance")
    assert [row[5] for row in results["data"]] == ["PASS"] * 4 + ["BREAKS, as it should"] * 2
    outputs = client.predict("reverse: lego=", api_name="/run")
    assert outputs["data"][0][0] == "base" and outputs["data"][-1][0].startswith("merge")
    archive, _, _ = client.predict(api_name="/export")
    folder = _unzip(archive, tmp_path)
    base, tokenizer = load_base(device="cpu")
    model = PeftModel.from_pretrained(base, folder).eval()
    assert len(generate(model, tokenizer, ["reverse: lego="])) == 1


@pytest.mark.slow
@pytest.mark.skipif(not zoo_available(), reason="the demo zoo is not built (python scripts/build_zoo.py)")
def test_readme_client_script_runs_against_the_app(app_url, tmp_path, monkeypatch):
    """The README's gradio_client script, taken from the README itself so the two cannot drift."""
    import re

    from lego_viz.adapters import load_adapter

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Scriptable Space\n(.*?)(?=^## )", readme, re.M | re.S).group(1)
    script = re.search(r"^```py\n(.*?)^```", section, re.M | re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in script
    monkeypatch.chdir(tmp_path)
    exec(compile(script.replace("http://127.0.0.1:7860/", app_url), "README.md", "exec"), {"__name__": "__readme__"})
    folder = next((tmp_path / "merged_adapter").rglob("adapter_config.json")).parent
    assert {p.name for p in folder.iterdir()} >= {"adapter_model.safetensors", "README.md", "recipe.yaml", "merge_report.json"}
    merged = load_adapter(folder)
    assert merged.dtype == "bfloat16" and set(merged.ranks) == {8}  # the export settings the script asked for
    assert "assets/zoo/base" in (folder / "README.md").read_text()  # the card names the base model
