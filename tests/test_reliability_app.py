"""The bad-input corpus through the app's own handlers: a message (gr.Error), never a crash,
and the session the user had is untouched (handlers never mutate it; a raise keeps the old state)."""

import re

import gradio as gr
import pytest
from bad_inputs import BOMB_CAP, CASES
from conftest import make_adapter

import lego_viz.adapters.loading as adapters_mod
from lego_viz.ui.load_tab import load_handler
from lego_viz.ui.map_tab import cluster
from lego_viz.ui.msu_map import ALL
from lego_viz.ui.state import Session

# Where the app words it differently because its controls catch the problem first.
APP_MESSAGE = {
    "empty-spec": "nothing to load",
    "no-adapters": "no adapter selected",
    "k-zero": "k must be at least 1",
    "unknown-method": "unknown merge method 'magic'",
}
# Inputs the app's controls cannot express at all (choices are radio buttons, one slider per adapter).
NOT_IN_APP = {"unknown-option", "weights-count", "k-pattern-lookaround", "option-internal"}


@pytest.fixture(autouse=True)
def small_unzip_cap(monkeypatch):
    monkeypatch.setattr(adapters_mod, "MAX_UNZIPPED_BYTES", BOMB_CAP)


def _message(call) -> str:
    with pytest.raises(gr.Error) as info:
        call()
    return str(info.value.message)


def _load(session, spec):
    spec = str(spec)
    if spec.endswith(".zip"):
        return load_handler(False)(session, [spec], None, False)
    return load_handler(False)(session, None, spec, False)


APP_CASES = [c for c in CASES if c.id not in NOT_IN_APP and c.kind != "config"]  # the app reads no configs


@pytest.mark.parametrize("case", APP_CASES, ids=[c.id for c in APP_CASES])
def test_app_shows_message_and_keeps_session(case, tmp_path):
    before = Session().with_adapters([make_adapter("already-loaded")], replace=False)
    snapshot = (before.adapters, before.use, before.weights)
    built = case.build(tmp_path)
    expected = APP_MESSAGE.get(case.id, case.message)
    if case.kind == "load":
        message = _message(lambda: _load(before, built))
    else:
        specs, kwargs = built
        try:
            session = load_handler(False)(Session(), None, "\n".join(specs), True)[0] if specs else Session()
        except gr.Error as exc:  # incompatible sets are refused when they are loaded
            message = str(exc.message)
        else:
            if "weights" in kwargs:
                session = session.with_selection([True] * len(session.adapters), kwargs["weights"])
            message = _message(lambda: cluster(
                session, ALL, "pca", "cluster", kwargs.get("method", "lego"), kwargs.get("k", 2),
                kwargs.get("features", "canonical"), "l2", True, 0,
            ))
    assert re.search(expected, message), message
    assert "Traceback" not in message and "internal error" not in message
    assert (before.adapters, before.use, before.weights) == snapshot


def test_local_paths_are_limited_to_allowed_roots(tmp_path, monkeypatch):
    from conftest import save_peft_folder

    inside = save_peft_folder(make_adapter("inside"), tmp_path / "allowed" / "inside")
    outside = save_peft_folder(make_adapter("outside"), tmp_path / "elsewhere" / "outside")
    (tmp_path / "allowed" / "link").symlink_to(outside)
    monkeypatch.setenv("LEGO_VIZ_ALLOWED_ROOTS", str(tmp_path / "allowed"))
    session = load_handler(False)(Session(), None, str(inside), False)[0]
    assert [a.name for a in session.adapters] == ["inside"]
    for spec in (outside, tmp_path / "allowed" / "link", "/etc/passwd"):
        assert "outside the folders this app may read" in _message(lambda spec=spec: load_handler(False)(session, None, str(spec), False))


def test_public_mode_refuses_every_local_path(tmp_path):
    from conftest import save_peft_folder

    folder = save_peft_folder(make_adapter("x"), tmp_path / "x")
    assert "local paths and hub ids are disabled" in _message(lambda: load_handler(True)(Session(), None, str(folder), False))
