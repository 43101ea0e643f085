"""Merge methods: exact special cases, permutation invariance, and agreement with PEFT."""

import pytest
import torch
from conftest import TOY_HIDDEN, TOY_INTER, TOY_KV, TOY_LAYERS, make_adapter, save_peft_folder

from lego_viz.adapters import AdapterError
from lego_viz.merge import MERGE_METHODS, MergeError, merge
from lego_viz.units.msu import permute_adapter

NO_REWEIGHT = {"param_reweight": "none", "output_reweight": False}


def dense_sum(adapters, weights=None):
    weights = weights or [1.0] * len(adapters)
    names = dict.fromkeys(n for a in adapters for n in a.modules)
    return {n: sum(w * a.modules[n].delta_weight() for a, w in zip(adapters, weights) if n in a.modules) for n in names}


def assert_same_updates(merged_modules, expected, rtol=1e-4, atol=1e-6):
    assert set(merged_modules) == set(expected)
    for name, lora in merged_modules.items():
        assert torch.allclose(lora.delta_weight(), expected[name], rtol=rtol, atol=atol), name


@pytest.mark.parametrize("features", ["raw", "canonical", "normalized"])
def test_lego_single_adapter_k_equals_r_is_identity(features):
    adapter = make_adapter(r=5, seed=4)
    merged = merge([adapter], "lego", k=5, features=features, **NO_REWEIGHT)
    assert_same_updates(merged.modules, dense_sum([adapter]))


@pytest.mark.parametrize("features", ["raw", "canonical", "normalized"])
def test_lego_k_equals_n_is_the_weighted_sum(toy_adapters, features):
    weights = [1.0, 0.25, -0.5]
    merged = merge(toy_adapters, "lego", k=12, weights=weights, features=features, **NO_REWEIGHT)
    assert_same_updates(merged.modules, dense_sum(toy_adapters, weights))


@pytest.mark.parametrize("features", ["raw", "canonical", "normalized"])
@pytest.mark.parametrize("k", [3, 7])
def test_lego_is_invariant_to_permuting_input_ranks(toy_adapters, features, k):
    gen = torch.Generator().manual_seed(11)
    shuffled = [permute_adapter(a, gen)[0] for a in toy_adapters]
    first = merge(toy_adapters, "lego", k=k, features=features)
    second = merge(shuffled, "lego", k=k, features=features)
    for name in first.modules:
        assert torch.allclose(first.modules[name].A, second.modules[name].A, atol=1e-5), name
        assert torch.allclose(first.modules[name].B, second.modules[name].B, atol=1e-5), name
        assert first.cluster_sizes()[name] == second.cluster_sizes()[name]


@pytest.mark.parametrize("k", [5, 6, 7])
def test_lego_merging_an_adapter_with_its_copy_uses_every_rank(k):
    # Every unit twice (identical points): no cluster may be left empty, i.e. no merged rank is zero.
    merged = merge([make_adapter("a", r=4, seed=1), make_adapter("b", r=4, seed=1)], "lego", k=k)
    assert all(min(sizes) >= 1 for sizes in merged.cluster_sizes().values()), merged.cluster_sizes()
    assert all((m.A.norm(dim=1) > 0).all() for m in merged.modules.values())


def test_lego_clusters_recover_planted_groups():
    """Units planted as noisy copies of 3 prototypes must come back as 3 pure clusters."""
    gen = torch.Generator().manual_seed(0)
    proto_a, proto_b = torch.randn(3, 20, generator=gen), torch.randn(10, 3, generator=gen)
    adapters = []
    for t in range(4):
        A = proto_a + 0.01 * torch.randn(3, 20, generator=gen)
        B = proto_b + 0.01 * torch.randn(10, 3, generator=gen)
        from lego_viz.adapters import LoraAdapter, LoraModule

        adapters.append(LoraAdapter(name=f"t{t}", source="mem", config={"r": 3, "lora_alpha": 3, "base_model_name_or_path": "x"},
                                    modules={"m": LoraModule(A=A, B=B, scale=1.0)}))
    merged = merge(adapters, "lego", k=3, features="raw", **NO_REWEIGHT)
    labels = merged.labels["m"].view(4, 3)
    assert (labels == labels[0]).all()  # unit i of every adapter lands in the same cluster
    assert merged.cluster_sizes()["m"] == [4, 4, 4]
    assert merged.cluster_composition("m").tolist() == [[1, 1, 1, 1]] * 3


