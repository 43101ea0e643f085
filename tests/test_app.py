"""The app's handlers and helpers, called directly (no server): state, map, checks, export, errors."""

from __future__ import annotations

import copy
import dataclasses
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from conftest import TOY_HIDDEN, make_adapter, save_peft_folder, toy_shapes

from lego_viz.adapters import AdapterError
from lego_viz.checks.invariance import logits_with
from lego_viz.ui import export_tab, invariance_tab, load_tab, map_tab, msu_map, plots, runtime
from lego_viz.ui.errors import user_errors
from lego_viz.ui.models import ModelPool, fits_model
from lego_viz.ui.state import MergeSettings, Session, cleanup

ALL = msu_map.ALL


@pytest.fixture
def adapters():
    return [make_adapter("a", r=4, seed=1), make_adapter("b", r=2, seed=2), make_adapter("c", r=6, seed=3)]


@pytest.fixture
def session(adapters) -> Session:
    return Session().with_adapters(adapters, replace=True)


def _cluster(session: Session, k: int = 3, colour_by: str = "cluster", method: str = "lego", selection: str = ALL):
    return map_tab.cluster(session, selection, "pca", colour_by, method, k, "canonical", "l2", True, 0)


class _CharTokenizer:
    """Enough of a tokenizer for the output checks on the toy model (vocab 64)."""

    def __call__(self, text: str, return_tensors: str | None = None):
        return SimpleNamespace(input_ids=torch.tensor([[1 + ord(c) % 60 for c in text]]))


@pytest.fixture
def toy_pool(monkeypatch, toy_model):
    pool = ModelPool(lambda: (copy.deepcopy(toy_model), _CharTokenizer()), max_size=1)
    monkeypatch.setattr(invariance_tab, "zoo_pool", lambda: pool)
    monkeypatch.setattr(invariance_tab, "zoo_available", lambda: True)
    return pool


# ----------------------------------------------------------------------------- session state


def test_with_adapters_renames_copies_and_selects_all(adapters):
    twin = make_adapter("a", r=4, seed=9)
    session = Session().with_adapters([*adapters, twin], replace=True)
    assert [a.name for a in session.adapters] == ["a", "b", "c", "a_2"]
    assert twin.name == "a"  # the caller's object is not renamed
    assert session.use == (True,) * 4 and session.weights == (1.0,) * 4


def test_with_adapters_adds_or_replaces(session):
    more = session.with_adapters([make_adapter("d", seed=4)], replace=False)
    assert [a.name for a in more.adapters] == ["a", "b", "c", "d"]
    assert [a.name for a in session.with_adapters([make_adapter("d", seed=4)], replace=True).adapters] == ["d"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda: make_adapter("x", shapes={"model.layers.0.self_attn.q_proj": (TOY_HIDDEN, 8)}), "d_out"),
        (lambda: make_adapter("x", base="other/model"), "different base models"),
    ],
)
def test_incompatible_adapters_are_refused(session, extra, message):
    with pytest.raises(AdapterError, match=message):
        session.with_adapters([extra()], replace=False)


def test_adapter_limit(monkeypatch, session):
    monkeypatch.setattr("lego_viz.ui.state.MAX_ADAPTERS", 3)
    with pytest.raises(AdapterError, match="at most 3 adapters"):
        session.with_adapters([make_adapter("d")], replace=False)


def test_selection_drops_the_merge_and_needs_one_adapter(session):
    merged = _cluster(session)[0]
    assert merged.merged is not None
    narrowed = merged.with_selection([True, False, True], [1.0, 1.0, 0.5])
    assert narrowed.merged is None
    assert [a.name for a in narrowed.selected()[0]] == ["a", "c"] and narrowed.selected()[1] == [1.0, 0.5]
    with pytest.raises(AdapterError, match="no adapter selected"):
        session.with_selection([False] * 3, [1.0] * 3).selected()


