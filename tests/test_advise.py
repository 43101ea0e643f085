"""Which k? Error curves from factors, the knee, the budget allocation, its PEFT export, and the CLI."""

import itertools
import json

import pytest
import torch
from conftest import real_lora, save_peft_folder
from test_export import GROUPS, _assert_peft_deltas_match, _peft_load, _toy_base
from test_merge import dense_sum

from lego_viz.adapters import AdapterError
from lego_viz.cli.commands import main
from lego_viz.export.folder import export_adapter
from lego_viz.merge import merge
from lego_viz.merge.advise import ModuleCurve, advise, allocate, k_patterns, knee

WEIGHTS = [1.0, 0.5, -2.0]


def test_curves_equal_dense_errors(toy_adapters):
    advice = advise(toy_adapters, weights=WEIGHTS, max_rank=6, n_init=2)
    target = dense_sum(toy_adapters, WEIGHTS)
    curve = next(c for c in advice.curves if c.module == "model.layers.1.mlp.down_proj")
    sigma = torch.linalg.svdvals(target[curve.module].double())
    expected_svd = [float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt()) for k in range(1, 7)]
    assert curve.svd == pytest.approx(expected_svd, rel=1e-4, abs=1e-6)  # float32 factors vs a float64 dense SVD
    assert curve.lego_k == [1, 2, 3, 4, 5, 6]
    merged = merge(toy_adapters, "lego", k=4, weights=WEIGHTS, n_init=2)  # every module at k=4, same seed
    dense = (merged.modules[curve.module].delta_weight() - target[curve.module]).norm() / target[curve.module].norm()
    assert curve.lego[3] == pytest.approx(float(dense), rel=1e-4)


def test_knee_is_the_point_farthest_below_the_chord():
    corner = [1.0, 0.6, 0.2, *[0.2 - 0.1 * i / 6 for i in range(1, 7)]]  # steep to k=3, then nearly flat
    assert knee(range(1, 10), corner) == 3
    assert knee([1, 2, 4, 8], [1.0, 0.3, 0.2, 0.1]) == 2
    assert knee(range(1, 6), [1.0, 0.8, 0.6, 0.4, 0.2]) == 1  # a straight line has no bend


def test_greedy_allocation_is_optimal_on_svd_curves():
    def curve(name, sigma):  # relative error of the best rank-k approximation, k = 1..len(sigma)
        energy = torch.tensor(sigma).square()
        return ModuleCurve(name, len(sigma), [float((energy[k:].sum() / energy.sum()).sqrt()) for k in range(1, len(sigma) + 1)])

    curves = [curve("a", [3.0, 2.0, 1.5, 0.5]), curve("b", [1.0, 0.9, 0.8]), curve("c", [5.0, 0.2])]
    for budget in range(3, 10):
        ranks = allocate(curves, budget)
        assert sum(ranks.values()) <= budget and all(r >= 1 for r in ranks.values())

        def cost(choice):
            return sum(c.svd[k - 1] ** 2 for c, k in zip(curves, choice))

        best = min(cost(ch) for ch in itertools.product(*(range(1, c.n + 1) for c in curves)) if sum(ch) <= budget)
        assert cost([ranks[c.module] for c in curves]) == pytest.approx(best), budget
    with pytest.raises(AdapterError, match="cannot give each of the 3 modules rank 1"):
        allocate(curves, 2)


def test_allocation_exports_with_rank_pattern_and_reloads_in_peft(tmp_path, toy_adapters):
    advice = advise(toy_adapters, budget=20, lego=False)  # 6 modules
    assert sum(advice.allocation.values()) == 20 and advice.allocated_error <= advice.uniform_error + 1e-9
    merged = merge(toy_adapters, "svd", k=k_patterns(advice.allocation))
    assert merged.ranks == advice.allocation
    out = export_adapter(merged, tmp_path / "advised", adapters=toy_adapters, advice=advice.summary())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    model, missing, unexpected = _peft_load(_toy_base(), out)
    assert missing == [] and unexpected == []
    _assert_peft_deltas_match(model, merged)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["advice"]["allocation"] == advice.allocation and report["advice"]["suggested_k"] == advice.knee


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_cli_advise_on_real_groups(group, capsys):
    names, _, allow = GROUPS[group]
    args = ["advise", *(str(real_lora(n)) for n in names), "--max-rank", "4", "--json"]
    assert main(args + (["--allow-base-mismatch"] if allow else [])) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["suggested_k"]) == {"svd", "lego"} and 1 <= payload["suggested_k"]["svd"] <= 4
    assert sum(payload["allocation"].values()) <= payload["budget"]
    assert all(len(c["svd"]) <= 4 and c["lego_k"] for c in payload["curves"])


def test_cli_advise_writes_the_allocated_merge_and_refuses_a_small_budget(tmp_path, toy_adapters, capsys):
    dirs = [str(save_peft_folder(a, tmp_path / a.name)) for a in toy_adapters]
    assert main(["advise", *dirs, "--budget", "18", "--no-lego", "--out", str(tmp_path / "out")]) == 0
    assert "allocated ranks" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "svd" and sum(report["ranks"].values()) == 18 == report["advice"]["budget"]
    assert main(["advise", *dirs, "--budget", "2", "--no-lego"]) == 2
    assert "cannot give each of the 6 modules rank 1" in capsys.readouterr().err


def test_app_panel_suggests_rebudgets_and_the_export_records_it(toy_adapters):
    from lego_viz.ui import advise_panel
    from lego_viz.ui.export_tab import export
    from lego_viz.ui.merging import merged_session
    from lego_viz.ui.state import Session

    session = Session().with_adapters(toy_adapters, replace=True)
    session, advice, figure, text, _slider = advise_panel.suggest(session, 0)
    assert session.advice["budget"] == 6 * advice.knee["svd"] and "Suggested k" in text
    assert {trace.name for trace in figure.data} >= {"svd", "lego"}
    assert figure.layout.xaxis.title.text and figure.layout.yaxis.title.text
    session, advice, _, text = advise_panel.rebudget(session, advice, 20)
    assert sum(session.advice["allocation"].values()) == 20 and "budget of **20**" in text
    session = merged_session(session)
    bars = advise_panel.retention_figure(session)
    assert list(bars.data[0].y) == ["a", "b", "c"] and all(0 < x < 2 for x in bars.data[0].x)
    session, archive, _, _ = export(session)
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        report = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("merge_report.json"))))
    assert report["advice"]["budget"] == 20 and set(report["retention"]) == {"a", "b", "c"}
    assert session.with_selection([True, False, True], [1.0, 1.0, 1.0]).advice is None  # a new selection drops it