def test_parameter_reweighting_restores_member_norms():
    gen = torch.Generator().manual_seed(1)
    from lego_viz.adapters import LoraAdapter, LoraModule

    A, B = torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    # two misaligned copies of each unit shrink when averaged
    adapters = [LoraAdapter(name=n, source="mem", config={"r": 2, "lora_alpha": 2}, modules={"m": LoraModule(A=a, B=B, scale=1.0)})
                for n, a in (("x", A), ("y", A + torch.randn(2, 6, generator=gen)))]
    plain = merge(adapters, "lego", k=2, features="raw", **NO_REWEIGHT)
    rew = merge(adapters, "lego", k=2, features="raw", param_reweight="l2", output_reweight=False)
    norm = lambda lora: torch.cat([lora.A, lora.B.T], 1).norm(dim=1)  # noqa: E731
    members = torch.cat([torch.stack([a.modules["m"].A[i] for a in adapters]) for i in range(2)])
    assert (norm(rew.modules["m"]) >= norm(plain.modules["m"]) - 1e-6).all()
    assert norm(rew.modules["m"]).mean() > 0 and members.numel() > 0


def test_output_reweighting_scales_update_by_sqrt_mean_rank_over_k(toy_adapters):
    off = merge(toy_adapters, "lego", k=3, param_reweight="none", output_reweight=False)
    on = merge(toy_adapters, "lego", k=3, param_reweight="none", output_reweight=True)
    factor = ((4 + 2 + 6) / 3 / 3) ** 0.5
    for name in off.modules:
        assert torch.allclose(on.modules[name].delta_weight(), factor * off.modules[name].delta_weight(), rtol=1e-4, atol=1e-7)


def test_per_module_k_and_paper_preset(toy_adapters):
    merged = merge(toy_adapters, "lego", k={"q_proj": 2, "*": 5}, preset="paper")
    assert {n: m.r for n, m in merged.modules.items() if "q_proj" in n} == {f"model.layers.{i}.self_attn.q_proj": 2 for i in range(2)}
    assert all(m.r == 5 for n, m in merged.modules.items() if "q_proj" not in n)
    assert merged.options["features"] == "raw" and merged.options["param_reweight"] == "linf"


def test_linear_is_exact_for_different_ranks(toy_adapters):
    merged = merge(toy_adapters, "linear", weights=[2.0, 1.0, 0.5])
    assert_same_updates(merged.modules, dense_sum(toy_adapters, [2.0, 1.0, 0.5]))
    assert all(m.r == 12 for m in merged.modules.values())


def test_svd_is_best_rank_k_of_the_sum(toy_adapters):
    merged = merge(toy_adapters, "svd", k=3)
    for name, target in dense_sum(toy_adapters).items():
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert torch.allclose(merged.modules[name].delta_weight(), best, rtol=1e-3, atol=1e-5), name


# ----------------------------------------------------------------------------- agreement with PEFT


def _peft_merge(adapters, tmp_path, weights, combination_type, **kwargs):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=TOY_HIDDEN, intermediate_size=TOY_INTER, num_hidden_layers=TOY_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2)
    assert TOY_KV == TOY_HIDDEN // 4 * 2
    base = LlamaForCausalLM(config)
    dirs = [save_peft_folder(a, tmp_path / a.name) for a in adapters]
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=adapters[0].name)
    for adapter, folder in zip(adapters[1:], dirs[1:]):
        model.load_adapter(str(folder), adapter_name=adapter.name)
    model.add_weighted_adapter([a.name for a in adapters], weights, "merged", combination_type=combination_type, **kwargs)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and "merged" in m.lora_A}
    return {n: layers[n].get_delta_weight("merged").detach() for n in adapters[0].modules}


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, -0.3]])
def test_linear_equals_peft_cat(tmp_path, weights):
    adapters = [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=3, alpha=6, seed=2)]
    expected = _peft_merge(adapters, tmp_path, weights, "cat")
    assert_same_updates(merge(adapters, "linear", weights=weights).modules, expected)


