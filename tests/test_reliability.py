"""Every case of the bad-input corpus gives its clear error through the library and the CLI."""

import os
import re

import pytest
from bad_inputs import BOMB_CAP, CASES, CONFIG_CAP, cli_words, load_case_error

import lego_viz.adapters.loading as adapters_mod
import lego_viz.export.yaml_io as yaml_io
from lego_viz.cli.commands import main


@pytest.fixture(autouse=True)
def small_unzip_cap(monkeypatch):
    monkeypatch.setattr(adapters_mod, "MAX_UNZIPPED_BYTES", BOMB_CAP)
    monkeypatch.setattr(yaml_io, "MAX_CONFIG_BYTES", CONFIG_CAP)


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_library_error(case, tmp_path):
    if os.path.exists("/tmp/lego_viz_pwned"):
        os.remove("/tmp/lego_viz_pwned")
    message = load_case_error(case, tmp_path)
    assert re.search(case.message, message), message
    assert "Traceback" not in message and "\n" not in message.strip()
    assert not os.path.exists("/tmp/lego_viz_pwned")  # nothing from a pickle ever ran


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_exit_2_one_line(case, tmp_path, capsys):
    words = cli_words(case, tmp_path)
    capsys.readouterr()
    code = main(words)
    out, err = capsys.readouterr()
    assert code == 2, (words, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(case.cli_message or case.message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # a failed merge writes nothing
