"""Router over merged MSUs: with every unit active and unit gates it is exactly the sum of the adapters."""

from __future__ import annotations

import pytest
import torch
from test_smora_model import HIDDEN, LAYERS, tiny_llama, token_batch

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.smora import smora_layers, smora_parameters
from lego_viz.smora.merged import concatenated_units, inject_merged_router, merged_router_config

TARGETS = ("q_proj", "v_proj")


def random_adapter(name: str, r: int, seed: int, targets: tuple[str, ...] = TARGETS) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{i}.self_attn.{t}": LoraModule(
            A=torch.randn(r, HIDDEN, generator=generator) / HIDDEN**0.5,
            B=torch.randn(HIDDEN, r, generator=generator) / r**0.5,
            scale=2.0 / r,
        )
        for i in range(LAYERS)
        for t in targets
    }
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2, "base_model_name_or_path": "tiny-llama"}
    return LoraAdapter(name=name, source="memory", config=config, modules=modules)


def adapters_set() -> list[LoraAdapter]:
    return [random_adapter("a", 2, 0), random_adapter("b", 3, 1), random_adapter("c", 1, 2)]


def test_units_and_config() -> None:
    adapters = adapters_set()
    init, names = concatenated_units(adapters)
    assert names == ["a", "b", "c"]
    module = "model.layers.1.self_attn.v_proj"
    assert init[module]["lora_A"].shape == (6, HIDDEN) and init[module]["lora_B"].shape == (HIDDEN, 6)
    assert init[module]["unit_source"].tolist() == [0, 0, 1, 1, 1, 2]
    config = merged_router_config(adapters, k=2, gamma=0.01)
    assert (config.r, config.k, config.lora_alpha, config.gamma, config.train_lora) == (6, 2, 2.0, 0.01, False)
    assert config.sources == ("a", "b", "c")


def test_unequal_unit_counts_are_refused() -> None:
    adapters = [random_adapter("a", 2, 0), random_adapter("b", 3, 1, targets=("q_proj",))]
    with pytest.raises(ValueError, match="different numbers of units"):
        concatenated_units(adapters)


def test_all_units_with_unit_gates_equal_the_summed_adapters() -> None:
    adapters = adapters_set()
    x = token_batch(5)
    expected_model = tiny_llama()
    with torch.no_grad():
        for name in adapters[0].modules:
            layer = expected_model.get_submodule(name)
            layer.weight += sum(a.modules[name].delta_weight() for a in adapters)
    expected = expected_model(x).logits

    model = tiny_llama()
    layers = inject_merged_router(model, adapters, k=6)
    assert sorted(layers) == sorted(adapters[0].modules)
    assert all(p.shape[0] == 6 and p.shape[1] == HIDDEN for p in smora_parameters(model))  # only routers train
    with torch.no_grad():
        for layer in smora_layers(model).values():
            layer.router.weight.zero_()  # σ = 0.5 everywhere, β = 0: all 6 gates are exactly 1
    # W0 x + Σ_t ΔW_t x factored vs merged into W0: float32 reassociation through 2 layers (~1e-6 here)
    assert torch.allclose(model(x).logits, expected, atol=1e-5)

    # with fewer active units than units, the output is no longer the full sum
    sparse = tiny_llama()
    inject_merged_router(sparse, adapters, k=2)
    assert not torch.allclose(sparse(x).logits, expected, atol=1e-3)
