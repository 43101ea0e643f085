"""Loading and validating adapters: real third-party files and synthetic edge cases."""

import json
import math
import os
import pickle
import zipfile

import pytest
import torch
from conftest import REAL_LORAS, make_adapter, real_lora, real_lora_names, save_peft_folder

from lego_viz.adapters import AdapterError, check_compatible, load_adapter, load_adapters, same_base

EXPECTED_MODULES = {
    "distilbert_seqcls_r4_raghavaram": 12, "distilbert_sst2_seqcls_pathupally": 12, "distilgpt2_r8_niketsharma": 6,
    "gpt2_cattn_cproj_seqcls_deepbiolab": 36, "gpt2_causal_jasencarroll": 12, "gpt2_notask_lossner": 12,
    "gpt2_r16_bin_yijundeng": 12, "gpt2_seqcls_stathopoan": 12, "pythia70m_r32_bin_kimiko": 6,
    "qwen25_05b_r8_vqdung": 48, "roberta_seqcls_sidmahurkar": 24, "segformer_b0_r32_polarbeargo": 16,
    "tinyllama_r4_arona_a": 44, "tinyllama_r4_arona_b": 44,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MODULES))
def test_every_real_adapter_loads(name):
    adapter = load_adapter(real_lora(name))
    assert len(adapter.modules) == EXPECTED_MODULES[name]
    r, alpha = adapter.config["r"], adapter.config["lora_alpha"]
    for lora in adapter.modules.values():
        assert lora.A.dtype == torch.float32 and lora.r == r
        assert lora.scale == pytest.approx(alpha / r)
        assert torch.isfinite(lora.A).all() and lora.B.abs().sum() > 0
    assert len(adapter.sha256) == 64


def test_fixture_list_is_complete():
    if not REAL_LORAS.is_dir():
        pytest.skip("real adapters absent")
    assert set(real_lora_names()) == set(EXPECTED_MODULES)


def test_gpt2_conv1d_and_bin_quirks():
    gpt2 = load_adapter(real_lora("gpt2_r16_bin_yijundeng"))  # old 16-key config, zip-format .bin
    assert gpt2.fan_in_fan_out and gpt2.weights_file == "adapter_model.bin"
    lora = gpt2.modules["transformer.h.0.attn.c_attn"]
    assert (lora.d_in, lora.d_out, lora.r) == (768, 2304, 16)
    assert "score.weight" in gpt2.extra_tensors and any("left out of merges" in w for w in gpt2.warnings)


def test_one_target_name_with_two_shapes():
    adapter = load_adapter(real_lora("gpt2_cattn_cproj_seqcls_deepbiolab"))
    attn, mlp = adapter.modules["transformer.h.3.attn.c_proj"], adapter.modules["transformer.h.3.mlp.c_proj"]
    assert (attn.d_in, attn.d_out) == (768, 768) and (mlp.d_in, mlp.d_out) == (3072, 768)


def test_old_pythia_config_with_unmatched_target_and_segformer_heads():
    pythia = load_adapter(real_lora("pythia70m_r32_bin_kimiko"))
    assert all(name.endswith("query_key_value") for name in pythia.modules)
    seg = load_adapter(real_lora("segformer_b0_r32_polarbeargo"))
    shapes = {lora.d_in for lora in seg.modules.values()}
    assert shapes == {32, 64, 160, 256}
    assert any(t.dim() == 0 for t in seg.extra_tensors.values())  # num_batches_tracked, kept aside


def test_distilgpt2_is_not_merged_into_gpt2_despite_matching_keys():
    gpt2 = load_adapter(real_lora("gpt2_seqcls_stathopoan"))
    distil = load_adapter(real_lora("distilgpt2_r8_niketsharma"))
    assert set(distil.modules) <= set(gpt2.modules)  # the trap: same keys and shapes
    with pytest.raises(AdapterError, match="'distilgpt2'.*different base models"):
        check_compatible([gpt2, distil])


