"""The bad-input corpus through the app's own handlers: a message (gr.Error), never a crash,
and the session the user had is untouched (handlers never mutate it; a raise keeps the old state)."""

import re

import gradio as gr
import pytest
from bad_inputs import BOMB_CAP, CASES
from conftest import make_adapter

import lego_viz.adapters as adapters_mod
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
NOT_IN_APP = {"unknown-option", "weights-count"}


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


APP_CASES = [c for c in CASES if c.id not in NOT_IN_APP]


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
