"""The CLI forms of issue 3, run as a user would: a subprocess, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest
from conftest import make_adapter, real_lora, save_peft_folder

from lego_viz.cli.commands import main


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "lego_viz", *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def gpt2_group():
    return [real_lora(n) for n in ("gpt2_seqcls_stathopoan", "gpt2_causal_jasencarroll", "gpt2_r16_bin_yijundeng")]


def test_inspect_real_adapters(gpt2_group):
    code, out, err = run("inspect", *gpt2_group, real_lora("pythia70m_r32_bin_kimiko"))
    assert code == 0, err
    assert "r         16   lora_alpha 32   scale 2.0   fan_in_fan_out" in out
    assert "MSUs      192" in out and "EleutherAI/pythia-70m-deduped" in out


def test_check_json_on_real_adapters(gpt2_group):
    code, out, err = run("check", *gpt2_group, "--json")
    assert code == 0, err
    payload = json.loads(out)
    for key in ("permutation", "concat_sum"):
        assert payload[key]["passed"] is True and payload[key]["max_rel_error"] < 1e-5


def test_merge_and_recipe_on_real_adapters(gpt2_group, tmp_path):
    code, out, err = run("merge", *gpt2_group, "--method", "lego", "--k", "8", "--weights", "1,0.5,1", "--features", "canonical",
                         "--param-reweight", "linf", "--no-output-reweight", "--seed", "0", "--out", tmp_path / "m")
    assert code == 0, err
    assert "rank 8 over 12 modules" in out
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["invariance"]["permutation"]["passed"] and report["options"]["param_reweight"] == "linf"
    code, out, err = run("merge", "--recipe", tmp_path / "m" / "recipe.yaml", "--out", tmp_path / "m2")
    assert code == 0, err
    assert (tmp_path / "m2" / "adapter_model.safetensors").read_bytes() == (tmp_path / "m" / "adapter_model.safetensors").read_bytes()


def test_cli_svd_and_linear(tmp_path):
    dirs = [save_peft_folder(make_adapter(n, seed=i), tmp_path / n) for i, n in enumerate("ab")]
    for method, extra in (("svd", ["--k", "3"]), ("linear", []), ("ties", ["--density", "0.5"])):
        code, _, err = run("merge", *dirs, "--method", method, *extra, "--out", tmp_path / method)
        assert code == 0, err


@pytest.mark.parametrize("args,message", [
    (["inspect", "/no/such/adapter"], "no such file or folder"),
    (["merge", "{a}", "--k", "999", "--out", "{tmp}/o"], "k=999 is out of range"),
    (["merge", "{a}", "--k", "q_prj=2,*=3", "--out", "{tmp}/o"], "k pattern 'q_prj' matches no module"),
    (["merge", "{a}", "--k", "q(=2", "--out", "{tmp}/o"], "not a valid regular expression"),
    (["merge", "{a}", "--method", "magic", "--out", "{tmp}/o"], "unknown merge method 'magic'; valid methods:"),
    (["merge", "{a}", "--weights", "1,x", "--out", "{tmp}/o"], "expected comma-separated numbers"),
    (["merge", "{a}", "{gpt}", "--out", "{tmp}/o"], "different base models"),
    (["merge", "{a}", "--out", "{tmp}/full"], "not empty"),
    (["merge", "--recipe", "{tmp}/missing.yaml", "--out", "{tmp}/o"], "recipe .* does not exist"),
    (["merge", "--recipe", "{tmp}/missing.yaml", "--k", "4", "--weights", "1", "--out", "{tmp}/o"],
     "--recipe takes the merge settings from the recipe; drop --k, --weights"),
    (["merge", "--recipe", "{tmp}/missing.yaml", "--method", "svd", "--out", "{tmp}/o"], "drop --method"),
    (["merge", "{a}"], "the following arguments are required: --out"),
    (["frobnicate"], "invalid choice"),
    (["inspect", "{tmp}/badcfg"], "peft_type is 'IA3'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    a = save_peft_folder(make_adapter("a"), tmp_path / "a")
    gpt = save_peft_folder(make_adapter("g", base="gpt2"), tmp_path / "g")
    bad = make_adapter("bad")
    bad.config = {**bad.config, "peft_type": "IA3"}
    save_peft_folder(bad, tmp_path / "badcfg")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    filled = [s.format(a=a, gpt=gpt, tmp=tmp_path) for s in args]
    # in-process (the subprocess path is covered above and by the last test): same main(), same stderr
    code = main(filled)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(message, lines[0]), lines[0]


def test_bad_input_through_a_real_process_has_no_traceback():
    code, _, err = run("merge", "/no/such/adapter", "--out", "/tmp/never-written")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--weights", "--weights="])
def test_negative_weights_need_no_equals_sign(tmp_path, flag):
    dirs = [save_peft_folder(make_adapter(n, seed=i), tmp_path / n) for i, n in enumerate("ab")]
    weights = [flag + "-1,0.5"] if flag.endswith("=") else [flag, "-1,0.5"]
    assert main(["merge", *map(str, dirs), "--method", "linear", *weights, "--no-checks", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["weights"] == [-1.0, 0.5]
    assert main(["check", *map(str, dirs), "--weights", "-0.5,2", "--json"]) == 0


@pytest.mark.parametrize(("cores", "threads", "expected"), [(2, 2, 1), (1, 1, 1), (16, 16, 14), (16, 4, 4)])
def test_merge_leaves_cores_to_its_reader_and_hashes(monkeypatch, cores, threads, expected):
    # On 2 cores, torch's second thread beside the reader and the hashes made the command slower (7.5 s
    # against 5.5 s at the reference shape); it never asks for more threads than torch had.
    import torch

    from lego_viz.cli import commands as cli

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        cli._leave_cores_for_helpers()
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)


def test_a_k_pattern_may_hold_commas(tmp_path):
    """A per-module --k splits at the comma after each number only, so a regex quantifier like {1,2} is
    one name (it was cut in two, and the merge refused a pattern that was never written)."""
    from lego_viz.cli.commands import _k_value

    assert _k_value(r"self_attn\.(q|v)_pro{1,2}j=2,*=3") == {r"self_attn\.(q|v)_pro{1,2}j": 2, "*": 3}
    assert _k_value(" q_proj = 8 ,, v_proj=4 ,") == {"q_proj": 8, "v_proj": 4}
    assert _k_value("(?=q)q_proj=2") == {"(?=q)q_proj": 2}  # an equals sign stays in the name too (refused later, as RE2 has no lookaround)
    dirs = [save_peft_folder(make_adapter(n, seed=i), tmp_path / n) for i, n in enumerate("ab")]
    assert main(["merge", *map(str, dirs), "--method", "svd", "--k", r"(q|v)_pro{1,2}j=2,*=3",
                 "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    ranks = set(config.get("rank_pattern", {}).values()) | {config["r"]}
    assert ranks == {2, 3}, config