def test_weight_zero_leaves_an_adapter_out_like_unticking(session):
    zeroed = session.with_selection([True] * 3, [1.0, 0.0, -0.5])
    assert [a.name for a in zeroed.selected()[0]] == ["a", "c"] and zeroed.selected()[1] == [1.0, -0.5]
    merged = _cluster(zeroed)[0].merged
    name = next(iter(merged.unit_owner))
    assert len(merged.unit_owner[name]) == sum(a.modules[name].r for a in zeroed.selected()[0])  # b's units are not clustered
    with pytest.raises(AdapterError, match="all adapter weights are zero"):
        session.with_selection([True] * 3, [0.0] * 3).selected()


def test_merge_settings_validation():
    with pytest.raises(ValueError, match="k must be"):
        MergeSettings(k=0)


# ----------------------------------------------------------------------------- map


@pytest.mark.parametrize(
    ("module", "layer", "kind"),
    [
        ("model.layers.3.mlp.up_proj", 3, "model.layers.*.mlp.up_proj"),
        ("transformer.h.11.attn.c_attn", 11, "transformer.h.*.attn.c_attn"),
        ("classifier.dense", None, "classifier.dense"),
    ],
)
def test_layer_and_type_of(module, layer, kind):
    assert msu_map.layer_of(module) == layer
    assert msu_map.type_of(module) == kind


def test_selector_choices_and_selection(adapters):
    choices = msu_map.selector_choices(adapters)
    assert choices[0] == ALL
    assert "type: model.layers.*.self_attn.q_proj" in choices and "layer: 1" in choices
    assert msu_map.select_modules(adapters, "layer: 0") == [m for m in toy_shapes() if ".0." in m]
    with pytest.raises(ValueError, match="unknown map selection"):
        msu_map.select_modules(adapters, "bogus")


def test_facets_split_by_type_and_shape(adapters):
    modules = msu_map.select_modules(adapters, ALL)
    facets = msu_map.build_facets(adapters, [1.0] * 3, modules, "raw", map_tab.ProjectionConfig(method="pca"))
    assert len(facets) == 3  # q_proj, v_proj, down_proj: three shapes, never mixed
    per_type = 2 * (4 + 2 + 6)  # two layers, ranks 4 + 2 + 6
    assert [f.n for f in facets] == [per_type] * 3
    for facet in facets:
        assert len({msu_map.type_of(m) for m in facet.module}) == 1
        assert facet.coords.shape == (per_type, 2) and facet.cluster is None
    assert facets[0].adapter[:4] == ["a"] * 4 and facets[0].rank[:4] == [0, 1, 2, 3]


def test_changing_k_recolours_without_reprojecting(session):
    first, figure_k3, _, _ = _cluster(session, k=3)
    misses = msu_map.PROJECTIONS.misses
    second, figure_k5, _, _ = _cluster(first, k=5)
    assert msu_map.PROJECTIONS.misses == misses  # the projection came from the cache

    def points(figure):
        return sorted((round(x, 6), round(y, 6)) for t in figure.data for x, y in zip(t.x, t.y))

    assert points(figure_k3) == points(figure_k5)
    assert {t.name for t in figure_k5.data} == {f"cluster {j}" for j in range(5)}
    assert second.merged is not first.merged and second.settings.k == 5


def test_colour_change_reuses_the_merge(session):
    first = _cluster(session)[0]
    again, figure, _, _ = _cluster(first, colour_by="adapter")
    assert again.merged is first.merged
    assert {t.name for t in figure.data} == {"a", "b", "c"}


def test_heatmap_counts_every_msu_of_the_focus_module(session):
    _, _, heatmap, summary = _cluster(session, k=4, selection="module: model.layers.1.mlp.down_proj")
    counts = torch.tensor(heatmap.data[0].z)
    assert counts.shape == (3, 4)
    assert counts.sum(1).tolist() == [4, 2, 6]  # each adapter's ranks, all placed
    assert "lego" in summary