def test_svd_equals_peft_svd(tmp_path):
    adapters = [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=4, alpha=4, seed=2)]
    expected = _peft_merge(adapters, tmp_path, [1.0, 0.5], "svd", svd_rank=3)
    # both truncate the same SVD; float32 SVD of different matrices (dense vs core) agrees to ~1e-5
    assert_same_updates(merge(adapters, "svd", k=3, weights=[1.0, 0.5]).modules, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method,kwargs,ours", [
    ("linear", {}, ("peft_linear", {})),
    ("ties", {"density": 0.5}, ("ties", {"density": 0.5})),
    ("ties", {"density": 0.8, "majority_sign_method": "frequency"}, ("ties", {"density": 0.8, "majority_sign_method": "frequency"})),
])
def test_peft_style_methods_reproduce_peft(tmp_path, method, kwargs, ours):
    adapters = [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=4, alpha=16, seed=2)]
    weights = [1.0, -0.6]
    expected = _peft_merge(adapters, tmp_path, weights, method, **kwargs)
    assert_same_updates(merge(adapters, ours[0], weights=weights, **ours[1]).modules, expected, rtol=1e-5, atol=1e-7)


def test_dare_linear_is_seeded_and_reduces_to_peft_linear_at_full_density():
    # PEFT draws DARE masks from the global RNG after its own weight init, so bit-equality with a
    # PEFT run is not defined; what must hold is reproducibility and the density semantics.
    adapters = [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=4, alpha=16, seed=2)]
    ours = merge(adapters, "dare_linear", density=0.6, seed=5)
    again = merge(adapters, "dare_linear", density=0.6, seed=5)
    other = merge(adapters, "dare_linear", density=0.6, seed=6)
    name = next(iter(ours.modules))
    assert torch.equal(ours.modules[name].A, again.modules[name].A)
    assert not torch.equal(ours.modules[name].A, other.modules[name].A)
    full = merge(adapters, "dare_linear", density=1.0)
    assert_same_updates(full.modules, {n: m.delta_weight() for n, m in merge(adapters, "peft_linear").modules.items()})
    single = merge(adapters[:1], "dare_linear", density=0.25, seed=0)
    kept = torch.cat([(m.A != 0).flatten().float() for m in single.modules.values()]).mean()
    assert 0.15 < kept < 0.35  # Bernoulli(0.25) over ~1000 entries: ±0.1 is > 7 standard deviations


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,pattern", [
    (lambda ads: merge(ads, "kmeans++"), "unknown merge method 'kmeans\\+\\+'; valid methods: .*lego"),
    (lambda ads: merge(ads, "lego", k=13), "k=13 is out of range .* n=12"),
    (lambda ads: merge(ads, "lego", k=0), "k=0 is out of range"),
    (lambda ads: merge(ads, "lego", k=2.5), "whole number"),
    (lambda ads: merge(ads, "lego", k={"q_prj": 2, "*": 3}), "k pattern 'q_prj' matches no module.*e.g. q_proj"),
    (lambda ads: merge(ads, "lego", k={"q(": 2}), "k pattern 'q\\(' is not a valid regular expression"),
    (lambda ads: merge(ads, "lego", k=3, feature="raw"), "unknown option\\(s\\) feature .* valid options: features"),
    (lambda ads: merge(ads, "lego", features="whitened"), "must be one of raw, canonical, normalized"),
    (lambda ads: merge(ads, "lego", n_init=0), "n_init"),
    (lambda ads: merge(ads, "linear", k=4), "takes no k"),
    (lambda ads: merge(ads, "ties"), "equal ranks"),
    (lambda ads: merge(ads, "lego", weights=[1.0, 2.0]), "3 adapters"),
    (lambda ads: merge(ads, "lego", weights=[0.0, 0.0, 0.0]), "all adapter weights are zero"),
    (lambda ads: merge(ads, "lego", weights=[float("nan"), 1.0, 1.0]), "finite"),
    (lambda ads: merge(ads, "lego", preset="fancy"), "unknown preset"),
    (lambda ads: merge([], "lego"), "no adapters"),
])
def test_bad_merge_requests_fail_clearly(toy_adapters, call, pattern):
    with pytest.raises(AdapterError, match=pattern):
        call(toy_adapters)


