"""Merge lab methods (ARCHITECTURE §5.2): Core Space and KnOTS — exact special cases, their merge rules on
hand-built inputs, and PEFT round trips."""

import pytest
import torch
from conftest import make_adapter, real_lora
from test_export import _assert_peft_deltas_match, _peft_load, _toy_base
from test_merge import assert_same_updates, dense_sum

from lego_viz.adapters import load_adapters
from lego_viz.export.folder import export_adapter
from lego_viz.merge import MERGE_METHODS, merge
from lego_viz.merge.core_space import module_cores, tsv_merge
from lego_viz.merge.knots import aligned_blocks, merge_blocks
from lego_viz.units.msu import module_msus

LAB_METHODS = ("core_space", "knots")
WEIGHTS = [1.0, 0.5, -2.0]


def test_core_space_task_arithmetic_without_truncation_is_the_weighted_sum(toy_adapters):
    n = sum(a.modules["model.layers.0.self_attn.q_proj"].r for a in toy_adapters)  # 12 units per module
    merged = merge(toy_adapters, "core_space", k=n, weights=WEIGHTS, merge="ta")
    # float32 QR + SVD of 12×12 cores: errors ~1e-6 of the entries (~0.05), so 1e-4 relative is a safe bound
    assert_same_updates(merged.modules, dense_sum(toy_adapters, WEIGHTS), rtol=1e-4, atol=1e-5)


def test_core_space_task_arithmetic_truncated_equals_svd(toy_adapters):
    core = merge(toy_adapters, "core_space", k=5, weights=WEIGHTS, merge="ta")
    svd = merge(toy_adapters, "svd", k=5, weights=WEIGHTS)
    assert_same_updates(core.modules, {n: m.delta_weight() for n, m in svd.modules.items()}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "options"), [
    ("core_space", {"merge": "ta"}), ("core_space", {"merge": "tsv"}), ("core_space", {"merge": "ties", "density": 1.0}),
    ("knots", {"density": 1.0}), ("knots", {"rule": "dare_ties", "density": 1.0}),
])
def test_one_adapter_at_its_own_rank_is_reproduced(method, options):
    adapter = make_adapter(r=5, seed=4)
    merged = merge([adapter], method, k=5, **options)
    assert merged.ranks == dict.fromkeys(adapter.modules, 5)
    assert_same_updates(merged.modules, dense_sum([adapter]), rtol=1e-4, atol=1e-5)


def test_core_bases_reconstruct_every_adapter(toy_adapters):
    table = module_msus(toy_adapters, "model.layers.1.mlp.down_proj", WEIGHTS)
    B, A = table.factors()
    U_B, cores, V_A = module_cores(B, A, [4, 2, 6])
    assert torch.allclose(U_B.T @ U_B, torch.eye(U_B.shape[1]), atol=1e-5)
    for t, blk in enumerate([slice(0, 4), slice(4, 6), slice(6, 12)]):
        assert torch.allclose(U_B @ cores[t] @ V_A.T, B[:, blk] @ A[blk], atol=1e-5), t


def test_tsv_keeps_orthogonal_tasks_and_decorrelates_overlapping_ones():
    e = torch.eye(4)
    first, second = 3.0 * torch.outer(e[0], e[1]), 2.0 * torch.outer(e[2], e[3])
    # disjoint directions: nothing to decorrelate, TSV is the plain sum
    assert torch.allclose(tsv_merge([first, second], [1, 1]), first + second, atol=1e-6)
    # the same direction twice: the kept vectors are made orthonormal, so ‖result‖_F² = Σ s² = 9 + 4,
    # where the plain sum 5·e0 e1ᵀ has 25
    same = tsv_merge([first, 2.0 / 3.0 * first], [1, 1])
    assert torch.linalg.matrix_norm(same).square().item() == pytest.approx(13.0, rel=1e-5)
    assert torch.linalg.matrix_rank(same) == 2


