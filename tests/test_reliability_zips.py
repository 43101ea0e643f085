"""Zip files (issue 26, item 9): nothing left in the temp folder, counts and sizes checked before
anything is unpacked, and bounded memory per session and per app."""

import gc
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from bad_inputs import BOMB_CAP, _lying_zip
from conftest import make_adapter, save_peft_folder

import lego_viz.adapters.loading as loading
from lego_viz.ui import load_tab, runtime
from lego_viz.ui.load_tab import load_handler
from lego_viz.ui.state import Session

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def small_unzip_cap(monkeypatch):
    monkeypatch.setattr(loading, "MAX_UNZIPPED_BYTES", BOMB_CAP)


def _adapter_zip(tmp: Path, name: str, seed: int = 0, padding: int = 0) -> Path:
    folder = save_peft_folder(make_adapter(name, seed=seed), tmp / "folders" / name)
    path = tmp / f"{name}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in folder.iterdir():
            archive.write(file, f"{name}/{file.name}")
        if padding:
            archive.writestr(f"{name}/notes.bin", b"\0" * padding)
    return path


def _message(call) -> str:
    with pytest.raises(gr.Error) as info:
        call()
    return str(info.value.message)


@pytest.mark.parametrize("broken", [False, True], ids=["good", "damaged"])
def test_cli_leaves_nothing_in_the_temp_folder(broken, tmp_path):
    spec = _lying_zip(tmp_path) if broken else _adapter_zip(tmp_path, "a")
    temp = tmp_path / "temp"
    temp.mkdir()
    done = subprocess.run([sys.executable, "-m", "lego_viz", "inspect", str(spec)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)})
    assert done.returncode == (2 if broken else 0), done.stderr[-400:]
    if broken:
        assert done.stderr.startswith("error: upload.zip: damaged zip") and len(done.stderr.splitlines()) == 1, done.stderr
    assert sorted(p.name for p in temp.iterdir()) == []


# inspect that waits after its work until it is stopped, through the console entry point
_INSPECT_THEN_WAIT = """
import sys, threading
import lego_viz.cli.commands as commands
inspect = commands.cmd_inspect
def waiting(args):
    code = inspect(args)
    print("waiting", flush=True)
    threading.Event().wait()
    return code
commands.cmd_inspect = waiting
sys.argv = ["lego_viz", "inspect", sys.argv[1]]
commands.run()
"""


def test_cli_terminated_mid_command_leaves_nothing_in_the_temp_folder(tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _INSPECT_THEN_WAIT, str(_adapter_zip(tmp_path, "a"))], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)})
    try:
        for line in child.stdout:  # the zip is unpacked and inspected: now stop the command
            if line.startswith("waiting"):
                break
        assert next(p.name for p in temp.iterdir()).startswith("lego_viz_zip_")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 130, child.stderr.read()[-400:]
    finally:
        child.kill()
    assert child.stderr.read().strip() == "interrupted"
    assert sorted(p.name for p in temp.iterdir()) == []


def _never_extract(*args, **kwargs):
    raise AssertionError("a zip was unpacked before the load was refused")


def test_app_checks_the_adapter_count_before_unpacking(tmp_path, monkeypatch):
    session = Session().with_adapters([make_adapter(f"x{i}", seed=i) for i in range(runtime.MAX_ADAPTERS - 1)], replace=False)
    zips = [str(_adapter_zip(tmp_path, name, seed)) for name, seed in (("a", 1), ("b", 2))]
    monkeypatch.setattr(loading, "_safe_extract_zip", _never_extract)
    message = _message(lambda: load_handler(True)(session, zips, None, False))
    assert f"at most {runtime.MAX_ADAPTERS} adapters per session" in message


def test_app_bounds_what_one_load_unpacks_over_all_its_zips(tmp_path, monkeypatch):
    # each zip is under the cap; the three together are over it
    zips = [str(_adapter_zip(tmp_path, name, seed, padding=BOMB_CAP // 3)) for name, seed in (("a", 1), ("b", 2), ("c", 3))]
    monkeypatch.setattr(loading, "_safe_extract_zip", _never_extract)
    message = _message(lambda: load_handler(True)(Session(), zips, None, False))
    assert "these 3 zips unpack to" in message and "one load may unpack at most 4 MiB" in message


def _weight_bytes(tmp_path) -> int:
    session = load_handler(True)(Session(), [str(_adapter_zip(tmp_path / "probe", "probe"))], None, False)[0]
    from lego_viz.ui.load_tab import _held_bytes

    return _held_bytes(session.adapters[0])


def test_app_bounds_weights_held_per_session_and_per_app(tmp_path, monkeypatch):
    (tmp_path / "probe").mkdir()
    size = _weight_bytes(tmp_path)
    gc.collect()
    # Sessions of earlier tests in this process may still hold uploads: the cap counts from what they hold.
    held_before = sum(load_tab._held_bytes(a) for a in list(load_tab._HELD.values()))
    monkeypatch.setattr(runtime, "MAX_SESSION_WEIGHT_BYTES", size + size // 2)  # one adapter per session
    monkeypatch.setattr(runtime, "MAX_APP_WEIGHT_BYTES", held_before + 2 * size + size // 2)  # two more in all
    load = load_handler(True)
    first = load(Session(), [str(_adapter_zip(tmp_path, "a", 1))], None, False)[0]
    assert "a session on this public app may hold" in _message(lambda s=first: load(s, [str(_adapter_zip(tmp_path, "b", 2))], None, False))
    second = load(Session(), [str(_adapter_zip(tmp_path, "c", 3))], None, False)[0]
    message = _message(lambda: load(Session(), [str(_adapter_zip(tmp_path, "d", 4))], None, False))
    assert "of other sessions' adapters" in message
    del first, second  # the sessions end: their weights no longer count
    gc.collect()
    assert [a.name for a in load(Session(), [str(_adapter_zip(tmp_path, "d", 4))], None, False)[0].adapters] == ["d"]


def test_loaded_upload_keeps_no_map_of_its_deleted_files(tmp_path):
    session = load_handler(False)(Session(), [str(_adapter_zip(tmp_path, "a", 1))], None, False)[0]
    assert session.adapters[0].n_msus > 0
    maps = Path("/proc/self/maps").read_text()
    assert "lego_viz_upload_" not in maps  # a map of the unpacked file would keep its disk space until the session ends
