"""Start-up stays light: a command imports only what it uses (issue 15, item 2).

A property, not a timing: each case runs the real CLI in a fresh interpreter and reads which heavy
packages ended up in ``sys.modules``.
"""

import json
import subprocess
import sys

import pytest
from conftest import make_adapter, save_peft_folder

HEAVY = ("transformers", "peft", "gradio", "umap")

_PROBE = """
import json, sys
from lego_viz.cli.commands import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help exits through argparse
    code = exc.code
roots = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"code": code, "roots": roots}))
"""


def imported_roots(*args: str) -> tuple[int, set[str]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["code"], set(result["roots"])


def test_help_imports_neither_torch_nor_plugins() -> None:
    code, roots = imported_roots("--help")
    assert code == 0
    assert not roots & {*HEAVY, "torch"}, sorted(roots & {*HEAVY, "torch"})


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("startup")
    return [str(save_peft_folder(make_adapter(name, seed=i), tmp / name)) for i, name in enumerate("ab")]


@pytest.mark.parametrize("command", ["inspect", "check", "merge"])
def test_core_commands_skip_transformers_peft_gradio_umap(command: str, two_adapters, tmp_path) -> None:
    extra = ["--out", str(tmp_path / "out"), "--k", "2"] if command == "merge" else []
    code, roots = imported_roots(command, *two_adapters, *extra)
    assert code == 0
    assert not roots & set(HEAVY), sorted(roots & set(HEAVY))


def test_plugin_command_help_loads_its_module() -> None:
    # The lazy registration must still give a plugin command its full options.
    proc = subprocess.run([sys.executable, "-m", "lego_viz", "zoo-eval", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--adapter" in proc.stdout and "--tasks" in proc.stdout