def test_real_groups_are_compatible():
    group = load_adapters([real_lora(n) for n in ("gpt2_seqcls_stathopoan", "gpt2_causal_jasencarroll",
                                                    "gpt2_notask_lossner", "gpt2_r16_bin_yijundeng")])
    assert check_compatible(group) == [] or all("only some" not in w for w in check_compatible(group))
    partial = load_adapters([real_lora("gpt2_seqcls_stathopoan"), real_lora("gpt2_cattn_cproj_seqcls_deepbiolab")])
    assert any("24 of 36 modules" in w for w in check_compatible(partial))
    distil = load_adapters([real_lora("distilbert_sst2_seqcls_pathupally"), real_lora("distilbert_seqcls_r4_raghavaram")])
    with pytest.raises(AdapterError, match="allow-base-mismatch"):
        check_compatible(distil)
    assert any("allowed by request" in w for w in check_compatible(distil, allow_base_mismatch=True))


def test_base_name_aliases():
    assert same_base("gpt2", "openai-community/gpt2")
    assert same_base("distilbert-base-uncased", "distilbert/distilbert-base-uncased")
    assert not same_base("distilbert-base-uncased", "distilbert/distilbert-base-uncased-finetuned-sst-2-english")
    assert not same_base("a/llama", "b/llama")


# ----------------------------------------------------------------------------- synthetic configs


def test_rank_and_alpha_patterns_and_rslora(tmp_path):
    adapter = make_adapter(r=4, alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 32}, use_rslora=True)
    loaded = load_adapter(save_peft_folder(adapter, tmp_path / "a"))
    down, q = loaded.modules["model.layers.0.mlp.down_proj"], loaded.modules["model.layers.0.self_attn.q_proj"]
    assert down.r == 2 and down.scale == pytest.approx(32 / math.sqrt(2))
    assert q.r == 4 and q.scale == pytest.approx(8 / math.sqrt(4))