def test_mismatched_bases_and_shapes_are_refused(toy_adapters):
    other = make_adapter("gpt", base="gpt2", seed=9)
    with pytest.raises(MergeError.__mro__[1], match="different base models"):
        merge([toy_adapters[0], other], "lego")
    merged = merge([toy_adapters[0], other], "linear", allow_base_mismatch=True)
    assert any("allowed by request" in w for w in merged.warnings)
    wide = make_adapter("wide", shapes={"model.layers.0.self_attn.q_proj": (TOY_HIDDEN, 2 * TOY_HIDDEN)})
    with pytest.raises(AdapterError, match="d_out=64 but"):
        merge([toy_adapters[0], wide], "lego")


def test_registry_lists_methods_with_options():
    assert {"lego", "linear", "svd", "peft_linear", "ties", "dare_linear"} <= set(MERGE_METHODS)
    assert MERGE_METHODS["lego"].takes_k and not MERGE_METHODS["linear"].takes_k
    assert "features" in MERGE_METHODS["lego"].options


@pytest.mark.parametrize("features", ["raw", "canonical", "normalized"])
def test_gram_from_raw_factors_equals_gram_of_explicit_features(toy_adapters, features):
    """The merge never materialises features; its Gram matrix must equal the explicit one."""
    from lego_viz.merge.lego import _units
    from lego_viz.units.msu import module_msus

    weights = [1.0, -0.5, 2.0]
    toy_adapters[1].modules["model.layers.0.self_attn.q_proj"].B[:, 0] = 0.0  # an untrained unit
    name = "model.layers.0.self_attn.q_proj"
    explicit = module_msus(toy_adapters, name, weights).features(features)
    fast = torch.from_numpy(_units(toy_adapters, weights, name, features)[0].gram())
    # float32 products summed in another order: 1e-5 relative
    assert torch.allclose(fast, explicit @ explicit.T, rtol=1e-4, atol=1e-5)
    # The sketch path (adapter libraries) clusters the points themselves: the same features.
    _, points = _units(toy_adapters, weights, name, features, gram=False)
    assert torch.allclose(torch.from_numpy(points), explicit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("features", ["canonical", "normalized"])
def test_sign_ties_break_the_same_way_in_the_map_and_the_merge(toy_adapters, features):
    """A row of A whose largest |entry| occurs as both −m and +m (common in low-precision weights):
    the map (msu features) and the merge must pick the same sign, or the map misreports the clusters."""
    from lego_viz.merge.lego import _units
    from lego_viz.units.msu import module_msus

    name = "model.layers.0.self_attn.q_proj"
    A = toy_adapters[0].modules[name].A
    peak = float(A.abs().max()) * 2
    A[1, 0], A[1, 5] = -peak, peak  # negative first
    A[2, 3], A[2, 7] = peak, -peak  # positive first
    explicit = module_msus(toy_adapters, name).features(features)
    fast = torch.from_numpy(_units(toy_adapters, [1.0] * 3, name, features)[0].gram())
    assert torch.allclose(fast, explicit @ explicit.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("method", "k"), [("lego", 5), ("svd", 5), ("linear", None)])
def test_half_precision_inputs_merge_in_float32(toy_adapters, method, k):
    """bf16 checkpoints merge exactly as their float32 upcast: nothing is accumulated in bf16."""
    from lego_viz.adapters import LoraAdapter, LoraModule

    def cast(adapter, dtype):
        modules = {n: LoraModule(m.A.to(dtype), m.B.to(dtype), m.scale, m.fan_in_fan_out) for n, m in adapter.modules.items()}
        return LoraAdapter(name=adapter.name, source=adapter.source, config=adapter.config, modules=modules)

    half = [cast(a, torch.bfloat16) for a in toy_adapters]
    full = [cast(a, torch.float32) for a in half]  # the same values, upcast
    options = {"k": k} if k is not None else {}
    merged_half, merged_full = merge(half, method, **options), merge(full, method, **options)
    for name, lora in merged_full.modules.items():
        assert merged_half.modules[name].A.dtype == torch.float32, name
        assert torch.equal(merged_half.modules[name].A, lora.A) and torch.equal(merged_half.modules[name].B, lora.B), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_lego_asked_for_cuda_without_a_gpu_says_so(toy_adapters):
    # Gram k-means runs on the CPU whatever the device, but a device asked for by name must exist.
    with pytest.raises(MergeError, match="no CUDA GPU"):
        merge(toy_adapters, "lego", k=4, device="cuda")
