"""Serving-ready exports: saved dtype, the rank cap, the model card and the push to the Hub (no network)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from conftest import make_adapter, save_peft_folder
from safetensors.torch import load_file

from lego_viz.adapters import load_adapter, load_adapters
from lego_viz.cli.commands import main
from lego_viz.export.folder import export_adapter
from lego_viz.export.serving import ServingError, push_to_hub
from lego_viz.merge import merge


def _folders(tmp_path, dtypes=(torch.float32, torch.float32)) -> list[str]:
    """Two toy adapters (r=4, r=2) written as PEFT folders with their factors stored in ``dtypes``."""
    out = []
    for (name, r, seed), dtype in zip((("a", 4, 1), ("b", 2, 2)), dtypes):
        adapter = make_adapter(name, r=r, seed=seed)
        tensors = {f"base_model.model.{m}.lora_{s}.weight": getattr(lora, s).to(dtype)
                   for m, lora in adapter.modules.items() for s in "AB"}
        out.append(str(save_peft_folder(adapter, tmp_path / name, tensors=tensors)))
    return out


def _dtypes(folder) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(folder / "adapter_model.safetensors")).values()}


def test_loader_records_the_stored_dtype(tmp_path):
    bf16, fp32 = load_adapters(_folders(tmp_path, (torch.bfloat16, torch.float32)))
    assert (bf16.dtype, fp32.dtype) == ("bfloat16", "float32")
    assert bf16.modules[next(iter(bf16.modules))].A.dtype == torch.float32  # computed in float32 all the same


@pytest.mark.parametrize("stored, flag, expected", [
    ((torch.bfloat16, torch.bfloat16), [], torch.bfloat16),  # default: the inputs' dtype
    ((torch.bfloat16, torch.float32), [], torch.float32),  # inputs disagree: the wider one
    ((torch.bfloat16, torch.bfloat16), ["--dtype", "fp32"], torch.float32),
    ((torch.float32, torch.float32), ["--dtype", "fp16"], torch.float16),
])
def test_saved_dtype(tmp_path, stored, flag, expected):
    dirs = _folders(tmp_path, stored)
    assert main(["merge", *dirs, "--method", "linear", "--no-checks", *flag, "--out", str(tmp_path / "o")]) == 0
    assert _dtypes(tmp_path / "o") == {expected}
    # the same numbers as the float32 merge, rounded once
    merged = merge(load_adapters(dirs), "linear")
    saved = load_adapter(tmp_path / "o")
    for name, lora in merged.modules.items():
        assert torch.equal(saved.modules[name].A, lora.A.to(expected).float()), name
    recipe = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())
    assert recipe["dtype"] == str(expected).removeprefix("torch.")


def test_fp16_overflow_is_refused(tmp_path):
    adapter = make_adapter("big", r=2)
    merged = merge([adapter], "linear", weights=[1e6])  # ΔW entries far beyond fp16's 65504
    with pytest.raises(ServingError, match=r"overflows in float16.*bf16 or fp32"):
        export_adapter(merged, tmp_path / "o", dtype="fp16")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "lego", "--k", "5", "--max-rank", "4"], r"exceed max rank 4 \(largest: rank 5 .*lower k to 4 or less"),
    (["--method", "linear", "--max-rank", "4"], r"rank 6 .*method linear keeps the inputs' ranks.*lego or svd with k ≤ 4"),
])
def test_max_rank_refuses_with_what_to_lower(tmp_path, capsys, args, message):
    dirs = _folders(tmp_path)
    assert main(["merge", *dirs, *args, "--no-checks", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert main(["merge", *dirs, "--method", "lego", "--k", "4", "--max-rank", "4", "--no-checks", "--out", str(tmp_path / "o")]) == 0


def test_model_card_names_base_method_sources_and_recipe(tmp_path):
    dirs = _folders(tmp_path)
    assert main(["merge", *dirs, "--k", "3", "--weights", "1,0.5", "--no-checks", "--out", str(tmp_path / "o")]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    header = yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))
    assert header["base_model"] == "toy/llama" and header["library_name"] == "peft"
    assert "merge-lego" in header["tags"] and header["pipeline_tag"] == "text-generation"
    assert "**lego**" in card and "k = 3" in card
    for adapter in load_adapters(dirs):
        assert adapter.sha256 in card and adapter.config_sha256 in card
    recipe_text = (tmp_path / "o" / "recipe.yaml").read_text().strip()
    assert f"```yaml\n{recipe_text}\n```" in card


def test_model_card_leaves_a_local_base_path_out_of_the_hub_metadata(tmp_path):
    from lego_viz.export.folder import recipe
    from lego_viz.export.model_card import model_card

    merged = merge([make_adapter("a", base=str(tmp_path))], "linear")  # a base that is a local folder
    card = model_card(merged, recipe(merged), "float32", "CAUSAL_LM")
    assert "base_model" not in yaml.safe_load(card.split("---")[1]) and str(tmp_path) in card


def test_push_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dirs = _folders(tmp_path)
    assert main(["merge", *dirs, "--method", "linear", "--no-checks", "--out", str(tmp_path / "o"),
                 "--push-to-hub", "me/merged"]) == 2
    err = capsys.readouterr().err
    assert "cannot push to me/merged: HF_HUB_OFFLINE is set" in err and str(tmp_path / "o") in err
    assert (tmp_path / "o" / "README.md").exists()  # the export itself is complete


def test_push_fails_clearly_without_a_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ServingError, match="no Hugging Face token. Run `hf auth login` or set HF_TOKEN"):
        push_to_hub(tmp_path, "me/merged")


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    """The wiring to huggingface_hub, with its client replaced by a recorder (tests never reach the network)."""
    import huggingface_hub

    calls = []

    class Recorder:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    folder = export_adapter(merge(load_adapters(_folders(tmp_path)), "linear"), tmp_path / "o")
    assert push_to_hub(folder, "me/merged", token="hf_x") == "https://huggingface.co/me/merged/commit/1"
    assert calls[0] == ("token", "hf_x") and calls[1] == ("create", "me/merged", True)
    assert calls[2][:2] == ("upload", "me/merged") and "README.md" in calls[2][2] and "adapter_config.json" in calls[2][2]
