"""Real adapters on their real base: resolving the base (folder, HF cache, offline), the size guard,
public-mode refusals, outputs / log-likelihood / KL retention, output-space checks — through the
library, the CLI and the app's handlers.

Bases are built from transformers configs with random weights and saved to a temporary folder (no
download). The gpt2 base keeps every shape the real gpt2 adapters touch (12 layers, width 768) and
shrinks only what they do not: the vocabulary (the zoo's character tokenizer) and the MLP width.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from safetensors.torch import save_file

from lego_viz.adapters import LoraAdapter, load_adapters
from lego_viz.cli.commands import main
from lego_viz.export.folder import export_adapter
from lego_viz.merge import merge
from lego_viz.models.base import BaseModelError, count_parameters, load_base, max_parameters, resolve_base
from lego_viz.models.compare import (
    MIN_EFFECT_KL,
    TextError,
    greedy_outputs,
    model_variants,
    output_retention,
    output_space_checks,
    parse_texts,
)
from lego_viz.ui.models import fits_model
from lego_viz.ui.state import Session
from tests.conftest import REAL_LORAS, make_adapter, real_lora

GPT2_ADAPTERS = ("gpt2_seqcls_stathopoan", "gpt2_causal_jasencarroll", "gpt2_notask_lossner")  # the three r8 c_attn ones
TEXTS = ["the quick fox", "hello world"]
GPT2_FULL_PARAMETERS = 124_439_808  # openai-community/gpt2, tied embeddings counted once


def save_random_base(config, folder: Path, seed: int = 0) -> Path:
    """A base folder (config, random safetensors weights, the zoo tokenizer) without instantiating the model.

    Weights are drawn directly per parameter of a meta-device model: building a 30 M-parameter
    gpt2 with transformers' own initialisation took ~15 s on the shared CPU, this takes a fraction.
    """
    from transformers import AutoModelForCausalLM

    from lego_viz.zoo.tokenizer import build_tokenizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if param.dim() == 1:
            tensors[name] = torch.ones(param.shape) if name.endswith("weight") else torch.zeros(param.shape)
        else:
            tensors[name] = torch.randn(param.shape, generator=gen) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    from lego_viz.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=768, n_layer=12, n_head=12, n_inner=64,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_random_base(config, tmp_path_factory.mktemp("bases") / "gpt2")


@pytest.fixture(scope="session")
def gpt2_adapters() -> list[LoraAdapter]:
    return load_adapters([real_lora(name) for name in GPT2_ADAPTERS])


@pytest.fixture(scope="session")
def gpt2_model(gpt2_base, gpt2_adapters):
    return load_base(resolve_base(str(gpt2_base), gpt2_adapters))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, gpt2_base) -> Path:
    """An offline Hugging Face cache holding 'gpt2' (the random base), as a user who downloaded it once has."""
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--gpt2"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in gpt2_base.iterdir():
        (snapshot / file.name).symlink_to(file)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


# ----------------------------------------------------------------------------- resolving and guarding


def test_reduced_gpt2_keeps_every_shape_the_real_adapters_touch(gpt2_model, gpt2_adapters):
    model, _ = gpt2_model
    config = model.config
    # Reduced from gpt2: vocabulary 50257 → the zoo's characters, MLP width 3072 → 64, 1024 → 128 positions.
    assert (config.n_layer, config.n_embd, config.n_head) == (12, 768, 12)
    assert (config.n_inner, config.n_positions) == (64, 128) and config.vocab_size < 100
    assert fits_model(model, gpt2_adapters)
    assert next(model.parameters()).dtype == torch.float32  # CPU: float32


def test_the_base_comes_from_the_hf_cache_by_the_adapters_own_name(hf_cache, gpt2_adapters):
    source = resolve_base(None, gpt2_adapters)  # nothing typed: base_model_name_or_path is "gpt2"
    assert (source.name, source.origin, source.path) == ("gpt2", "Hugging Face cache", hf_cache)


def test_offline_and_not_cached_says_how_to_get_it(tmp_path, monkeypatch, gpt2_adapters):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError, match=r"'gpt2' is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_base(None, gpt2_adapters)


def test_size_guard_counts_parameters_from_the_config_before_loading(tmp_path, monkeypatch):
    from transformers import GPT2Config

    folder = tmp_path / "full_gpt2"
    GPT2Config().save_pretrained(folder)  # config only: the guard must not need the weights
    assert count_parameters(folder) == (GPT2_FULL_PARAMETERS, "gpt2")
    monkeypatch.delenv("LEGO_VIZ_MAX_BASE_PARAMS", raising=False)
    assert max_parameters("cpu") == 2e9
    with pytest.raises(BaseModelError, match=r"0\.12 B parameters, above the limit of 0\.10 B on cpu.*LEGO_VIZ_MAX_BASE_PARAMS"):
        resolve_base(str(folder), max_params=1e8)
    monkeypatch.setenv("LEGO_VIZ_MAX_BASE_PARAMS", "1e8")
    with pytest.raises(BaseModelError, match="above the limit"):
        resolve_base(str(folder))
    monkeypatch.setenv("LEGO_VIZ_MAX_BASE_PARAMS", "2e8")
    assert resolve_base(str(folder)).parameters == GPT2_FULL_PARAMETERS


def test_public_mode_refuses_folders_and_hub_ids_off_the_allowlist(hf_cache, gpt2_base, gpt2_adapters, monkeypatch):
    monkeypatch.setenv("LEGO_VIZ_BASE_ALLOWLIST", "")  # set but empty: nothing allowed (unset allows the SmolLM2 base)
    with pytest.raises(BaseModelError, match="local folders are refused on this public app"):
        resolve_base(str(gpt2_base), public=True)
    with pytest.raises(BaseModelError, match=r"'gpt2' is not in this app's list of base models \(none\).*LEGO_VIZ_BASE_ALLOWLIST"):
        resolve_base(None, gpt2_adapters, public=True)
    monkeypatch.setenv("LEGO_VIZ_BASE_ALLOWLIST", "distilgpt2, gpt2")
    assert resolve_base(None, gpt2_adapters, public=True).origin == "Hugging Face cache"


# ----------------------------------------------------------------------------- outputs, retention, checks


def test_retention_is_one_for_the_adapter_itself_and_zero_for_the_base(gpt2_model, gpt2_adapters):
    model, tokenizer = gpt2_model
    kept_adapter = gpt2_adapters[1]  # jasencarroll: clearly moves the base
    merges = {
        "itself": kept_adapter.modules,
        "nothing": {name: _scaled(m, 0.0) for name, m in kept_adapter.modules.items()},
        "linear": merge(gpt2_adapters, "linear").modules,
    }
    report = output_retention(model, tokenizer, TEXTS, gpt2_adapters, merges)
    name = kept_adapter.name
    assert report.kl_to_merge["itself"][name] == pytest.approx(0.0, abs=1e-9)  # same logits, KL of a distribution with itself
    assert report.kept("itself", name) == pytest.approx(1.0, abs=1e-6)
    assert report.kept("nothing", name) == pytest.approx(0.0, abs=1e-6)  # a zero update is the base
    assert report.kl_to_base[name] > 10 * MIN_EFFECT_KL
    # lossner's ‖ΔW‖ ≈ 0.23 barely moves the base: no ratio is reported for it.
    assert report.kl_to_base["gpt2_notask_lossner"] < MIN_EFFECT_KL and math.isnan(report.kept("linear", "gpt2_notask_lossner"))
    assert report.n_texts == 2 and report.n_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS)
    # log-likelihood per token of the base, recomputed directly
    total = count = 0
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        total += float(logp[:-1].gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert report.loglik["base"] == pytest.approx(total / count, rel=1e-5)
    assert any("score.weight [6, 768] not used" in note for note in report.notes)
    assert any("merges hold LoRA units only" in note for note in report.notes)
    json.dumps(report.to_dict())  # NaN kept is None: valid JSON


def test_retention_sweep_over_k_reaches_the_exact_sum_at_k_equals_n(gpt2_model, gpt2_adapters):
    from lego_viz.models.compare import retention_sweep

    model, tokenizer = gpt2_model
    # ARCHITECTURE §4: k = n (here 3 × 8 units) without reweighting is exactly the weighted sum
    merges = {k: merge(gpt2_adapters, "lego", k=k, param_reweight="none", output_reweight=False).modules for k in (4, 24)}
    sweep = retention_sweep(model, tokenizer, TEXTS[:1], gpt2_adapters, merges)
    linear = output_retention(model, tokenizer, TEXTS[:1], gpt2_adapters, {"linear": merge(gpt2_adapters, "linear").modules})
    assert list(sweep) == [4, 24]
    assert sweep[24] == pytest.approx(linear.mean_kept("linear"), abs=1e-4)  # float32 sums in another order
    assert sweep[4] != pytest.approx(sweep[24], abs=1e-4)  # 4 clusters of 24 units lose something


def _scaled(module, factor):
    from lego_viz.adapters import LoraModule

    return LoraModule(A=module.A, B=module.B, scale=module.scale * factor, fan_in_fan_out=module.fan_in_fan_out)


def test_greedy_outputs_side_by_side(gpt2_model, gpt2_adapters):
    model, tokenizer = gpt2_model
    variants, _ = model_variants(model, gpt2_adapters[:1], {"merge of one": gpt2_adapters[0].modules})
    rows = greedy_outputs(model, tokenizer, "hello", variants, max_new_tokens=4)
    assert [label for label, _ in rows] == ["base", GPT2_ADAPTERS[0], "merge of one"]
    assert rows[-1][1] == rows[1][1]  # a merge equal to adapter 0 says what adapter 0 says
    assert all(0 < len(out) <= 4 for _, out in rows)  # 4 new characters at most (the zoo tokenizer is per character)


def test_modules_to_save_are_swapped_in_for_their_adapter_only(gpt2_model, gpt2_adapters):
    from lego_viz.models.compare import applied

    model, _ = gpt2_model
    head = torch.full((768,), 3.0)
    adapter = LoraAdapter(**{**vars(gpt2_adapters[1]), "extra_tensors": {"transformer.ln_f.modules_to_save.default.weight": head}})
    variants, notes = model_variants(model, [adapter], {})
    assert set(variants[1].heads) == {"transformer.ln_f.weight"} and "replace the base's while it runs" in notes[0]
    before = model.transformer.ln_f.weight.clone()
    with applied(model, variants[1]):
        assert torch.equal(model.transformer.ln_f.weight, head)
    assert torch.equal(model.transformer.ln_f.weight, before)


def test_output_space_checks_on_the_real_shapes(gpt2_model, gpt2_adapters):
    model, tokenizer = gpt2_model
    checks = {c.name: c for c in output_space_checks(model, tokenizer, TEXTS[0], gpt2_adapters)}
    assert all(c.passed for c in checks.values())
    assert checks["permutation"].max_abs_diff < checks["permutation"].tolerance
    assert checks["permutation_a_only"].max_abs_diff > 100 * checks["permutation_a_only"].tolerance


def test_tinyllama_shaped_adapters_on_a_reduced_llama(tmp_path):
    from transformers import LlamaConfig

    from lego_viz.zoo.tokenizer import build_tokenizer

    fixture = json.loads((real_lora("tinyllama_r4_arona_a") / "adapter_config.json").read_text())
    # Reduced TinyLlama: 2 layers, hidden 64, 8 heads with 2 key/value heads (TinyLlama: 22, 2048, 32 and 4), so
    # v_proj is 64 → 16 as TinyLlama's is 2048 → 256 (GQA). The adapters are synthetic with the fixture's r, alpha, targets.
    config = LlamaConfig(vocab_size=len(build_tokenizer()), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    base = save_random_base(config, tmp_path / "tinyllama")
    shapes = {f"model.layers.{i}.self_attn.{t}": (64, 64 if t == "q_proj" else 16) for i in range(2) for t in fixture["target_modules"]}
    adapters = [make_adapter(n, r=fixture["r"], alpha=fixture["lora_alpha"], seed=s, shapes=shapes, base=fixture["base_model_name_or_path"])
                for s, n in enumerate(("arona_a", "arona_b"))]
    model, tokenizer = load_base(resolve_base(str(base), adapters))
    report = output_retention(model, tokenizer, TEXTS, adapters, {"linear": merge(adapters, "linear").modules})
    assert all(report.kl_to_base[a.name] > 0.0 for a in adapters)
    assert all(c.passed for c in output_space_checks(model, tokenizer, TEXTS[0], adapters))


@pytest.mark.parametrize(("content", "kind", "expected"), [
    ("one\n\n two \n", "txt", ["one", "two"]),
    ('"a"\n{"text": "b"}\n{"prompt": "c", "id": 3}\n', "jsonl", ["a", "b", "c"]),
])
def test_parse_texts(content, kind, expected):
    assert parse_texts(content, kind)[0] == expected


@pytest.mark.parametrize(("content", "kind", "message"), [
    ("", "txt", "no text given"), ("{oops\n", "jsonl", "line 1 is not valid JSON"), ('{"id": 1}\n', "jsonl", "line 1 has no text"),
])
def test_parse_texts_refusals(content, kind, message):
    with pytest.raises(TextError, match=message):
        parse_texts(content, kind)


def test_parse_texts_keeps_the_first_max_texts():
    texts, notes = parse_texts("\n".join(f"t{i}" for i in range(10)), max_texts=4)
    assert texts == ["t0", "t1", "t2", "t3"] and notes == ["used the first 4 of 10 texts."]


# ----------------------------------------------------------------------------- CLI


def test_cli_run_prints_the_retention_table(gpt2_base, gpt2_adapters, gpt2_model, tmp_path, capsys):
    from lego_viz.cli.run import print_report

    merged = merge(gpt2_adapters, "lego", k=8)
    out = export_adapter(merged, tmp_path / "merged", adapters=gpt2_adapters)
    text = tmp_path / "texts.jsonl"
    text.write_text(json.dumps({"text": TEXTS[0]}))
    adapters = [str(real_lora(n)) for n in GPT2_ADAPTERS]
    assert main(["run", *adapters, "--merged", str(out), "--base", str(gpt2_base), "--text", str(text), "--json", "--checks"]) == 0
    payload = json.loads(capsys.readouterr().out)
    label = "merge · lego k=8"
    model, tokenizer = gpt2_model
    expected = output_retention(model, tokenizer, TEXTS[:1], gpt2_adapters, {label: merged.modules}).to_dict()
    assert payload["retention"]["merges"] == [label]
    for row, want in zip(payload["retention"]["rows"], expected["rows"]):
        assert row["adapter"] == want["adapter"] and row["kl_to_merge"] == pytest.approx(want["kl_to_merge"], rel=1e-4)
    assert [c["passed"] for c in payload["checks"]] == [True, True, True]
    print_report(payload)  # what the command prints without --json
    table = capsys.readouterr().out
    assert "KL(t‖merge)" in table and "gpt2_causal_jasencarroll" in table and "n/a" in table


def test_cli_run_refusals_are_one_line(gpt2_adapters, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    adapter = str(real_lora(GPT2_ADAPTERS[1]))
    assert main(["run", adapter, "--merged", adapter, "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'gpt2' is not in the Hugging Face cache" in err


# ----------------------------------------------------------------------------- the app


@pytest.fixture
def real_session(gpt2_adapters, monkeypatch) -> Session:
    """The user's three gpt2 adapters, loaded from their folders through the load tab."""
    from lego_viz.ui.load_tab import load_sources

    monkeypatch.setenv("LEGO_VIZ_ALLOWED_ROOTS", os.pathsep.join([str(REAL_LORAS), tempfile.gettempdir()]))
    paths = "\n".join(str(real_lora(n)) for n in GPT2_ADAPTERS)
    return load_sources(Session(), None, paths, replace=True, public=False)[0]


