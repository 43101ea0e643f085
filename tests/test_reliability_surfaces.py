"""Hostile inputs on the newer surfaces (issue 26, part A): attacks that need more than one error line
to describe, beside the corpus in bad_inputs.py."""

import subprocess
import sys
import textwrap

import torch
from conftest import make_adapter, save_peft_folder


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
