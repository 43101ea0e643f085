"""Zero-shot (Arrow-style) rank routing: exact special cases, the routes it picks, its masks and its errors."""

from __future__ import annotations

import pytest
import torch
from test_smora_merged import random_adapter
from test_smora_model import HIDDEN, tiny_llama, token_batch

from lego_viz.checks.invariance import logits_with
from lego_viz.models.arrow import ArrowConfig, ArrowLayer, RoutingError, arrow_routing, principal_directions
from lego_viz.smora.stats import RoutingRecorder
from lego_viz.units.msu import module_msus

MODULE = "model.layers.1.self_attn.v_proj"


def adapters_set():
    return [random_adapter("a", 2, 0), random_adapter("b", 3, 1), random_adapter("c", 4, 2)]


def routed_logits(model, routing, x):
    with torch.no_grad(), routing.applied(model):
        return model(x).logits


@pytest.mark.parametrize(("granularity", "top_k"), [("unit", 3), ("adapter", 1)])
def test_one_adapter_routed_to_all_its_units_is_the_adapter(granularity, top_k):
    adapter = random_adapter("b", 3, 1)
    model, x = tiny_llama(), token_batch(3)
    static = logits_with(model, x, adapter.modules)
    routed = routed_logits(model, arrow_routing([adapter], top_k, granularity), x)
    # the same factored products in another association (folded √s on both sides): float32 ulps
    assert torch.allclose(routed, static, atol=1e-5)
    assert not torch.allclose(static, logits_with(model, x), atol=1e-3)  # the adapter does change the output
    assert torch.allclose(logits_with(model, x), model(x).logits)  # hooks are gone after the block


def test_all_units_of_several_adapters_is_the_weighted_sum():
    adapters, weights = adapters_set(), [1.0, -0.5, 2.0]
    model, x = tiny_llama(), token_batch(4)
    weighted = [{n: type(m)(A=m.A, B=m.B * w, scale=m.scale) for n, m in a.modules.items()} for a, w in zip(adapters, weights)]
    expected = logits_with(model, x, *weighted)
    routed = routed_logits(model, arrow_routing(adapters, 9, "unit", weights=weights), x)
    assert torch.allclose(routed, expected, atol=1e-5)  # float32 reassociation, as above
    fewer = routed_logits(model, arrow_routing(adapters, 4, "unit", weights=weights), x)
    assert not torch.allclose(fewer, expected, atol=1e-3)


def test_principal_direction_is_the_top_right_singular_vector_of_the_dense_update():
    adapters = adapters_set()
    table = module_msus(adapters, MODULE)
    directions = principal_directions(table)
    assert directions.shape == (3, HIDDEN)
    for t, adapter in enumerate(adapters):
        dense = adapter.modules[MODULE].delta_weight().double()
        v = torch.linalg.svd(dense)[2][0]
        assert abs(float(directions[t].double() @ v)) == pytest.approx(1.0, abs=1e-5)  # same line, either sign


def test_adapter_routing_picks_the_adapter_whose_direction_matches_the_hidden_state():
    adapters = adapters_set()
    table = module_msus(adapters, MODULE)
    directions = principal_directions(table)
    for top_k in (1, 2):
        layer = ArrowLayer(table, ArrowConfig("adapter", top_k))
        for t in range(3):
            x = 5.0 * directions[t]  # a hidden state along adapter t's principal direction
            gates = layer.router(x, x @ layer.lora_A.T)
            owner = table.adapter_index
            if top_k == 1:  # all weight on adapter t's units
                assert torch.equal(gates, (owner == t).float())
            else:  # adapter t gets the larger softmax weight; the weights of the two chosen adapters sum to 1
                per_adapter = torch.stack([gates[owner == s][0] for s in range(3)])
                assert int(per_adapter.argmax()) == t and (per_adapter > 0).sum() == 2
                assert float(per_adapter.sum()) == pytest.approx(1.0)


def test_unit_routing_picks_the_units_that_match_and_masks_exactly_k():
    adapters = adapters_set()
    table = module_msus(adapters, MODULE)
    layer = ArrowLayer(table, ArrowConfig("unit", 4))
    x = torch.randn(7, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    hidden = x @ layer.lora_A.T
    gates = layer.router(x, hidden)
    assert gates.shape == (7, 5, 9) and set(gates.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(gates.sum(-1), torch.full((7, 5), 4.0))
    cosine = (x @ torch.nn.functional.normalize(table.a, dim=1).T).abs()  # |ã_i·x| / ‖ã_i‖ computed apart
    expected = torch.zeros_like(cosine).scatter(-1, cosine.argsort(-1, descending=True)[..., :4], 1.0)
    assert torch.equal(gates, expected)
    # a hidden state along one unit's input direction selects that unit first
    unit = 5
    alone = ArrowLayer(table, ArrowConfig("unit", 1)).router(table.a[unit], table.a[unit] @ layer.lora_A.T)
    assert alone.nonzero().flatten().tolist() == [unit]


def test_adapter_gates_are_the_softmax_of_the_top_scores():
    adapters = adapters_set()
    table = module_msus(adapters, MODULE)
    layer = ArrowLayer(table, ArrowConfig("adapter", 2, temperature=0.5))
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(1))
    gates = layer.router(x, x @ layer.lora_A.T)
    scores = (x @ principal_directions(table).T).abs()
    top = scores.topk(2, dim=-1)
    expected = torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values / 0.5, -1))
    assert torch.allclose(gates, expected[:, table.adapter_index], atol=1e-6)


def test_the_recorder_sees_routed_gates():
    routing = arrow_routing(adapters_set(), 3, "unit")
    model, x = tiny_llama(), token_batch(2, batch=2, seq=5)
    with torch.no_grad(), routing.applied(model), RoutingRecorder(model, [MODULE], layers=routing.layers) as recorder:
        model(x)
    gates = recorder.gates[MODULE][0]
    assert gates.shape == (2, 5, 9) and torch.equal(gates.sum(-1), torch.full((2, 5), 3.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": 10}, "top_k=10 exceeds the 9 units"),
        ({"top_k": 4, "granularity": "adapter"}, "top_k=4 exceeds the 3 adapters"),
        ({"top_k": 2, "granularity": "token"}, "unknown routing granularity 'token'"),
        ({"top_k": 1, "granularity": "adapter", "temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_options_raise_a_routing_error(kwargs, match):
    with pytest.raises(RoutingError, match=match):
        arrow_routing(adapters_set(), **kwargs)


def test_a_model_without_the_targets_is_refused():
    routing = arrow_routing(adapters_set(), 2)
    with pytest.raises(RoutingError, match="has no module"), routing.applied(torch.nn.Linear(2, 2)):
        pass


def test_fingerprint_follows_content_and_settings():
    adapters = adapters_set()
    first = arrow_routing(adapters, 3).fingerprint()
    assert first == arrow_routing(adapters_set(), 3).fingerprint()
    assert first != arrow_routing(adapters, 4).fingerprint()
    assert first != arrow_routing(adapters, 3, weights=[1, 1, 0.5]).fingerprint()
