"""SMoRA layer: routing maths, shapes, config validation and exactness against a plain PEFT LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lego_viz.smora import SMoRAConfig, SMoRALinear, balance_update, load_balance, route

D_IN, D_OUT = 12, 10


class OneLayer(nn.Module):
    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.proj = Conv1D(D_OUT, D_IN) if conv else nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def random_layer(config: SMoRAConfig, conv: bool = False, seed: int = 0) -> SMoRALinear:
    torch.manual_seed(seed)
    layer = SMoRALinear(OneLayer(conv).proj, config)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; give the update something to show
    return layer


@pytest.mark.parametrize("gate", ["authors", "sigma"])
@pytest.mark.parametrize(("r", "k", "p"), [(8, 3, 1), (8, 4, 2), (6, 6, 3)])
def test_gates_select_k_ranks_and_sum_to_k(gate: str, r: int, k: int, p: int) -> None:
    torch.manual_seed(1)
    n_routes = r // p
    sigma = torch.rand(5, 7, n_routes)
    beta = 0.1 * torch.randn(n_routes)
    gates, top = route(sigma, beta, k // p, gate, p)
    assert gates.shape == (5, 7, r) and top.shape == (5, 7, k // p)
    assert ((gates != 0).sum(-1) == k).all()
    # float32 sum of k numbers near 1: a few ulps of k
    assert torch.allclose(gates.sum(-1), torch.full((5, 7), float(k)), atol=1e-5)
    # blocks of p ranks route together
    blocks = (gates != 0).reshape(5, 7, n_routes, p)
    assert (blocks.all(-1) == blocks.any(-1)).all()
    # the selection is the top of σ + β, whatever the gate mode
    chosen = torch.zeros(5, 7, n_routes, dtype=torch.bool).scatter(-1, top, True)
    z = sigma + beta
    assert (z.masked_fill(~chosen, float("inf")).amin(-1) >= z.masked_fill(chosen, -float("inf")).amax(-1)).all()


def test_sigma_gates_ignore_beta_but_authors_gates_use_it() -> None:
    sigma = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    beta = torch.tensor([0.0, 0.0, 2.0, 0.0])  # forces rank 2 into the selection
    g_sigma, _ = route(sigma, beta, 2, "sigma")
    g_authors, _ = route(sigma, beta, 2, "authors")
    # exact: one division of small floats, compared at float32 rounding
    assert torch.allclose(g_sigma, torch.tensor([[2 * 0.9 / 1.0, 0.0, 2 * 0.1 / 1.0, 0.0]]))
    assert torch.allclose(g_authors, torch.tensor([[2 * 0.9 / 3.0, 0.0, 2 * 2.1 / 3.0, 0.0]]))


def test_balance_update_and_load_balance() -> None:
    counts = torch.tensor([10.0, 0.0, 5.0, 1.0])
    beta = balance_update(torch.zeros(4), counts, gamma=0.5)
    assert torch.equal(beta, torch.tensor([-0.5, 0.5, -0.5, 0.5]))  # mean is 4
    assert load_balance(counts) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no tokens"):
        load_balance(torch.zeros(3))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("gate", ["authors", "sigma"])
def test_k_equal_r_with_unit_gates_is_plain_peft_lora(conv: bool, gate: str) -> None:
    r, alpha = 6, 12.0
    layer = random_layer(SMoRAConfig(r=r, k=r, lora_alpha=alpha, gate=gate), conv=conv)
    with torch.no_grad():
        layer.router.weight.zero_()  # σ = 0.5 for every rank, β = 0 → every gate is exactly 1
    assert torch.equal(layer.router.bias, torch.zeros(r))

    peft_model = OneLayer(conv)
    peft_model.proj.load_state_dict(layer.base_layer.state_dict())
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], fan_in_fan_out=conv)
    peft_model = inject_adapter_in_model(lora, peft_model)
    with torch.no_grad():
        peft_model.proj.lora_A["default"].weight.copy_(layer.lora_A)
        peft_model.proj.lora_B["default"].weight.copy_(layer.lora_B)
    assert peft_model.proj.scaling["default"] == pytest.approx(alpha / r)

    x = torch.randn(3, 5, D_IN)
    gates = layer.router(x)
    assert torch.equal(gates, torch.ones(3, 5, r))
    # Same products in the same order; allow float32 rounding of a length-r sum (~1e-6 at these scales).
    assert torch.allclose(layer(x), peft_model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
def test_output_is_base_plus_gated_rank_one_updates(conv: bool) -> None:
    config = SMoRAConfig(r=8, k=3, lora_alpha=4.0)
    layer = random_layer(config, conv=conv)
    x = torch.randn(4, D_IN)
    out = layer(x)
    assert out.shape == (4, D_OUT)
    gates = layer.router(x)
    for t in range(4):  # per token: W0 x + (α/k) Σ_i g_i b_i a_iᵀ x, written out rank by rank
        expected = layer.base_layer(x[t])
        for i in torch.nonzero(gates[t]).flatten().tolist():
            expected = expected + config.lora_alpha / config.k * gates[t, i] * layer.lora_B[:, i] * (layer.lora_A[i] @ x[t])
        assert torch.allclose(out[t], expected, atol=1e-5)  # float32, different summation order


def test_initial_B_is_zero_so_layer_starts_as_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = SMoRALinear(base, SMoRAConfig(r=4, k=2))
    x = torch.randn(2, D_IN)
    assert torch.equal(layer(x), base(x))


def test_router_counts_tokens_only_in_training_and_respects_mask() -> None:
    layer = random_layer(SMoRAConfig(r=8, k=2))
    x = torch.randn(2, 5, D_IN)
    layer.eval()
    layer(x)
    assert layer.router.load.sum() == 0
    layer.train()
    layer.router.count_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layer(x)
    assert layer.router.take_load().sum() == 8 * 2  # 8 real tokens, k = 2 routes each
    assert layer.router.load.sum() == 0
    layer.router.count_mask = torch.ones(3, 3)
    with pytest.raises(ValueError, match="count_mask shape"):
        layer(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 4, "k": 5}, "k must be in"),
        ({"r": 0}, "r must be"),
        ({"gate": "softmax"}, "unknown SMoRA gate"),
        ({"r": 8, "k": 3, "rank_partition": 2}, "rank_partition"),
        ({"gamma": -1.0}, "gamma"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SMoRAConfig(**kwargs)


def test_config_round_trips_through_dict() -> None:
    config = SMoRAConfig(r=8, k=4, rank_partition=2, target_modules=("q_proj",), sources=("a", "b"))
    assert SMoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown SMoRA config keys"):
        SMoRAConfig.from_dict({**config.to_dict(), "rank": 3})


def test_layer_rejects_other_modules_and_bad_initial_shapes() -> None:
    with pytest.raises(TypeError, match=r"nn\.Linear or transformers Conv1D"):
        SMoRALinear(nn.Conv2d(1, 1, 1), SMoRAConfig(r=2, k=1))
    with pytest.raises(ValueError, match="initial lora_A must have shape"):
        SMoRALinear(nn.Linear(D_IN, D_OUT), SMoRAConfig(r=2, k=1), lora_A=torch.zeros(3, D_IN))
