"""mergekit-style configs (`merge --config`): the shape users write, the recipe as one, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import make_adapter, save_peft_folder
from safetensors.torch import load_file

from lego_viz.adapters import load_adapters
from lego_viz.cli.commands import main
from lego_viz.merge import merge


@pytest.fixture
def dirs(tmp_path) -> list[str]:
    return [str(save_peft_folder(make_adapter(n, r=r, seed=s), tmp_path / n)) for n, r, s in (("a", 4, 1), ("b", 4, 2))]


def _run_config(tmp_path, config: dict, out: str = "o") -> dict[str, torch.Tensor]:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["merge", "--config", str(path), "--no-checks", "--out", str(tmp_path / out)]) == 0
    return load_file(str(tmp_path / out / "adapter_model.safetensors"))


def _assert_saved_equals(saved: dict[str, torch.Tensor], merged, dtype=torch.float32):
    for name, lora in merged.modules.items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], lora.A.to(dtype)), name
        assert torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], lora.B.to(dtype)), name


def test_mergekit_shaped_config_runs_the_merge_it_describes(tmp_path, dirs):
    config = {
        "base_model": "toy/llama",
        "models": [{"model": dirs[0], "parameters": {"weight": 1.0}}, {"model": dirs[1], "parameters": {"weight": 0.5}}],
        "merge_method": "lego",
        "parameters": {"k": 3, "seed": 2, "features": "raw"},
        "dtype": "bfloat16",
    }
    saved = _run_config(tmp_path, config)
    expected = merge(load_adapters(dirs), "lego", k=3, weights=[1.0, 0.5], seed=2, features="raw")
    _assert_saved_equals(saved, expected, torch.bfloat16)


@pytest.mark.parametrize("method, params, per_model, library", [
    ("task_arithmetic", {}, {}, ("linear", {}, [1.0, -0.5])),  # mergekit's name for the exact weighted sum
    ("linear", {"normalize": True}, {}, ("linear", {}, [1 / 0.5, -0.5 / 0.5])),  # mergekit linear's default
    ("ties", {}, {"density": 0.3}, ("ties", {"density": 0.3}, [1.0, -0.5])),  # mergekit's per-model density, if equal
])
def test_mergekit_method_names_and_parameters(tmp_path, dirs, method, params, per_model, library):
    weights = [1.0, -0.5]
    config = {"merge_method": method, "parameters": params,
              "models": [{"model": d, "parameters": {"weight": w, **per_model}} for d, w in zip(dirs, weights)]}
    lib_method, lib_options, lib_weights = library
    _assert_saved_equals(_run_config(tmp_path, config), merge(load_adapters(dirs), lib_method, weights=lib_weights, **lib_options))


def test_recipe_is_a_config_and_reproduces_the_weights(tmp_path, dirs):
    assert main(["merge", *dirs, "--k", "q_proj=2,*=5", "--weights", "1,-0.5",
                 "--features", "normalized", "--seed", "3", "--dtype", "bf16", "--no-checks", "--out", str(tmp_path / "one")]) == 0
    recipe = yaml.safe_load((tmp_path / "one" / "recipe.yaml").read_text())
    assert {"merge_method", "models", "parameters", "dtype"} <= set(recipe)
    assert recipe["models"][1] == {**recipe["models"][1], "model": dirs[1], "parameters": {"weight": -0.5}}
    second = _run_config(tmp_path, recipe, out="two")
    first = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert {t.dtype for t in second.values()} == {torch.bfloat16}


def test_recipe_written_before_configs_still_runs(tmp_path, dirs):
    old = {"lego_viz_recipe": 1, "adapters": [{"path": d, "name": n} for d, n in zip(dirs, "ab")],
           "weights": [1.0, 2.0], "method": "svd", "k": 3, "options": {}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    assert main(["merge", "--recipe", str(tmp_path / "recipe.yaml"), "--no-checks", "--out", str(tmp_path / "o")]) == 0
    _assert_saved_equals(load_file(str(tmp_path / "o" / "adapter_model.safetensors")),
                         merge(load_adapters(dirs), "svd", k=3, weights=[1.0, 2.0]))


BAD = [
    ({"slices": []}, "unknown key(s) slices in config"),
    ({"tokenizer_source": "base"}, "valid keys: merge_method, models, parameters, base_model, dtype"),
    ({"merge_method": None}, "names no merge method: add e.g. 'merge_method: lego'"),
    ({"models": []}, "needs 'models:', a non-empty list"),
    ({"models": ["a"]}, "models[0] needs 'model: PATH_OR_HUB_ID'"),
    ({"models": [{"model": "{a}", "lora": "x"}]}, "unknown key(s) lora in config"),
    ({"models": [{"model": "{a}", "parameters": {"epsilon": 0.1}}]}, "valid keys: weight, density"),
    ({"models": [{"model": "{a}", "parameters": {"weight": [0.5, 1.0]}}]}, "per-layer lists or gradients are not supported"),
    ({"models": [{"model": "{a}", "parameters": {"density": 0.2}}, {"model": "{b}", "parameters": {"density": 0.4}}]},
     "density differs between models"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of fp32, float32, bf16"),
    ({"parameters": {"k": 2, "gamma": 1}}, "unknown option(s) gamma for method 'lego'; valid options:"),
    ({"parameters": {"k": "eight"}}, "parameters.k must be a whole number"),
    ({"base_model": "meta-llama/Llama-3-8B"}, "base_model is 'meta-llama/Llama-3-8B' but adapter 'a' was trained on 'toy/llama'"),
    ({"max_rank": 2, "parameters": {"k": 3}}, "exceed max rank 2"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_config_is_one_line_naming_the_valid_choices(tmp_path, dirs, capsys, change, message):
    config = {"merge_method": "lego", "models": [{"model": "{a}"}, {"model": "{b}"}], **change}
    text = yaml.safe_dump(config).replace("'{a}'", dirs[0]).replace("'{b}'", dirs[1])
    (tmp_path / "bad.yaml").write_text(text)
    assert main(["merge", "--config", str(tmp_path / "bad.yaml"), "--no-checks", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_config_and_command_line_settings_do_not_mix(tmp_path, dirs, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": d} for d in dirs]}))
    assert main(["merge", "--config", str(tmp_path / "c.yaml"), "--k", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--config takes the merge settings from the config; drop --k" in capsys.readouterr().err
    assert main(["merge", dirs[0], "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "give either adapters or --config" in capsys.readouterr().err


def test_readme_example_config_is_valid(monkeypatch):
    from pathlib import Path

    from lego_viz.export.recipe import load_config, load_models

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # its paths are relative to the repository root, where the README runs it
    config = load_config("examples/merge.yaml")
    assert config.method == "lego" and config.k == 8 and config.weights == [1.0, 0.5] and config.dtype == "bfloat16"
    adapters, notes = load_models(config)
    assert [a.name for a in adapters] == ["reverse", "sort"] and notes == []
