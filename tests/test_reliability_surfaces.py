"""Hostile inputs on the newer surfaces (issue 26, part A): attacks that need more than one error line
to describe, beside the corpus in bad_inputs.py."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_adapter, save_peft_folder

from lego_viz.cli.commands import main


def test_backtracking_patterns_match_in_linear_time(tmp_path):
    # The attack: on Python's re, (a|a)*c against 32 a's backtracks 2^32 times holding the GIL
    # (the public app froze). A child process, so that the old behaviour fails the test instead of hanging it.
    adapter = make_adapter("x")
    name = "a" * 32
    tensors = {f"base_model.model.{name}.lora_A.weight": torch.randn(4, 32),
               f"base_model.model.{name}.lora_B.weight": torch.randn(32, 4)}
    folder = save_peft_folder(adapter, tmp_path / "x", tensors=tensors,
                              config={**adapter.config, "rank_pattern": {"(a|a)*c": 2}})
    script = textwrap.dedent(f"""
        from lego_viz.adapters import load_adapter
        from lego_viz.merge import MergeError, resolve_k
        adapter = load_adapter({str(folder)!r})
        try:
            resolve_k([adapter], {{"(.|.)*Z": 2}})
        except MergeError as exc:
            print(adapter.modules[{name!r}].r, exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r, message = done.stdout.split(" ", 1)
    assert r == "4"  # the pattern matches no module: the config's r
    assert message.startswith("k pattern '(.|.)*Z' matches no module")


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["foreign", "input", "inside-input", "holds-input"])
def test_force_never_replaces_what_an_export_did_not_write(where, tmp_path, capsys):
    # --force on a project folder deleted src/main.py; on an input's own folder it replaced the input
    work = tmp_path / "work"
    a = save_peft_folder(make_adapter("a", seed=1), work / "a")
    b = save_peft_folder(make_adapter("b", seed=2), tmp_path / "b")
    (tmp_path / "project" / "src").mkdir(parents=True)
    (tmp_path / "project" / "src" / "main.py").write_text("print('mine')\n")
    out = {"foreign": tmp_path / "project", "input": a, "inside-input": a / "merged", "holds-input": work}[where]
    before = _tree(tmp_path)
    code = main(["merge", str(a), str(b), "--method", "linear", "--out", str(out), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    expected = "not a folder an export wrote" if where == "foreign" else "input adapter 'a'"
    assert expected in err[0], err[0]
    assert _tree(tmp_path) == before  # nothing replaced, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "project", "work"]


def test_force_replaces_an_earlier_export(tmp_path, capsys):
    a = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    out = tmp_path / "out"
    assert main(["merge", str(a), "--method", "linear", "--out", str(out)]) == 0
    assert main(["merge", str(a), "--method", "svd", "--k", "2", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "merge_report.json").read_text())["method"] == "svd"


def test_sigterm_during_export_leaves_no_temp_folder(tmp_path):
    # SIGTERM arrives once the export's files are written to its temporary folder, before the rename
    a = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import lego_viz.export.folder as folder
        from lego_viz.cli.commands import run

        write = folder._write
        def write_then_terminate(*args):
            write(*args)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the signal ends the command before this
        folder._write = write_then_terminate
        sys.argv = ["lego_viz", "merge", {str(a)!r}, "--method", "linear", "--out", {str(out)!r}]
        run()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no out, no .out.tmp-*


def test_the_same_adapter_twice_is_noted(tmp_path, capsys):
    a = save_peft_folder(make_adapter("reverse", seed=1), tmp_path / "reverse")
    assert main(["merge", str(a), f"{a}/", "--method", "linear", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "note: reverse_2 is the same adapter as reverse" in out, out


def test_the_same_adapter_twice_is_a_warning_in_the_app(tmp_path, monkeypatch):
    from lego_viz.ui import load_tab
    from lego_viz.ui.state import Session

    shown = []
    monkeypatch.setattr(load_tab.gr, "Warning", shown.append)
    a = save_peft_folder(make_adapter("reverse", seed=1), tmp_path / "reverse")
    session = load_tab.load_handler(False)(Session(), None, str(a), False)[0]
    session = load_tab.load_handler(False)(session, None, f"{a}/", False)[0]  # added in a second load
    assert [x.name for x in session.adapters] == ["reverse", "reverse_2"]
    assert any(m.startswith("reverse_2 is the same adapter as reverse") for m in shown), shown


@pytest.mark.parametrize(("patterns", "seconds", "message"), [
    ({"q" * 1001: 2}, 5.0, "longer than 1000 characters"),
    ({r"(q)\1": 2}, 5.0, "not a valid regular expression here"),
    ({"q_proj": 2}, -1.0, "took over -1 s"),  # the table's time is spent: every further lookup refused
])
def test_pattern_tables_are_bounded(patterns, seconds, message):
    from lego_viz.adapters import AdapterError
    from lego_viz.adapters.patterns import PatternTable

    with pytest.raises(AdapterError, match=message):
        PatternTable(patterns, "rank_pattern key", seconds=seconds).value("model.layers.0.self_attn.q_proj", 8)


def test_an_early_error_is_one_line_with_the_first_pass_forked(tmp_path):
    # lego's first pass runs in a forked process that multiprocessing ends with SIGTERM when the command
    # leaves early; it inherited the command's SIGTERM handler and printed a KeyboardInterrupt traceback
    a = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    b = save_peft_folder(make_adapter("b", seed=2), tmp_path / "b")
    done = subprocess.run([sys.executable, "-m", "lego_viz", "merge", str(a), str(b), "--option", "checks=false",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --option: unknown option(s) checks for method 'lego'; valid options: features, param_reweight, "
        "output_reweight, rescale, seed, n_init, max_iter, tol, device, preset."]


def test_peft_gets_no_regex_from_a_file(tmp_path):
    # zoo-eval loads through PeftModel.from_pretrained, whose own rank_pattern lookup is Python's re:
    # (.|.|.)*Z backtracks 3^n on each module name there. PEFT now gets the keys resolved to names.
    import shutil

    from lego_viz.zoo.model import adapter_dirs

    folder = tmp_path / "caesar"
    shutil.copytree(adapter_dirs()["caesar"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(.|.|.)*Z": 2}  # matches no module: r stays 8
    config["alpha_pattern"] = {r"layers\.0\.self_attn\.(q|v)_proj": 32}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    script = textwrap.dedent(f"""
        from lego_viz.zoo.model import load_adapted
        model, _ = load_adapted({str(folder)!r}, device="cpu")
        layers = model.base_model.model.model.layers
        print(layers[0].self_attn.q_proj.scaling["default"], layers[0].self_attn.k_proj.scaling["default"],
              layers[1].self_attn.v_proj.scaling["default"], layers[0].self_attn.q_proj.r["default"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4.0", "2.0", "2.0", "8"]  # alpha 32 / r 8 on layer 0's q_proj only