def test_lego_rescale_control_fits_the_ranks_to_the_exact_sum(session):
    args = (session, ALL, "pca", "cluster", "lego", 3, "canonical", "l2", True, 0)
    plain, fitted = map_tab.cluster(*args, "none")[0], map_tab.cluster(*args, "lsq")[0]
    assert plain.merged.options["rescale"] == "none" and fitted.merged.options["rescale"] == "lsq"
    assert torch.equal(fitted.merged.labels[next(iter(fitted.merged.labels))], plain.merged.labels[next(iter(plain.merged.labels))])
    # The same clusters, each rank's scale fitted by least squares: never further from the exact sum
    # (float32 rounding of the k×k solve aside), and here strictly closer on every module.
    assert all(fitted.merge_errors[m] <= plain.merge_errors[m] + 1e-6 for m in plain.merge_errors)
    assert all(fitted.merge_errors[m] < plain.merge_errors[m] - 1e-3 for m in plain.merge_errors)
    with pytest.raises(gr.Error, match="rescale must be one of none, lsq"):
        map_tab.cluster(*args, "cubic")


def test_methods_without_clusters_have_no_heatmap(session):
    _, _, heatmap, summary = _cluster(session, method="linear")
    assert heatmap is None and "does not cluster" in summary
    assert "0.0%" in summary  # linear is the exact sum


def test_refresh_controls_caps_k_and_opens_on_the_most_separated_module(session, adapters):
    selection, k = map_tab.refresh_controls(session, None, 40)
    best = msu_map.most_separated_module(adapters, [1.0] * 3)
    assert selection["value"] == f"module: {best}" and k["maximum"] == 12 and k["value"] == 12
    assert map_tab.refresh_controls(session, ALL, 4)[0]["value"] == ALL  # a choice the user made is kept


def test_separation_finds_the_module_where_adapters_stand_apart(adapters):
    # In one module, give each adapter's units a shared direction of their own: they separate there only.
    target = "model.layers.1.self_attn.v_proj"
    separated = []
    for i, adapter in enumerate(adapters):
        lora = adapter.modules[target]
        A, B = 0.01 * lora.A, 0.01 * lora.B
        A[:, i] += 1.0
        B[i, :] += 1.0
        separated.append(dataclasses.replace(adapter, modules={**adapter.modules, target: dataclasses.replace(lora, A=A, B=B)}))
    assert msu_map.most_separated_module(separated, [1.0] * 3) == target
    score = msu_map.separation(msu_map.module_msus(separated, target, [1.0] * 3))
    # Units of one adapter are near copies there (|cos| ≈ 1), of different adapters near orthogonal;
    # elsewhere the toy adapters are random (silhouette near 0).
    assert score > 0.9 and msu_map.separation(msu_map.module_msus(separated, "model.layers.0.self_attn.q_proj", [1.0] * 3)) < 0.3
    assert msu_map.separation(msu_map.module_msus(separated[:1], target, [1.0])) is None  # one adapter: no question


def test_map_figure_rejects_unknown_colouring(adapters):
    facets = msu_map.build_facets(adapters, [1.0] * 3, list(toy_shapes())[:1], "raw", map_tab.ProjectionConfig(method="pca"))
    with pytest.raises(ValueError, match="unknown colouring"):
        plots.msu_map_figure(facets, "rainbow")


def test_k_sweep_figure_has_two_panels_per_method():
    figure = plots.k_sweep_figure({m: {"k": [1, 2], "accuracy": [0.1, 0.2], "error": [0.5, 0.4]} for m in ("lego", "svd")})
    assert len(figure.data) == 4
    # Every axis says what it measures; accuracy reads as a percentage, like the accuracy table.
    assert all(figure.layout[axis].title.text for axis in ("xaxis", "xaxis2", "yaxis", "yaxis2"))
    assert figure.layout.yaxis.tickformat == ".0%"


# ----------------------------------------------------------------------------- invariance


def test_checks_pass_and_the_broken_pairing_breaks(session, toy_pool):
    badges, rows = invariance_tab.check(session, "reverse: abc=", 3)
    verdicts = {(row[0], row[1].split(":")[0]): row[5] for row in rows}
    assert len(verdicts) == 6
    for (check, _), verdict in verdicts.items():
        expected = "BREAKS, as it should" if "pairing broken" in check else "PASS"
        assert verdict == expected
    assert badges.count('class="lego-badge"') == 6
    assert ">FAIL<" not in badges


