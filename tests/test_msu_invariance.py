"""MSU folding/canonical form and the invariance checks (weight and output space)."""

import pytest
import torch
from conftest import make_adapter

from lego_viz.adapters import LoraModule
from lego_viz.checks.factored import Factored, factored_norm, gram_norm, probe_relative_error, relative_error
from lego_viz.checks.invariance import check_concat_sum, check_outputs, check_permutation
from lego_viz.units.msu import adapter_msus, canonicalize, fold, module_msus, table_to_module


def _dense(table):
    B, A = table.factors()
    return B @ A


def test_fold_keeps_update_and_splits_scale_evenly():
    lora = make_adapter(r=4, alpha=12).modules["model.layers.0.self_attn.q_proj"]
    a, b = fold(lora)
    # float32 products of O(1) entries: 1e-6 relative is rounding, not a bug
    assert torch.allclose(b.T @ a, lora.delta_weight(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(a, lora.A * lora.scale**0.5)


def test_canonical_form_balances_norms_fixes_sign_and_keeps_update():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 10, generator=gen) * 5, torch.randn(6, 7, generator=gen) * 0.01
    ca, cb = canonicalize(a, b)
    assert torch.allclose(ca.norm(dim=1), cb.norm(dim=1), rtol=1e-5)
    peak = ca.gather(1, ca.abs().argmax(1, keepdim=True))
    assert (peak > 0).all()
    assert torch.allclose(cb.T @ ca, b.T @ a, rtol=1e-4, atol=1e-6)
    # (−a, −b) and (c·a, b/c) describe the same unit: the canonical form must not tell them apart
    ca2, cb2 = canonicalize(-3.0 * a, -b / 3.0)
    assert torch.allclose(ca2, ca, atol=1e-5) and torch.allclose(cb2, cb, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e15])
def test_canonical_form_handles_extreme_and_zero_norms(scale):
    a = torch.randn(4, 5) * scale
    b = torch.randn(4, 3)
    b[1] = 0.0  # an untrained unit: lora_B column all zero
    ca, cb = canonicalize(a, b)
    assert torch.isfinite(ca).all() and torch.isfinite(cb).all()
    assert (ca[1] == 0).all() and (cb[1] == 0).all()


def test_module_table_concatenates_with_weights(toy_adapters):
    name = "model.layers.1.mlp.down_proj"
    weights = [1.0, -0.5, 2.0]
    table = module_msus(toy_adapters, name, weights)
    assert table.n == 4 + 2 + 6
    expected = sum(w * a.modules[name].delta_weight() for a, w in zip(toy_adapters, weights))
    assert torch.allclose(_dense(table), expected, rtol=1e-5, atol=1e-6)
    assert table.adapter_index.tolist() == [0] * 4 + [1] * 2 + [2] * 6
    perm = torch.randperm(table.n, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_dense(table.permute(perm)), expected, rtol=1e-5, atol=1e-6)
    rebuilt = table_to_module(table)
    assert rebuilt.scale == 1.0 and torch.allclose(rebuilt.delta_weight(), expected, rtol=1e-5, atol=1e-6)


def test_feature_modes_shapes(toy_adapters):
    table = adapter_msus(toy_adapters)["model.layers.0.self_attn.q_proj"]
    for mode in ("raw", "canonical", "normalized"):
        assert table.features(mode).shape == (table.n, table.d_in + table.d_out)
    halves = table.features("normalized")
    assert torch.allclose(halves[:, : table.d_in].norm(dim=1), torch.ones(table.n), atol=1e-5)
    with pytest.raises(ValueError, match="unknown feature mode"):
        table.features("whitened")


@pytest.mark.parametrize("d_out,d_in,m", [(40, 30, 5), (7, 50, 12), (64, 8, 3)])
def test_factored_and_gram_norms_equal_dense_norm(d_out, d_in, m):
    gen = torch.Generator().manual_seed(d_out)
    f = Factored(torch.randn(d_out, m, generator=gen), torch.randn(m, d_in, generator=gen))
    dense = torch.linalg.matrix_norm(f.B @ f.A).item()
    assert factored_norm(f) == pytest.approx(dense, rel=1e-5)
    assert gram_norm(f) == pytest.approx(dense, rel=1e-6)


