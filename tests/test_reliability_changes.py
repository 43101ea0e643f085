"""Inputs that change while a merge reads them, and inputs too large to merge (issue 26, item 6).

A file truncated, replaced or rewritten mid-merge must end in one clear message (exit 2), never a
bus error and never an export whose recipe names other bytes than the ones merged.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter, save_peft_folder

import lego_viz.adapters.loading as loading
from lego_viz.cli.commands import main

ROOT = Path(__file__).resolve().parents[1]
Q = "base_model.model.model.layers.0.self_attn.q_proj"

# A hash whose first chunk truncates the file it is reading: with the file mapped into memory the
# next page read is a SIGBUS that kills the process with nothing on stderr.
_TRUNCATE_WHILE_HASHING = """
import hashlib, sys
from pathlib import Path
import lego_viz.adapters.loading as loading

path = Path(sys.argv[1])
checked = (loading.file_identity(path), "victim") if hasattr(loading, "file_identity") else ()

class Truncating:
    def __init__(self):
        self.inner, self.calls = hashlib.sha256(), 0
    def update(self, data):
        self.calls += 1
        if self.calls == 1:
            with open(path, "r+b") as handle:
                handle.truncate(0)
        self.inner.update(data)
    def hexdigest(self):
        return self.inner.hexdigest()

loading.hashlib = type("H", (), {"sha256": staticmethod(Truncating)})
try:
    loading.sha256_file(path, *checked)
except ValueError as exc:
    print(exc)
"""


def test_hash_of_a_file_truncated_meanwhile_is_a_message_not_a_bus_error(tmp_path):
    victim = tmp_path / "adapter_model.safetensors"
    with open(victim, "wb") as handle:  # sparse: 64 MiB on paper, nothing on disk
        handle.truncate(64 << 20)
    done = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_HASHING, str(victim)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.returncode, done.stderr[-400:])  # -7 is SIGBUS
    assert "victim: adapter_model.safetensors changed while it was being used" in done.stdout, done.stdout


def _replace_with_other(path: Path, other: Path) -> None:
    os.replace(other, path)  # atomically: the path now names another file (another inode)


def _write_nan_in_place(path: Path, other: Path) -> None:
    time.sleep(0.02)  # file times tick every few ms: let the write land on a later one, as any real one does
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    with open(path, "r+b") as handle:  # same file, same size: only the values change
        handle.seek(8 + length)
        handle.write(np.full(64, np.nan, dtype=np.float32).tobytes())


@pytest.mark.parametrize("tamper", [_replace_with_other, _write_nan_in_place], ids=["replaced", "nan-written"])
def test_merge_refuses_an_input_that_changes_mid_merge(tamper, tmp_path, monkeypatch, capsys):
    a = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    b = save_peft_folder(make_adapter("b", seed=2), tmp_path / "b")
    other = save_peft_folder(make_adapter("c", seed=3), tmp_path / "c") / "adapter_model.safetensors"
    original = loading.sha256_file

    def hash_after_tampering(path, *args, **kwargs):  # the change lands while the merge is under way
        if Path(path) == b / "adapter_model.safetensors" and other.exists():
            tamper(Path(path), other)
            other.unlink(missing_ok=True)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(loading, "sha256_file", hash_after_tampering)
    code = main(["merge", str(a), str(b), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: b: adapter_model.safetensors changed while it was being used"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["lego", "svd", "linear"])
def test_values_too_large_for_float32_are_named(method, tmp_path, capsys):
    good = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    big = make_adapter("big", seed=3)
    tensors = {f"base_model.model.{m}.lora_{side}.weight": getattr(lora, side) for m, lora in big.modules.items() for side in "AB"}
    tensors[f"{Q}.lora_A.weight"] = torch.full((4, 32), 3e38)  # finite, but its squares overflow
    save_peft_folder(big, tmp_path / "big", tensors=tensors)
    code = main(["merge", str(good), str(tmp_path / "big"), "--method", method, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"big: adapter_model.safetensors tensor {Q}.lora_A.weight holds values up to 3e+38, too large to merge in float32" in err, err
    assert not (tmp_path / "out").exists()


def test_export_names_nan_made_by_the_merge_not_an_overflow():
    from lego_viz.export.serving import ServingError, cast_factor

    with pytest.raises(ServingError, match="holds NaN/inf values .* before any cast"):
        cast_factor(np.full((2, 2), np.nan, dtype=np.float32), "float32", "q_proj.lora_A.weight")
    with pytest.raises(ServingError, match="overflows in float16"):  # a real overflow keeps its own message
        cast_factor(np.full((2, 2), 1e6, dtype=np.float32), "float16", "q_proj.lora_A.weight")


def test_recipe_hash_is_of_the_file_merged(tmp_path):
    a = save_peft_folder(make_adapter("a", seed=1), tmp_path / "a")
    b = save_peft_folder(make_adapter("b", seed=2), tmp_path / "b")
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    hashes = [entry.get("sha256") for entry in report["inputs"]]
    assert hashes == [loading.sha256_file(folder / "adapter_model.safetensors") for folder in (a, b)]


def test_adapters_read_whole_at_load_merge_after_their_files_are_gone(tmp_path):
    # the app unpacks uploads, loads them into memory and removes the files: its merges must not miss them
    import shutil

    from lego_viz.adapters import load_adapters
    from lego_viz.merge.stream import merge_streaming

    folders = [save_peft_folder(make_adapter(name, seed=seed), tmp_path / name) for name, seed in (("a", 1), ("b", 2))]
    adapters = load_adapters(folders)
    for folder in folders:
        shutil.rmtree(folder)
    result = merge_streaming(adapters, method="lego", k=4, checks=False)
    assert sorted(result.merged.ranks.values()) == [4] * len(result.merged.ranks)