def test_checks_without_a_base_model_report_weight_space_only(session, monkeypatch):
    monkeypatch.setattr(invariance_tab, "zoo_available", lambda: False)
    _, rows = invariance_tab.check(session, "x", 0)
    assert [row[5] for row in rows[1::2]] == ["needs the zoo base model"] * 3
    assert rows[0][5] == "PASS"


# ----------------------------------------------------------------------------- export


def test_export_zip_loads_in_peft_and_matches_the_merge(session, toy_model, tmp_path):
    from peft import PeftModel

    merged_session, archive, snippet, summary = export_tab.export(_cluster(session, k=3)[0])
    with zipfile.ZipFile(archive) as zf:
        names = {Path(n).name for n in zf.namelist()}
        zf.extractall(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "merge_report.json", "recipe.yaml"} <= names
    assert "PeftModel.from_pretrained" in snippet and "lego" in summary
    folder = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(toy_model), folder).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    expected = logits_with(toy_model, ids, merged_session.merged.modules)
    # Same float32 update applied two ways (merged-weight hooks vs PEFT layers): round-off only.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_replaces_its_previous_folder_and_cleanup_removes_it(session):
    first = export_tab.export(session)[0]
    second = export_tab.export(first)[0]
    assert not Path(first.export_dir).exists() and Path(second.export_dir).is_dir()
    cleanup(second)
    assert not Path(second.export_dir).exists()


def test_export_tab_dtype_and_max_rank(session):
    session = _cluster(session, k=3)[0]
    with pytest.raises(gr.Error, match=r"exceed max rank 2 .*lower k to 2"):
        export_tab.export(session, "fp32", 2)
    _, archive, _, _ = export_tab.export(session, "bf16", 3)
    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith("adapter_model.safetensors"))
        header = zf.read(name)[8:400].decode("utf-8", "replace")
    assert '"dtype":"BF16"' in header and '"F32"' not in header


# ----------------------------------------------------------------------------- loading


def test_load_paths_uploads_and_zips(tmp_path, adapters):
    folders = [save_peft_folder(a, tmp_path / a.name) for a in adapters]
    out = load_tab.load_sources(Session(), None, f"{folders[0]}\n{folders[1]}", replace=True, public=False)
    assert [row[0] for row in out[1]] == ["a", "b"] and "2 adapter(s)" in out[2]
    archive = Path(load_tab.shutil.make_archive(str(tmp_path / "zipped_c"), "zip", root_dir=folders[2]))
    loose = [str(folders[2] / "adapter_config.json"), str(folders[2] / "adapter_model.safetensors")]
    out = load_tab.load_sources(out[0], [str(archive), *loose], None, replace=False, public=False)
    assert [a.name for a in out[0].adapters] == ["a", "b", "zipped_c", "upload"]
    slots = out[3 : 3 + runtime.MAX_ADAPTERS]
    assert [s["visible"] for s in slots[:5]] == [True] * 4 + [False]


@pytest.mark.parametrize(
    ("files", "paths", "public", "message"),
    [
        (None, "/etc", True, "typed local paths and hub ids are disabled"),
        (None, "some-org/some-lora", True, "typed local paths and hub ids are disabled"),
        (None, "", False, "nothing to load"),
        (["weights.txt"], None, False, "cannot use weights.txt"),
        (["x/adapter_model.safetensors"], None, False, "exactly one adapter_config.json"),
    ],
)
def test_load_refusals(files, paths, public, message):
    with pytest.raises(AdapterError, match=message):
        load_tab.load_sources(Session(), files, paths, replace=True, public=public)



