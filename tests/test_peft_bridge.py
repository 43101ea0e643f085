"""Merging inside a PeftModel: merge_peft equals export → PeftModel.from_pretrained; adapters read back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_adapter, real_lora, save_peft_folder

import lego_viz
from lego_viz.adapters import AdapterError, load_adapter, load_adapters
from lego_viz.export.folder import export_adapter
from lego_viz.merge import MergeError, merge
from lego_viz.zoo.model import ZOO_DIR, adapter_dirs, load_base

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
needs_zoo = pytest.mark.skipif(not (ZOO_DIR / "base" / "config.json").is_file(),
                               reason="the demo zoo is not built (python scripts/build_zoo.py)")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _reloaded_logits(base, merged, folder) -> torch.Tensor:
    """The file path users take today: export the merge, load it with PeftModel.from_pretrained."""
    return _logits(peft.PeftModel.from_pretrained(base, export_adapter(merged, folder)).eval())


def test_lazy_export_keeps_import_light():
    import subprocess
    import sys

    code = "import sys, lego_viz; assert 'peft' not in sys.modules and 'torch' not in sys.modules; lego_viz.merge_peft"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@needs_zoo
@pytest.mark.parametrize("method, options", [("lego", {"k": 8, "seed": 0}), ("svd", {"k": 4}), ("linear", {})])
def test_zoo_merge_in_the_model_equals_export_and_reload(tmp_path, method, options):
    dirs = adapter_dirs()
    base, _ = load_base(device="cpu")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["reverse"], adapter_name="reverse").eval()
    model.load_adapter(dirs["sort"], adapter_name="sort")
    merged = lego_viz.merge_peft(model, ["reverse", "sort"], method, weights=[1.0, 0.5], **options)
    assert model.active_adapter == "reverse"  # added, not activated, as add_weighted_adapter does
    model.set_adapter("merged")
    got = _logits(model)
    with model.disable_adapter():
        assert not torch.allclose(got, _logits(model), atol=1e-3)  # the merge changes the outputs
    from_files = merge(load_adapters([dirs["reverse"], dirs["sort"]]), method, weights=[1.0, 0.5], **options)
    for name, lora in merged.modules.items():
        assert torch.equal(lora.A, from_files.modules[name].A), name  # same inputs, same merge
    # same weights in, only PEFT's forward order of operations can differ: float32 round-off
    torch.testing.assert_close(got, _reloaded_logits(base, from_files, tmp_path / "export"), rtol=1e-5, atol=1e-6)


def test_real_gpt2_adapters_merge_in_the_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    paths = [real_lora("gpt2_causal_jasencarroll"), real_lora("gpt2_notask_lossner")]
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64)).eval()  # gpt2 shapes (12 layers), tiny vocab
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="j").eval()
    model.load_adapter(paths[1], adapter_name="l")
    for name, path in zip(("j", "l"), paths):
        _assert_same_adapter(lego_viz.adapter_from_peft(model, name), load_adapter(path))
    lego_viz.merge_peft(model, ["j", "l"], "lego", k=8, weights=[1.0, 2.0], seed=0, adapter_name="both")
    model.set_adapter("both")
    from_files = merge(load_adapters(paths), "lego", k=8, weights=[1.0, 2.0], seed=0)
    torch.testing.assert_close(_logits(model), _reloaded_logits(base, from_files, tmp_path / "e"), rtol=1e-5, atol=1e-5)


def _assert_same_adapter(got, expected):
    assert got.modules.keys() == expected.modules.keys()
    for name, lora in expected.modules.items():
        other = got.modules[name]
        assert torch.equal(other.A, lora.A) and torch.equal(other.B, lora.B), name
        assert other.scale == pytest.approx(lora.scale, rel=1e-12) and other.fan_in_fan_out == lora.fan_in_fan_out, name


def test_adapter_from_peft_reads_rslora_and_patterns_as_the_files_say(tmp_path, toy_model):
    adapter = make_adapter("p", r=4, alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    folder = save_peft_folder(adapter, tmp_path / "p")
    model = peft.PeftModel.from_pretrained(copy.deepcopy(toy_model), folder, adapter_name="p")
    read = lego_viz.adapter_from_peft(model, "p")
    _assert_same_adapter(read, load_adapter(folder))
    assert {m.scale for m in read.modules.values()} == {8 / 2, 8 / 2**0.5, 3 / 2}  # α/√r per module


def test_bridge_errors_say_what_to_do(tmp_path, toy_model):
    folder = save_peft_folder(make_adapter("a"), tmp_path / "a")
    with pytest.raises(AdapterError, match="expected a peft.PeftModel"):
        lego_viz.merge_peft(toy_model, ["a"])
    model = peft.PeftModel.from_pretrained(copy.deepcopy(toy_model), folder, adapter_name="a")
    with pytest.raises(AdapterError, match="no adapter 'b'; it has a"):
        lego_viz.merge_peft(model, ["a", "b"])
    with pytest.raises(MergeError, match="already has an adapter 'a'"):
        lego_viz.merge_peft(model, ["a"], adapter_name="a")
    with pytest.raises(MergeError, match="k=99 is out of range"):
        lego_viz.merge_peft(model, ["a"], k=99)
    assert list(model.peft_config) == ["a"]  # a refused merge adds nothing