def test_missing_lora_alpha_takes_peft_default(tmp_path):
    # PEFT's LoraConfig fills a missing lora_alpha with 8 (not r), whatever the rank.
    from peft import LoraConfig

    adapter = make_adapter(r=4)
    config = {k: v for k, v in adapter.config.items() if k != "lora_alpha"}
    folder = save_peft_folder(adapter, tmp_path / "a", config=config)
    assert LoraConfig.from_pretrained(folder).lora_alpha == 8
    loaded = load_adapter(folder)
    assert all(m.scale == pytest.approx(8 / 4) for m in loaded.modules.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_load_as_float32(tmp_path, dtype):
    adapter = make_adapter()
    tensors = {}
    for m, lora in adapter.modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = lora.A.to(dtype)
        tensors[f"base_model.model.{m}.lora_B.weight"] = lora.B.to(dtype)
    loaded = load_adapter(save_peft_folder(adapter, tmp_path / "h", tensors=tensors))
    lora = next(iter(loaded.modules.values()))
    assert lora.A.dtype == torch.float32


def test_zip_of_a_folder_loads(tmp_path):
    folder = save_peft_folder(make_adapter(), tmp_path / "my_adapter")
    archive = tmp_path / "my_adapter.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"my_adapter/{f.name}")
    loaded = load_adapter(archive)
    assert loaded.name == "my_adapter" and len(loaded.modules) == 6


def test_legacy_key_with_adapter_name_is_understood(tmp_path):
    adapter = make_adapter()
    tensors = {}
    for m, lora in adapter.modules.items():
        tensors[f"base_model.model.{m}.lora_A.default.weight"] = lora.A
        tensors[f"base_model.model.{m}.lora_B.default.weight"] = lora.B
    assert len(load_adapter(save_peft_folder(adapter, tmp_path / "d", tensors=tensors)).modules) == 6


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/lego_viz_pwned",))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(make_adapter().config))
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    if os.path.exists("/tmp/lego_viz_pwned"):
        os.remove("/tmp/lego_viz_pwned")
    with pytest.raises(AdapterError, match="refused for safety|corrupt"):
        load_adapter(folder)
    assert not os.path.exists("/tmp/lego_viz_pwned")


def _tampered(tmp_path, *, config=None, tensors=None, drop=None):
    adapter = make_adapter()
    full = {}
    for m, lora in adapter.modules.items():
        full[f"base_model.model.{m}.lora_A.weight"] = lora.A
        full[f"base_model.model.{m}.lora_B.weight"] = lora.B
    if tensors:
        full.update(tensors)
    if drop:
        full.pop(drop)
    cfg = dict(adapter.config)
    cfg.update(config or {})
    return save_peft_folder(adapter, tmp_path / "bad", tensors=full, config=cfg)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("kwargs,pattern", [
    ({"config": {"peft_type": "PREFIX_TUNING"}}, "peft_type is 'PREFIX_TUNING'; only LORA"),
    ({"config": {"r": 0}}, "r must be a positive integer"),
    ({"config": {"r": -3}}, "r must be a positive integer"),
    ({"config": {"r": 10**9}}, "implausibly large"),
    ({"config": {"lora_alpha": 0}}, "lora_alpha must be a positive number"),
    ({"config": {"lora_alpha": -4}}, "lora_alpha must be a positive number"),
    ({"config": {"use_dora": True}}, "DoRA"),
    ({"config": {"rank_pattern": {"q(": 2}}}, "rank_pattern key 'q\\(' is not a valid regular expression"),
    ({"config": {"r": 8}}, "r=4 rows but the config says r=8"),
    ({"tensors": {f"{Q}.lora_A.weight": torch.full((4, 32), float("nan"))}}, f"{Q}.lora_A.weight has 128 NaN/inf"),
    ({"tensors": {f"{Q}.lora_B.weight": torch.full((32, 4), float("inf"))}}, "NaN/inf"),
    ({"tensors": {f"{Q}.lora_B.weight": torch.zeros(32, 3)}}, "same r"),
    ({"drop": f"{Q}.lora_B.weight"}, "no matching lora_B tensor for module model.layers.0.self_attn.q_proj"),
])
def test_bad_adapters_give_clear_errors(tmp_path, kwargs, pattern):
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(_tampered(tmp_path, **kwargs))


def test_unreadable_files(tmp_path):
    folder = save_peft_folder(make_adapter(), tmp_path / "x")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json found"):
        load_adapter(folder)
    empty = tmp_path / "empty_cfg"
    empty.mkdir()
    (empty / "adapter_config.json").write_text(json.dumps(make_adapter().config))
    with pytest.raises(AdapterError, match="no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(empty)


@pytest.mark.parametrize("spec,pattern", [
    ("", "empty adapter path"),
    ("/definitely/not/here", "no such file or folder"),
    ("a/" + "../" * 300 + "x", "no such file or folder, and not a valid hub id"),
])
def test_bad_specs(spec, pattern):
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(spec)


def test_hub_id_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterError, match="not in the Hugging Face cache"):
        load_adapter("someone/some-lora-that-is-not-cached")


@pytest.mark.parametrize("entry,pattern", [("../evil/adapter_config.json", "'\\.\\.' escape"), ("/abs/adapter_config.json", "absolute")])
def test_zip_traversal_is_refused(tmp_path, entry, pattern):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(entry, "{}")
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(archive)


def test_zip_bomb_is_refused_before_extraction(tmp_path, monkeypatch):
    import lego_viz.adapters.loading as mod

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/adapter_model.safetensors", b"\0" * (4 << 20))
    monkeypatch.setattr(mod, "MAX_UNZIPPED_BYTES", 1 << 20)
    with pytest.raises(AdapterError, match="zip bomb"):
        mod._safe_extract_zip(archive, tmp_path / "out", max_bytes=mod.MAX_UNZIPPED_BYTES)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_duplicate_names_are_made_unique(tmp_path):
    folder = save_peft_folder(make_adapter(), tmp_path / "same")
    names = [a.name for a in load_adapters([folder, folder])]
    assert names == ["same", "same_2"]