def test_a_broken_zip_upload_is_named_as_uploaded(tmp_path):
    cached = tmp_path / "gradio" / "2f7734a1" / "my_lora.zip"  # where Gradio keeps an upload
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AdapterError, match=r"^my_lora\.zip: not a folder, a \.zip.*damaged.*zip the adapter's folder") as refused:
        load_tab.load_sources(Session(), [str(cached)], None, replace=True, public=True)
    assert str(tmp_path) not in str(refused.value)


@pytest.mark.parametrize("public", [False, True])
def test_the_typed_sources_box_is_disabled_in_public_mode(public):
    # Paths and hub ids are a local-tool feature: a Space shows the box disabled, with the reason.
    from lego_viz.ui import build_demo

    box = next(b for b in build_demo(public=public).blocks.values() if isinstance(b, gr.Textbox) and b.label.startswith("…or"))
    assert box.interactive is not public and ("locally" in box.label) is public

def test_select_reads_checkboxes_then_weights(session):
    n = runtime.MAX_ADAPTERS
    values = [True, False, True] + [False] * (n - 3) + [0.5, 1.0, 2.0] + [1.0] * (n - 3)
    chosen = load_tab.select(session, *values)
    assert chosen.selected()[1] == [0.5, 2.0]


# ----------------------------------------------------------------------------- errors, models, runtime


def test_user_errors_turn_exceptions_into_messages():
    @user_errors
    def bad_input():
        raise AdapterError("adapter 'x' targets q_proj with d_in=8")

    @user_errors
    def bug():
        raise RuntimeError("boom")

    with pytest.raises(gr.Error, match="adapter 'x' targets q_proj"):
        bad_input()
    with pytest.raises(gr.Error, match=r"internal error .*RuntimeError: boom"):
        bug()



def test_user_errors_messages_can_be_sent_to_the_browser():
    # A folder name that is not UTF-8 (a surrogate escape) used to make the error unsendable: the browser hung.
    @user_errors
    def odd_name():
        raise AdapterError("/tmp: holds 2 adapters (a, adapter_\udcff); give one at a time.")

    @user_errors
    def huge_listing():
        raise AdapterError("/tmp: holds 334 adapters (" + ", ".join(["lego_k4_merge"] * 334) + "); give one at a time.")

    with pytest.raises(gr.Error) as odd:
        odd_name()
    assert "adapter_\\xff" in odd.value.message
    odd.value.message.encode("utf-8")  # strict: raises on any surrogate left
    with pytest.raises(gr.Error) as huge:
        huge_listing()
    message = huge.value.message
    assert message.startswith("/tmp: holds 334 adapters") and message.endswith("give one at a time.") and len(message) <= 600