def test_app_merges_real_adapters_and_shows_what_the_merge_keeps(hf_cache, real_session, tmp_path, monkeypatch):
    from lego_viz.ui import real_run

    monkeypatch.setattr(real_run, "OUTPUT_TOKENS", 2)  # the outputs' length is not what is tested here
    load, outputs, retention, checks = real_run.handlers(public=False)
    status = load(real_session, "")  # empty: the adapters' own base, found in the cache
    assert "Loaded **gpt2 (gpt2, 29.7 M parameters, from the Hugging Face cache)** on cpu, float32" in status
    assert "score.weight [6, 768] not used" in status and "merges hold LoRA units only" in status
    upload = tmp_path / "mine.txt"
    upload.write_text("\n".join(TEXTS))
    rows, figure, notes = retention(real_session, "", "ignored when a file is given", str(upload), ["lego", "linear"])
    assert [(r[0], r[1]) for r in rows] == [(m, a) for m in ("lego k=8", "linear") for a in GPT2_ADAPTERS]
    assert all(r[4].endswith("%") or r[4] == "n/a" for r in rows)
    assert [trace.name for trace in figure.data] == ["lego k=8", "linear"] and list(figure.data[0].x) == list(GPT2_ADAPTERS)
    assert "2 texts" in notes and "Log-likelihood per token: base" in notes
    assert [r[0] for r in outputs(real_session, "", "hi")] == ["base", *GPT2_ADAPTERS, "lego k=8"]
    assert [r[4] for r in checks(real_session, "", "hello", None)] == ["PASS", "BREAKS, as it should", "PASS"]
    source, _ = real_run.resolve_for(list(real_session.adapters), "", public=False)
    assert real_run.base_pool(source).created == 1  # loaded once, shared by every call


def test_app_refuses_local_bases_in_public_mode_and_reports_bad_text(real_session, gpt2_base, hf_cache):
    from lego_viz.ui import real_run

    load, _, retention, _ = real_run.handlers(public=True)
    with pytest.raises(gr.Error, match="local folders are refused on this public app"):
        load(real_session, str(gpt2_base))
    with pytest.raises(gr.Error, match="not in this app's list of base models"):
        load(real_session, "")
    _, _, retention, _ = real_run.handlers(public=False)
    with pytest.raises(gr.Error, match="no text given"):
        retention(real_session, "", "  \n", None, ["lego"])
