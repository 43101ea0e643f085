"""Export: PEFT folders that PeftModel loads exactly, reports, recipes, atomic writes."""

import json
import re

import pytest
import torch
import yaml
from conftest import TOY_HIDDEN, TOY_INTER, TOY_LAYERS, make_adapter, real_lora
from safetensors.torch import load_file

import lego_viz.export.folder as export_mod
from lego_viz.adapters import load_adapter, load_adapters
from lego_viz.export.folder import ExportError, export_adapter
from lego_viz.merge import MergeError, merge


def _peft_load(base, folder):
    """Load an exported folder into ``base`` and return (model, missing LoRA keys, unexpected keys)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = LoraConfig.from_pretrained(str(folder))
    model = get_peft_model(base, config)
    result = set_peft_model_state_dict(model, load_peft_weights(str(folder)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    return model, missing, list(result.unexpected_keys)


def _assert_peft_deltas_match(model, merged):
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(layers) == set(merged.modules)
    for name, lora in merged.modules.items():
        delta = layers[name].get_delta_weight("default")
        if lora.fan_in_fan_out:  # PEFT returns ΔWᵀ for Conv1D
            delta = delta.T
        # float32 factors copied verbatim: only the product's rounding differs
        assert torch.allclose(delta, lora.delta_weight(), rtol=1e-5, atol=1e-6), name


def _toy_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=TOY_HIDDEN, intermediate_size=TOY_INTER,
                                        num_hidden_layers=TOY_LAYERS, num_attention_heads=4, num_key_value_heads=2))


def test_export_reloads_in_peft_with_per_module_ranks(tmp_path, toy_adapters):
    merged = merge(toy_adapters, "lego", k={"q_proj": 2, "*": 5})
    out = export_adapter(merged, tmp_path / "out", adapters=toy_adapters)
    model, missing, unexpected = _peft_load(_toy_base(), out)
    assert missing == [] and unexpected == []
    _assert_peft_deltas_match(model, merged)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "lego" and report["inputs"][0]["sha256"] == ""  # in-memory adapters have no file
    assert report["cluster_sizes"]["model.layers.0.self_attn.q_proj"] and sum(report["cluster_sizes"]["model.layers.0.self_attn.q_proj"]) == 12
    assert 0 < report["relative_error_vs_weighted_sum"]["max"] < 1.5
    assert {"torch", "peft", "transformers"} <= set(report["versions"])


def _gpt2_base():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64))  # gpt2-small shapes, tiny vocab


def _tinyllama_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    # TinyLlama-1.1B attention shapes (q 2048→2048, v 2048→256); MLP and vocab shrunk as no LoRA touches them
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=2048, intermediate_size=32, num_hidden_layers=22,
                                        num_attention_heads=32, num_key_value_heads=4))


def _distilbert_base():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, max_position_embeddings=64))


GROUPS = {
    "gpt2": (("gpt2_seqcls_stathopoan", "gpt2_causal_jasencarroll", "gpt2_notask_lossner", "gpt2_r16_bin_yijundeng"), _gpt2_base, False),
    "tinyllama": (("tinyllama_r4_arona_a", "tinyllama_r4_arona_b"), _tinyllama_base, False),
    "distilbert": (("distilbert_sst2_seqcls_pathupally", "distilbert_seqcls_r4_raghavaram"), _distilbert_base, True),
}
EQUAL_RANK_GROUPS = {"gpt2": 3, "tinyllama": 2}  # how many leading members share one rank


@pytest.fixture(scope="module")
def real_groups():
    return {key: load_adapters([real_lora(n) for n in names]) for key, (names, _, _) in GROUPS.items()}


@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("method", ["lego", "linear", "svd", "peft_linear", "ties", "dare_linear"])
def test_real_groups_merge_with_every_method_that_accepts_them(real_groups, group, method):
    adapters = real_groups[group]
    allow = GROUPS[group][2]
    if method in ("peft_linear", "ties", "dare_linear"):
        if group not in EQUAL_RANK_GROUPS:  # the distilbert pair mixes r=8 and r=4
            with pytest.raises(MergeError, match="equal ranks"):
                merge(adapters, method, allow_base_mismatch=allow)
            return
        adapters = adapters[: EQUAL_RANK_GROUPS[group]]
    k = 4 if method in ("lego", "svd") else None
    merged = merge(adapters, method, k=k, allow_base_mismatch=allow)
    assert set(merged.modules) == set(adapters[0].modules)
    assert all(torch.isfinite(m.A).all() and torch.isfinite(m.B).all() for m in merged.modules.values())


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_real_merge_exports_and_reloads_in_peft(real_groups, group, tmp_path):
    _, make_base, allow = GROUPS[group]
    adapters = real_groups[group]
    merged = merge(adapters, "lego", k=4, allow_base_mismatch=allow)
    out = export_adapter(merged, tmp_path / group, adapters=adapters)
    model, missing, unexpected = _peft_load(make_base(), out)
    assert missing == [] and unexpected == []
    _assert_peft_deltas_match(model, merged)


def test_partial_overlap_merge_keeps_every_module(tmp_path):
    adapters = load_adapters([real_lora("gpt2_seqcls_stathopoan"), real_lora("gpt2_cattn_cproj_seqcls_deepbiolab")])
    merged = merge(adapters, "lego", k=8)
    assert len(merged.modules) == 36
    assert merged.modules["transformer.h.0.mlp.c_proj"].d_in == 3072
    _, missing, unexpected = _peft_load(_gpt2_base(), export_adapter(merged, tmp_path / "p"))
    assert missing == [] and unexpected == []


def test_recipe_reproduces_the_same_tensors_bit_for_bit(tmp_path, toy_adapters):
    from conftest import save_peft_folder

    from lego_viz.cli.commands import main

    dirs = [str(save_peft_folder(a, tmp_path / a.name)) for a in toy_adapters]
    assert main(["merge", *dirs, "--k", "5", "--weights", "1,0.5,2", "--features", "normalized", "--seed", "3",
                 "--out", str(tmp_path / "one")]) == 0
    assert main(["merge", "--recipe", str(tmp_path / "one" / "recipe.yaml"), "--out", str(tmp_path / "two")]) == 0
    first = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    recipe = yaml.safe_load((tmp_path / "one" / "recipe.yaml").read_text())
    assert recipe["parameters"]["features"] == "normalized" and recipe["parameters"]["k"] == 5
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1.0, 0.5, 2.0]


def test_recipe_notices_a_changed_adapter_config(tmp_path, toy_adapters, capsys):
    """The config sets the scale (lora_alpha, rank/alpha patterns): a recipe must notice when it changed,
    not only when the weights file did."""
    import json

    from conftest import save_peft_folder

    from lego_viz.cli.commands import main

    dirs = [save_peft_folder(a, tmp_path / a.name) for a in toy_adapters]
    assert main(["merge", *map(str, dirs), "--k", "5", "--no-checks", "--out", str(tmp_path / "one")]) == 0
    inputs = json.loads((tmp_path / "one" / "merge_report.json").read_text())["inputs"]
    assert all(len(entry["config_sha256"]) == 64 for entry in inputs)
    config = json.loads((dirs[1] / "adapter_config.json").read_text())
    (dirs[1] / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    capsys.readouterr()
    assert main(["merge", "--recipe", str(tmp_path / "one" / "recipe.yaml"), "--no-checks", "--out", str(tmp_path / "two")]) == 0
    err = capsys.readouterr().err
    assert "b changed since the recipe was written" in err and "adapter_config.json" in err
    assert "a changed" not in err and "c changed" not in err


def test_export_refuses_non_empty_folder_without_force(tmp_path, toy_adapters):
    merged = merge(toy_adapters, "linear")
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_adapter(merged, target)
    # --force replaces an earlier export only (issue 26): a folder with the user's own files stays
    with pytest.raises(ExportError, match="not a folder an export wrote .it holds keep.txt"):
        export_adapter(merged, target, force=True)
    assert (target / "keep.txt").read_text() == "user data"
    (target / "keep.txt").unlink()
    export_adapter(merged, target)
    export_adapter(merge(toy_adapters, "svd", k=2), target, force=True)
    assert json.loads((target / "merge_report.json").read_text())["method"] == "svd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temp or backup folders left


def test_interrupted_export_leaves_nothing_behind(tmp_path, toy_adapters, monkeypatch):
    merged = merge(toy_adapters, "svd", k=2)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(export_mod.yaml, "safe_dump", explode)  # fails after the weights are written
    with pytest.raises(RuntimeError, match="simulated"):
        export_adapter(merged, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_exported_adapter_loads_back_with_our_loader(tmp_path, toy_adapters):
    merged = merge(toy_adapters, "lego", k=3)
    loaded = load_adapter(export_adapter(merged, tmp_path / "x"))
    for name, lora in merged.modules.items():
        assert torch.equal(loaded.modules[name].A, lora.A) and loaded.modules[name].scale == 1.0


def test_single_adapter_export_matches_input(tmp_path):
    adapter = make_adapter(r=3, alpha=9)
    merged = merge([adapter], "lego", k=3, param_reweight="none", output_reweight=False)
    loaded = load_adapter(export_adapter(merged, tmp_path / "y"))
    for name, lora in adapter.modules.items():
        assert torch.allclose(loaded.modules[name].delta_weight(), lora.delta_weight(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lego_viz_recipe: 1\nadapters: [{path: a, name: a}]\n", "names no merge method"),
        ("lego_viz_recipe: 1\nmethod: lego\nadapters: [a]\n", "adapters[0] needs a 'path' and a 'name'"),
        ("lego_viz_recipe: 1\nmethod: lego\nadapters: [{path: a, name: a}]\noptions: [1]\n", "'options' must be a mapping"),
    ],
)
def test_incomplete_recipe_says_what_is_missing(tmp_path, text, expected):
    from lego_viz.export.recipe import ConfigError, load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_recipe(path)


def test_adapters_that_disagree_on_fan_in_fan_out_merge_and_reload(tmp_path):
    """An old-PEFT gpt2 config without the flag (False) beside one with it: the factors are the same."""
    from conftest import save_peft_folder

    good = load_adapter(real_lora("gpt2_causal_jasencarroll"))
    slipped = load_adapter(save_peft_folder(good, tmp_path / "slipped", config={**good.config, "fan_in_fan_out": False}))
    assert not slipped.fan_in_fan_out
    other = load_adapter(real_lora("gpt2_notask_lossner"))
    merged = merge([slipped, other], "linear")
    assert any("fan_in_fan_out" in w for w in merged.warnings)
    reference = merge([good, other], "linear")
    for name, module in reference.modules.items():
        assert merged.modules[name].fan_in_fan_out
        assert torch.equal(merged.modules[name].delta_weight(), module.delta_weight())
    model, missing, unexpected = _peft_load(_gpt2_base(), export_adapter(merged, tmp_path / "out"))
    assert missing == [] and unexpected == []
    _assert_peft_deltas_match(model, merged)