def test_model_pool_lends_each_instance_to_one_borrower():
    pool = ModelPool(lambda: (object(), None), max_size=2)
    inside, lock, seen = [], threading.Lock(), set()
    barrier = threading.Barrier(2)

    def borrow():
        with pool.borrow() as (model, _):
            with lock:
                inside.append(model)
                seen.add(id(model))
            barrier.wait(timeout=10)  # both borrowers hold a model at the same time
            with lock:
                inside.remove(model)

    threads = [threading.Thread(target=borrow) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and pool.created == 2
    with pool.borrow() as (model, _):
        assert id(model) in seen  # reused, not rebuilt
    assert pool.created == 2


def test_fits_model(toy_model, adapters):
    assert fits_model(toy_model, adapters)
    odd = make_adapter("odd", shapes={"model.layers.0.self_attn.q_proj": (TOY_HIDDEN, 7)})
    missing = dataclasses.replace(odd, modules={"model.layers.9.self_attn.q_proj": next(iter(adapters[0].modules.values()))})
    assert not fits_model(toy_model, [odd]) and not fits_model(toy_model, [missing])


@pytest.mark.parametrize(("env", "expected"), [({}, 7860), ({"GRADIO_SERVER_PORT": "8000"}, 8000), ({"PORT": "9000", "GRADIO_SERVER_PORT": "8000"}, 9000)])
def test_server_port(monkeypatch, env, expected):
    for name in ("PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runtime.server_port() == expected


def test_server_port_rejects_garbage(monkeypatch):
    monkeypatch.setenv("PORT", "http")
    with pytest.raises(ValueError, match="PORT"):
        runtime.server_port()


def test_public_mode(monkeypatch):
    for name in ("SPACE_ID", "LEGO_VIZ_PUBLIC"):
        monkeypatch.delenv(name, raising=False)
    assert not runtime.public_mode() and runtime.public_mode(True)
    monkeypatch.setenv("SPACE_ID", "someone/lego-viz")
    assert runtime.public_mode()


# ----------------------------------------------------------------------------- running models


@pytest.fixture
def char_pool(monkeypatch, toy_model):
    """The zoo's character tokenizer with a toy Llama of matching vocabulary, lent through the run tab's pool."""
    from transformers import LlamaForCausalLM

    from lego_viz.ui import run_tab
    from lego_viz.zoo.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = copy.deepcopy(toy_model.config)
    config.vocab_size, config.pad_token_id, config.eos_token_id = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    pool = ModelPool(lambda: (LlamaForCausalLM(config).eval(), tokenizer), max_size=1)
    monkeypatch.setattr(run_tab, "zoo_pool", lambda: pool)
    return run_tab


@pytest.fixture
def task_session() -> Session:
    return Session().with_adapters([make_adapter(t, r=4, seed=i) for i, t in enumerate(("reverse", "sort"))], replace=True)


def test_run_shows_base_each_adapter_and_the_merge(char_pool, task_session):
    session, rows = char_pool.run(task_session, "reverse: lego=")
    assert [row[0] for row in rows] == ["base", "adapter · reverse", "adapter · sort", "merge · lego (k=8)"]
    assert session.merged is not None and all(isinstance(row[1], str) for row in rows)


def test_accuracy_table_has_a_row_per_method_and_rank_beside_its_control(char_pool, task_session):
    from lego_viz.zoo import lab

    table, notes = char_pool.accuracy_table(task_session, 2)
    expected = ["base", "each adapter alone", "linear (exact)"]
    expected += [f"{v.name} k={k}" for k in (4, 8) for v in lab.variants() if v.takes_k]  # r̄ = 4 and 2·r̄
    expected += [v.name for v in lab.variants() if not v.takes_k]  # equal ranks: PEFT's methods run too
    expected += ["arrow (units, top-4)", "arrow (units, top-8)", "arrow (adapter, top-1)", "arrow (adapter, top-2)"]  # zero-shot routing
    assert sorted(table["model"]) == sorted(expected)
    assert list(table.columns) == ["model", "rank", *lab.TABLE_HEADER_TAIL, "reverse", "sort"]
    merged = table[~table["model"].isin(["base", "each adapter alone"])]
    assert merged["control (95% CI)"].str.match(r"\d+\.\d \(\d+\.\d–\d+\.\d\)$").all()
    assert "2** held-out prompts" in notes and "Refused" not in notes and "arrow = zero-shot routing" in notes
    assert table.set_index("model").loc["arrow (units, top-4)", "rank"] == "4 of 8 units"


def test_accuracy_table_names_methods_refused_for_one_reason_once(char_pool, monkeypatch):
    warnings = []
    monkeypatch.setattr(char_pool.gr, "Warning", warnings.append)
    mixed = Session().with_adapters([make_adapter("reverse", r=4, seed=0), make_adapter("sort", r=8, seed=1)], replace=True)
    table, notes = char_pool.accuracy_table(mixed, 1)
    assert len(warnings) == 1 and warnings[0].startswith("peft_linear, ties, dare_linear refused: PEFT-style combinations need equal ranks")
    assert "**Refused** — peft_linear, ties, dare_linear: PEFT-style" in notes
    assert "ties" not in set(table["model"])


def test_k_sweep_covers_every_method_that_takes_k_up_to_max_k(char_pool, task_session):
    from lego_viz.zoo import lab

    figure = char_pool.k_sweep(task_session, 1)
    lines = {trace.name: list(trace.x) for trace in figure.data if trace.showlegend is not False}
    assert lines == {v.name: [1, 2, 4, 8] for v in lab.variants() if v.takes_k}  # n = 4 + 4 MSUs per module


def test_retention_needs_two_adapters_that_solve_their_tasks(char_pool, task_session):
    one = task_session.with_selection([True, False], [1.0, 1.0])
    with pytest.raises(gr.Error, match="at least two zoo task adapters"):
        char_pool.retention(one, 1)
    # The toy model solves nothing, so retention (accuracy / own accuracy) is undefined: said, not drawn as 0.
    with pytest.raises(gr.Error, match="solves its own task"):
        char_pool.retention(task_session, 1)


def test_lab_leaves_out_adapters_it_cannot_score(char_pool, monkeypatch, task_session):
    warnings = []
    monkeypatch.setattr(char_pool.gr, "Warning", warnings.append)
    extra = task_session.with_adapters([make_adapter("upload", r=4, seed=5)], replace=False).with_selection([True] * 3, [1.0, 0.5, 1.0])
    adapters, weights = char_pool._lab_selection(extra)
    assert warnings[0].startswith("left out of the merge lab") and "upload" in warnings[0]
    assert [a.name for a in adapters] == ["reverse", "sort"] and weights == [1.0, 0.5]


def test_retention_figure_draws_each_method_with_error_bars():
    curve = {"methods": {m: {"sizes": [2, 3], "mean": [0.9, 0.7], "sd": [0.05, 0.1], "runs": [[0.85, 0.95], [0.6, 0.8]]} for m in ("linear", "lego")}}
    figure = plots.retention_figure(curve, "title")
    assert [trace.name for trace in figure.data] == ["linear", "lego"]
    assert list(figure.data[1].error_y.array) == [0.05, 0.1] and list(figure.data[0].x) == [2, 3]
    assert figure.layout.xaxis.title.text and figure.layout.yaxis.title.text and figure.layout.title.text == "title"


def test_shipped_view_matches_the_stored_measurement():
    from lego_viz.ui import run_tab
    from lego_viz.zoo import lab

    frame, notes, curve, sweep = run_tab.shipped_view()
    results = lab.shipped_results()
    if results is None:
        assert frame is None and "scripts/merge_lab_table.py" in notes
        return
    assert list(frame["model"]) == [row["label"] for row in results["table"]["rows"]]
    if "retention_curve" in results:  # the script writes the table first, then each figure's data
        assert {trace.name for trace in curve.data} == set(results["retention_curve"]["methods"])
    if "k_sweep" in results:
        assert {trace.name for trace in sweep.data} == set(results["k_sweep"]["methods"])


def test_running_models_needs_a_fitting_base(char_pool):
    odd = Session().with_adapters([make_adapter("odd", r=8, shapes={"model.layers.0.self_attn.q_proj": (TOY_HIDDEN, 8)})], replace=True)
    with pytest.raises(gr.Error, match="only the demo zoo's base is bundled"):
        char_pool.run(odd, "reverse: ab=")
    # A practitioner's adapters: the message names the base they need and what still works.
    gpt2 = Session().with_adapters([make_adapter("g", r=8, base="gpt2", shapes={"transformer.h.0.attn.c_attn": (TOY_HIDDEN, 3 * TOY_HIDDEN)})], replace=True)
    with pytest.raises(gr.Error, match=r"adapters are for 'gpt2'.*the export work for them"):
        char_pool.run(gpt2, "reverse: ab=")


@pytest.mark.parametrize(("task_type", "auto_class"), [("CAUSAL_LM", "AutoModelForCausalLM"), (None, "AutoModel"), ("FEATURE_EXTRACTION", "AutoModel")])
def test_peft_snippet_loads_the_base_with_a_class_that_fits_the_task(task_type, auto_class):
    import ast

    from lego_viz.ui import learn

    snippet = learn.peft_snippet("gpt2", "lego_merge", task_type)
    ast.parse(snippet)  # valid Python as shown
    assert f"from transformers import {auto_class}\n" in snippet and f'{auto_class}.from_pretrained("gpt2")' in snippet