def test_factored_apply_equals_the_dense_update_on_probe_rows():
    gen = torch.Generator().manual_seed(3)
    B1, A1 = torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    B2, A2 = torch.randn(30, 2, generator=gen), torch.randn(2, 20, generator=gen)
    f = Factored(B1, A1, scale=0.5) - Factored(B2, A2, scale=2.0)
    x = torch.randn(3, 20, generator=gen)
    dense = 0.5 * B1 @ A1 - 2.0 * B2 @ A2
    torch.testing.assert_close(f.apply(x), (dense @ x.T).T, rtol=1e-5, atol=1e-5)


def test_relative_error_detects_a_small_difference():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    A2 = A.clone()
    A2[0, 0] += 1e-2
    dense = torch.linalg.matrix_norm(B @ A - B @ A2) / torch.linalg.matrix_norm(B @ A)
    assert relative_error(Factored(B, A), Factored(B, A2)) == pytest.approx(dense.item(), rel=1e-3)
    assert probe_relative_error(Factored(B, A), Factored(B, A2)) > 0


def test_permutation_check_passes_and_a_only_shuffle_fails(toy_adapters):
    ok = check_permutation(toy_adapters, seed=3)
    assert ok.passed and ok.max_rel_error < 1e-5 and len(ok.per_module) == 3 * 6
    broken = check_permutation(toy_adapters, seed=3, shuffle="a_only")
    assert not broken.passed and broken.max_rel_error > 0.1 and not broken.expect_pass


def test_concat_sum_check_passes_with_weights(toy_adapters):
    result = check_concat_sum(toy_adapters, weights=[0.3, 1.0, -2.0])
    assert result.passed and result.max_rel_error < 1e-5
    data = result.to_dict()
    assert {"max_rel_error", "passed", "tolerance", "per_module"} <= set(data)


def test_concat_sum_check_can_fail():
    """A check that cannot fail is a bug: a corrupted concatenation must be caught."""
    adapters = [make_adapter("a", seed=1), make_adapter("b", seed=2)]
    import lego_viz.checks.invariance as inv

    original = inv.module_msus

    def corrupted(ads, name, weights=None):
        table = original(ads, name, weights)
        table.b = table.b * 1.01
        return table

    inv.module_msus = corrupted
    try:
        assert not check_concat_sum(adapters).passed
    finally:
        inv.module_msus = original


def test_output_space_checks(toy_model, toy_adapters):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    diffs = check_outputs(toy_model, ids, toy_adapters, weights=[1.0, 0.5, 1.0])
    # float32 logits of a 2-layer model: differences from summation order are ~1e-6
    assert diffs["permutation"] < 1e-4
    assert diffs["concat_sum"] < 1e-4
    assert diffs["permutation_a_only"] > 1e-3


def test_hooks_match_dense_weight_update(toy_model):
    from lego_viz.checks.invariance import logits_with

    adapter = make_adapter(r=3, seed=5)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    hooked = logits_with(toy_model, ids, adapter.modules)
    named = dict(toy_model.named_modules())
    saved = {n: named[n].weight.detach().clone() for n in adapter.modules}
    try:
        with torch.no_grad():
            for n, lora in adapter.modules.items():
                named[n].weight += lora.delta_weight()
            dense = toy_model(input_ids=ids).logits
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                named[n].weight.copy_(w)
    assert torch.allclose(hooked, dense, atol=1e-5)


def test_lora_module_properties():
    lora = LoraModule(A=torch.zeros(3, 5), B=torch.zeros(7, 3), scale=2.0)
    assert (lora.r, lora.d_in, lora.d_out) == (3, 5, 7)


@pytest.mark.parametrize("check", [check_permutation, check_concat_sum])
def test_probe_mode_agrees_with_exact_mode(toy_adapters, check):
    exact = check(toy_adapters, exact=True)
    probe = check(toy_adapters, exact=False)
    assert exact.method == "exact" and probe.method == "probe"
    assert probe.passed and probe.max_rel_error < 1e-5 and set(probe.per_module) == set(exact.per_module)
    broken = check_permutation(toy_adapters, shuffle="a_only", exact=False)
    assert not broken.passed  # the probe sees the broken pairing too


def test_large_inputs_switch_to_probe_automatically(monkeypatch, toy_adapters):
    import lego_viz.checks.invariance as inv

    assert check_permutation(toy_adapters).method == "exact"
    monkeypatch.setattr(inv, "EXACT_BUDGET", 10.0)
    assert check_permutation(toy_adapters).method == "probe"
    assert check_concat_sum(toy_adapters).method == "probe"
