"""``run`` and the real-base panel against hostile bases and texts (issue 26, item 8): the size guard
cannot be switched off and decides from the config's numbers before building anything, no repository
code is ever run, and texts are read from regular files only, up to a byte cap."""

import json
import os
import pickle
import threading
from pathlib import Path

import pytest
from conftest import make_adapter, save_peft_folder

import lego_viz.models.base as base_mod
from lego_viz.cli.commands import main
from lego_viz.models.base import BaseModelError, BaseSource, load_base, max_parameters, resolve_base
from lego_viz.models.compare import TextError, read_texts


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_size_limit_must_be_finite_and_positive(value, monkeypatch):
    with pytest.raises(BaseModelError, match="finite positive number"):
        max_parameters("cpu", float(value))
    monkeypatch.setenv(base_mod.MAX_PARAMS_ENV, value)
    with pytest.raises(BaseModelError, match="LEGO_VIZ_MAX_BASE_PARAMS.*finite positive number"):
        max_parameters("cpu")


def _config_folder(tmp: Path, **config) -> Path:
    folder = tmp / "base"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 1, "vocab_size": 10, **config}))
    return folder


def _never_built(*args, **kwargs):
    raise AssertionError("the model was built before the config's numbers were checked")


@pytest.mark.parametrize("config, message", [
    ({"n_layer": 100_000, "n_embd": 8}, "describes 100,000 layers"),
    ({"n_layer": 100, "n_embd": 65_536}, r"has at least 858\.99 B parameters, above the limit"),
    ({"n_layer": 10**40, "n_embd": 8}, "n_layer=.* is not a plausible size"),
], ids=["deep", "wide", "huge-int"])
def test_size_guard_decides_from_the_config_numbers_first(config, message, tmp_path, monkeypatch):
    monkeypatch.delenv(base_mod.MAX_PARAMS_ENV, raising=False)
    monkeypatch.setattr(base_mod, "count_parameters", _never_built)
    with pytest.raises(BaseModelError, match=message):
        resolve_base(str(_config_folder(tmp_path, **config)))


_EVIL_CONFIG = """
from pathlib import Path
Path(__file__).resolve().parent.joinpath("{marker}").write_text("ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil_custom"
"""


def test_repository_code_is_never_offered_or_run(tmp_path, monkeypatch):
    folder = _config_folder(tmp_path, model_type="evil_custom", n_layer=2, n_embd=8,
                            auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                      "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    marker = tmp_path / "ran"
    (folder / "configuration_evil.py").write_text(_EVIL_CONFIG.format(marker=marker))
    asked = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "y")  # a user who answers yes
    with pytest.raises(BaseModelError, match="config.json cannot be read as a transformers config"):
        resolve_base(str(folder))
    assert not asked and not marker.exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickled_base_that_is_not_weights_is_one_message(tmp_path):
    from transformers import GPT2Config

    from lego_viz.zoo.tokenizer import build_tokenizer

    folder = tmp_path / "pickled"
    GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=64, n_positions=16).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"transformer.wte.weight": _Payload()}, handle)
    source = BaseSource("pickled", folder, "local folder", 1000, "gpt2")
    with pytest.raises(BaseModelError, match=r"pickled: its weights in .* cannot be loaded .*safetensors") as info:
        load_base(source)
    assert "\n" not in str(info.value)


def _fifo(tmp: Path) -> Path:
    path = tmp / "texts.txt"
    os.mkfifo(path)
    return path


def _dev_zero(tmp: Path) -> Path:
    path = tmp / "texts.txt"
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("build", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_texts_come_from_regular_files_only(build, tmp_path):
    path = build(tmp_path)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error(lambda: read_texts(path))), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive() and path.is_fifo():  # the old reader waits for a writer: give it one, so the thread ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "texts.txt is not a regular file" in outcome[0], outcome


def _error(call) -> str:
    try:
        call()
    except TextError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("extra, message", [
    (["--max-params", "nan"], "--max-params='nan': the size limit must be a finite positive number"),
    (["--base", "DEEP"], "describes 100,000 layers"),
], ids=["max-params-nan", "deep-config"])
def test_run_command_exits_2_with_one_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(base_mod, "count_parameters", _never_built)
    adapter = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    merged = save_peft_folder(make_adapter("m", seed=2), tmp_path / "m")
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n")
    deep = _config_folder(tmp_path, n_layer=100_000, n_embd=8)
    extra = [str(deep) if word == "DEEP" else word for word in extra]
    if "--base" not in extra:
        extra += ["--base", str(_config_folder(tmp_path / "small", n_layer=2, n_embd=8))]
    code = main(["run", str(adapter), "--merged", str(merged), "--text", str(texts), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err, err


@pytest.mark.parametrize("build", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_merged_folder_report_is_read_from_a_regular_file_only(build, tmp_path):
    from lego_viz.cli.run import _merge_label

    merged = tmp_path / "merged"
    merged.mkdir()
    build(tmp_path).rename(merged / "merge_report.json")  # a FIFO, or a link to /dev/zero, in the report's place
    labels = []
    reader = threading.Thread(target=lambda: labels.append(_merge_label(merged)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive() and (merged / "merge_report.json").is_fifo():  # the old reader waits for a writer
        os.close(os.open(merged / "merge_report.json", os.O_WRONLY | os.O_NONBLOCK))
    assert labels == ["merge · merged"]