def test_knots_ties_trims_elects_sign_and_takes_disjoint_means():
    one = torch.tensor([[4.0, -1.0, 0.2, 2.0, 1.5]])
    two = torch.tensor([[6.0, 3.0, -0.1, -5.0, 0.1]])
    # density 0.4 of 5 entries keeps 2 per block: {4, 2} and {6, -5}; column 3 elects − (2 − 5 < 0) and
    # keeps only −5; column 0 agrees and averages (4 + 6) / 2.
    merged = merge_blocks([one, two], "ties", density=0.4, sign_method="total", seed=0)
    assert torch.equal(merged, torch.tensor([[5.0, 0.0, 0.0, -5.0, 0.0]]))


def test_knots_dare_ties_is_seeded():
    blocks = [torch.randn(6, 40, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    first = merge_blocks(blocks, "dare_ties", 0.5, "total", seed=3)
    assert torch.equal(first, merge_blocks(blocks, "dare_ties", 0.5, "total", seed=3))
    assert not torch.equal(first, merge_blocks(blocks, "dare_ties", 0.5, "total", seed=4))


def test_knots_blocks_are_the_svd_of_the_concatenation(toy_adapters):
    table = module_msus(toy_adapters, "model.layers.0.self_attn.v_proj", WEIGHTS)
    B, A = table.factors()
    U, blocks = aligned_blocks(B, A, [4, 2, 6])
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)
    for t, blk in enumerate([slice(0, 4), slice(4, 6), slice(6, 12)]):
        assert torch.allclose(U @ blocks[t], B[:, blk] @ A[blk], atol=1e-5), t
    # the rows of [Σ V_1ᵀ … Σ V_Tᵀ] are orthogonal: their Gram is diagonal (the squared singular values)
    stacked = torch.cat(blocks, dim=1)
    gram = stacked @ stacked.T
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-5)


def test_knots_output_has_rank_at_most_k(toy_adapters):
    merged = merge(toy_adapters, "knots", k=3)
    for lora in merged.modules.values():
        assert lora.r == 3 and torch.linalg.matrix_rank(lora.delta_weight()) <= 3


@pytest.mark.parametrize("method", LAB_METHODS)
def test_lab_methods_run_from_the_registry_with_defaults_and_reload_in_peft(tmp_path, toy_adapters, method):
    assert MERGE_METHODS[method].takes_k and not MERGE_METHODS[method].equal_ranks
    merged = merge(toy_adapters, method=method, k=4)  # mixed ranks 4, 2, 6
    model, missing, unexpected = _peft_load(_toy_base(), export_adapter(merged, tmp_path / method, adapters=toy_adapters))
    assert missing == [] and unexpected == []
    _assert_peft_deltas_match(model, merged)


@pytest.mark.parametrize("method", LAB_METHODS)
def test_lab_methods_merge_real_adapters(method):
    adapters = load_adapters([real_lora("gpt2_seqcls_stathopoan"), real_lora("gpt2_r16_bin_yijundeng")])
    merged = merge(adapters, method, k=8)
    assert set(merged.modules) == set(adapters[0].modules)
    assert all(torch.isfinite(m.A).all() and torch.isfinite(m.B).all() and m.r == 8 for m in merged.modules.values())


def test_cli_merges_with_lab_options_and_the_recipe_reproduces_them(tmp_path, toy_adapters):
    import json

    from conftest import save_peft_folder
    from safetensors.torch import load_file

    from lego_viz.cli.commands import main

    dirs = [str(save_peft_folder(a, tmp_path / a.name)) for a in toy_adapters]
    assert main(["merge", *dirs, "--method", "core_space", "--k", "3", "--option", "merge=ties", "--density", "0.5",
                 "--no-checks", "--out", str(tmp_path / "one")]) == 0
    report = json.loads((tmp_path / "one" / "merge_report.json").read_text())
    assert report["options"]["merge"] == "ties" and report["options"]["density"] == 0.5
    assert main(["merge", "--recipe", str(tmp_path / "one" / "recipe.yaml"), "--no-checks", "--out", str(tmp_path / "two")]) == 0
    first, second = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert main(["merge", *dirs, "--method", "knots", "--option", "rule=fancy", "--out", str(tmp_path / "bad")]) == 2


