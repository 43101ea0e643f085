"""`python -m lego_viz smora-eval` / `smora-train`: JSON out on success, exit code 2 and one line on bad input."""

from __future__ import annotations

import json

import pytest
from test_smora_app import tiny_assets  # noqa: F401  (fixture: tiny zoo base + SMoRA adapters)

from lego_viz.cli.commands import main


def test_smora_eval_prints_accuracy_and_balance(tiny_assets, capsys) -> None:  # noqa: F811
    code = main(["smora-eval", str(tiny_assets / "smora" / "multitask"), "--zoo", str(tiny_assets),
                 "--tasks", "reverse,sort", "--n", "3", "--device", "cpu"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["r"], result["k"]) == (8, 2)
    assert set(result["accuracy"]) == {"reverse", "sort", "mean"}
    assert 1.0 <= result["load_balance_eval"] <= 8 / 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["smora-eval", "/nonexistent/smora"], "not a SMoRA adapter folder"),
        (["smora-eval", "{multitask}", "--tasks", "reverse,nope"], "unknown zoo task"),
        (["smora-eval", "{multitask}", "--n", "0"], "--n must be"),
        (["smora-train", "--k", "64"], "k must be in"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_assets, capsys, argv: list[str], message: str) -> None:  # noqa: F811
    argv = [a.replace("{multitask}", str(tiny_assets / "smora" / "multitask")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
