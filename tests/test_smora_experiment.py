"""The zoo experiment end to end on a tiny random zoo: every run happens, results and tables are complete."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from test_smora_app import tiny_zoo_base

from lego_viz.cli.commands import main
from lego_viz.smora import read_smora_config
from lego_viz.smora.experiment import ExperimentConfig, run_experiment
from lego_viz.smora.report import results_markdown
from lego_viz.zoo.tasks import TASKS
from lego_viz.zoo.train import lora_config

TINY = {"r": 4, "k": 2, "steps": 3, "router_steps": 2, "router_k": 4, "eval_n": 2, "batch_size": 4}


@pytest.fixture(autouse=True)
def one_thread():
    # many tiny ops: on a busy 2-core machine one thread is several times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    for i, task in enumerate(TASKS):
        torch.manual_seed(i)
        peft_model = get_peft_model(tiny_zoo_base(zoo), lora_config(2))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        peft_model.save_pretrained(zoo / "adapters" / task)
    return zoo


@pytest.mark.slow
def test_experiment_runs_everything_and_saves_both_adapters(tiny_zoo, tmp_path) -> None:
    lines: list[str] = []
    results = run_experiment(ExperimentConfig(**TINY), zoo_dir=tiny_zoo, out_dir=tmp_path, device="cpu",
                             progress=False, log=lines.append)
    runs = results["runs"]
    expected = {"base", "smora", "smora_no_balance", "lora_r", "lora_k", "merged_router", "merged_router_balanced",
                "linear", "svd", "lego", "own_adapter"}
    assert set(runs) == expected and len(lines) == len(expected) - 1  # own adapters are not logged
    for run in runs.values():
        assert set(run["accuracy"]) == {*TASKS, "mean"} and all(0 <= v <= 1 for v in run["accuracy"].values())
    assert len(runs["smora"]["load_balance"]) == TINY["steps"] and len(runs["merged_router"]["load_balance"]) == TINY["router_steps"]
    assert runs["smora"]["gamma"] > 0 and runs["smora_no_balance"]["gamma"] == 0
    assert runs["merged_router_balanced"]["gamma"] > 0 and runs["merged_router"]["gamma"] == 0
    assert runs["merged_router"]["units"] == 2 * len(TASKS)
    assert runs["svd"]["rank"] == runs["lego"]["rank"] == TINY["router_k"] and runs["linear"]["rank"] == 2 * len(TASKS)
    assert results["settings"]["smora"]["r"] == TINY["r"] and results["settings"]["gamma"] == ExperimentConfig().gamma
    json.dumps(results)  # JSON-able

    multitask, _ = read_smora_config(tmp_path / "multitask")
    router, extra = read_smora_config(tmp_path / "merged_router")
    assert (multitask.r, multitask.k) == (TINY["r"], TINY["k"])
    assert router.sources == tuple(TASKS) and not router.train_lora and extra["experiment"]["router_k"] == TINY["router_k"]

    markdown = results_markdown(results)
    assert markdown.count("\n| ") == (2 + 5) + (2 + 7)  # header, rule and rows of both tables
    assert all(task in markdown for task in TASKS)


@pytest.mark.slow
def test_cli_quick_run_writes_results(tiny_zoo, tmp_path, capsys) -> None:
    argv = ["smora-train", "--quick", "--r", "4", "--k", "2", "--router-k", "4", "--batch-size", "4",
            "--zoo", str(tiny_zoo), "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "RESULTS.md").read_text() in capsys.readouterr().out


@pytest.mark.slow
def test_composition_only_keeps_the_base_only_runs(tiny_zoo, tmp_path, capsys) -> None:
    argv = ["smora-train", "--quick", "--r", "4", "--k", "2", "--router-k", "4", "--batch-size", "4",
            "--zoo", str(tiny_zoo), "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "multitask" / "marker").write_text("kept")
    assert main([*argv, "--composition-only"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["settings"] == first["settings"]

    def untimed(runs):
        return {name: {k: v for k, v in run.items() if k != "train_seconds"} for name, run in runs.items()}

    # same seeds and settings: every run comes out as before, and multitask/ is not rewritten
    assert untimed(again["runs"]) == untimed(first["runs"]) and (tmp_path / "multitask" / "marker").is_file()
    # other settings than the earlier results: refused with the reason
    assert main([*argv, "--gamma", "0.01", "--composition-only"]) == 2
    assert "differ in gamma" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (" " * ((1 << 20) + 1), "larger than 1 MiB"),
    ('{"smora": [', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", 'no "smora" object'),
    ('{"smora": {"nonsense": 1}}', "unknown SMoRA config keys"),
])
def test_a_hostile_smora_config_is_one_message(tmp_path, capsys, content, message):
    """Oversized, broken or foreign smora_config.json files end in one line from the CLI (exit 2), never a
    traceback or a read of an unbounded file."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = folder / "smora_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        read_smora_config(folder)
    assert main(["smora-eval", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_composition_only_reads_previous_results_with_a_cap(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{" * 100_000)
    assert main(["smora-train", "--composition-only", "--out", str(tmp_path)]) == 2
    assert "results.json is not valid JSON" in capsys.readouterr().err