# ----------------------------------------------------------------------------- lego rescale=lsq


def _relative_errors(merged, adapters, weights):
    target = dense_sum(adapters, weights)
    return {n: (m.delta_weight() - target[n]).norm().item() / target[n].norm().item() for n, m in merged.modules.items()}


@pytest.mark.parametrize("k", [2, 5, 9])
def test_lsq_rescale_is_never_worse_than_the_unscaled_centroids(toy_adapters, k):
    plain = _relative_errors(merge(toy_adapters, "lego", k=k, weights=WEIGHTS, param_reweight="none", output_reweight=False),
                             toy_adapters, WEIGHTS)
    fitted = _relative_errors(merge(toy_adapters, "lego", k=k, weights=WEIGHTS, rescale="lsq"), toy_adapters, WEIGHTS)
    for name in plain:
        assert fitted[name] <= plain[name] + 1e-6, name  # s = 1 is feasible, so the optimum can only be lower
    assert sum(fitted.values()) < 0.99 * sum(plain.values())


def test_lsq_rescale_equals_the_dense_least_squares_solution(toy_adapters):
    k = 4
    plain = merge(toy_adapters, "lego", k=k, weights=WEIGHTS, param_reweight="none", output_reweight=False)
    # the reweightings only rescale units, which the fit undoes: with them on the answer is the same
    fitted = merge(toy_adapters, "lego", k=k, weights=WEIGHTS, rescale="lsq")
    target = dense_sum(toy_adapters, WEIGHTS)
    for name, lora in plain.modules.items():
        units = torch.stack([torch.outer(lora.B[:, j], lora.A[j]).flatten() for j in range(k)], dim=1).double()
        s = torch.linalg.lstsq(units, target[name].flatten().double()[:, None]).solution[:, 0]
        expected = (units @ s).reshape(target[name].shape).float()
        # float32 factors, float64 solves on both sides: agreement to ~1e-6 of the entries
        assert torch.allclose(fitted.modules[name].delta_weight(), expected, rtol=1e-4, atol=1e-6), name


# ----------------------------------------------------------------------------- retention


def test_retention_equals_the_dense_projection(toy_adapters):
    from lego_viz.checks.retention import retention

    merged = merge(toy_adapters, "lego", k=4, weights=WEIGHTS)
    scores = retention(merged.modules, toy_adapters, WEIGHTS)
    for adapter, w in zip(toy_adapters, WEIGHTS):
        dense = {n: (merged.modules[n].delta_weight() * (w * lora.delta_weight())).sum() / (w * lora.delta_weight()).square().sum()
                 for n, lora in adapter.modules.items()}
        assert scores[adapter.name]["per_module"] == pytest.approx({n: float(v) for n, v in dense.items()}, rel=1e-4, abs=1e-6)
        assert scores[adapter.name]["mean"] == pytest.approx(sum(map(float, dense.values())) / len(dense), rel=1e-4)
    alone = retention(merge([toy_adapters[0]], "linear").modules, [toy_adapters[0]], [1.0])
    assert alone["a"]["mean"] == pytest.approx(1.0, rel=1e-5)  # a merge that is the adapter keeps all of it


def test_report_holds_retention_per_adapter(tmp_path, toy_adapters):
    import json

    merged = merge(toy_adapters, "core_space", k=3)
    report = json.loads((export_adapter(merged, tmp_path / "r", adapters=toy_adapters) / "merge_report.json").read_text())
    assert set(report["retention"]) == {"a", "b", "c"}
    assert all(0.0 < entry["mean"] < 1.5 for entry in report["retention"].values())


def test_spearman_of_the_retention_benchmark():
    from benchmarks.retention_accuracy import spearman

    assert spearman([0.1, 0.5, 0.9, 2.0], [0.0, 0.2, 0.3, 0.9]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1.0, 2.0, 3.0], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 0.0]) == pytest.approx(0.2582, abs=1e-4)  # ties: average ranks
    assert spearman([1.0, 2.0], [0.0, 0.0]) != spearman([1.0, 2.0], [0.0, 0.0])  # constant accuracy: nan, not 0
