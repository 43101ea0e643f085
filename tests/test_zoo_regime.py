"""The zoo's adapter regime: replay batches, the replay loss, data shards and the merge-target measurements."""

from __future__ import annotations

import random

import pytest
import torch
from peft import get_peft_model

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.zoo.model import ZooModelConfig, build_model
from lego_viz.zoo.replay import REPLAY_ROWS, ReplayConfig, ReplayLoss, replay_batch, replay_pool
from lego_viz.zoo.targets import relative_update_norms, scaled
from lego_viz.zoo.tasks import TASKS, in_shard, training_example
from lego_viz.zoo.tokenizer import build_tokenizer
from lego_viz.zoo.train import lm_loss, lora_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _tiny_base(tokenizer):
    torch.manual_seed(0)
    config = ZooModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return build_model(config, tokenizer).eval()


@pytest.fixture
def tiny_base(tokenizer):
    return _tiny_base(tokenizer)


@pytest.fixture(scope="module")
def pool(tokenizer):
    return replay_pool(_tiny_base(tokenizer), tokenizer, ["copy", "sort"], size=6, seed=3)


def _peft(base, seed=1, std=0.0):
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(2))
    if std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=std)
    return model


def test_shards_split_the_training_prompts():
    rng = random.Random(0)
    first = {training_example(TASKS["reverse"], rng, (0, 2))[0] for _ in range(300)}
    second = {training_example(TASKS["reverse"], rng, (1, 2))[0] for _ in range(300)}
    assert first and second and not first & second
    assert all(in_shard(p, (0, 2)) for p in first) and not any(in_shard(p, (0, 2)) for p in second)
    with pytest.raises(ValueError, match="shard"):
        training_example(TASKS["reverse"], rng, (2, 2))


def test_replay_pool_holds_the_base_answers_and_is_seeded(tokenizer, pool, tiny_base):
    from lego_viz.zoo.evaluate import generate

    assert set(pool) == {"copy", "sort"} and all(len(rows) == 6 for rows in pool.values())
    prompts = [prompt for prompt, _ in pool["sort"]]
    # targets are what the base says, not the task's solution
    assert [answer for _, answer in pool["sort"]] == generate(tiny_base, tokenizer, prompts, max_new_tokens=24)
    assert replay_pool(tiny_base, tokenizer, ["copy", "sort"], size=6, seed=3) == pool


def test_replay_batch_appends_replay_rows(tokenizer, pool):
    batch = replay_batch(TASKS["reverse"], 4, random.Random(0), tokenizer, pool, ["copy", "sort"], rows=3)
    assert batch["input_ids"].shape[0] == 7 and int(batch[REPLAY_ROWS]) == 3
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert all(t.startswith("reverse: ") for t in texts[:4])
    replayed = {p + a for rows in pool.values() for p, a in rows}
    assert all(t in replayed for t in texts[4:])
    alone = replay_batch(TASKS["reverse"], 4, random.Random(0), tokenizer, pool, [], rows=3)
    assert alone["input_ids"].shape[0] == 4 and int(alone[REPLAY_ROWS]) == 0


def test_replay_config_sources_and_validation():
    config = ReplayConfig()
    assert config.sources("sort", ["copy"], list(TASKS)) == ["copy", *(t for t in TASKS if t != "sort")]
    assert ReplayConfig(other_tasks=False).sources("sort", ["copy"], list(TASKS)) == ["copy"]
    assert ReplayConfig(rows=0).sources("sort", ["copy"], list(TASKS)) == []
    with pytest.raises(ValueError, match="source"):
        ReplayConfig(pretrain_tasks=False, other_tasks=False)
    with pytest.raises(ValueError, match="scale_jitter"):
        ReplayConfig(scale_jitter=(1.5, 0.5))


def test_consistency_is_zero_for_an_untrained_adapter_and_positive_after(tokenizer, pool, tiny_base):
    batch = replay_batch(TASKS["count"], 4, random.Random(1), tokenizer, pool, ["copy", "sort"], rows=4)
    fresh = _peft(tiny_base)  # lora_B = 0: the adapted model is the base
    rng = random.Random(0)
    # 1e-6: the same forward pass, summed in the same order
    assert torch.allclose(ReplayLoss(ReplayConfig(consistency=10.0))(fresh, batch, rng), lm_loss(fresh, batch, rng), atol=1e-6)
    trained = _peft(_tiny_base(tokenizer), std=0.5)
    plain = ReplayLoss(ReplayConfig(consistency=0.0))(trained, batch, rng)
    assert ReplayLoss(ReplayConfig(consistency=1.0))(trained, batch, rng) > plain


def test_scale_jitter_changes_the_scale_per_step_and_restores_it(tokenizer, pool, tiny_base):
    model = _peft(tiny_base, std=0.1)
    layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling]
    before = layers[0].scaling["default"]
    loss = ReplayLoss(ReplayConfig(scale_jitter=(0.5, 1.5)))
    batch = replay_batch(TASKS["count"], 2, random.Random(1), tokenizer, pool, ["copy"], rows=2)
    seen = set()
    for seed in range(3):
        loss(model, batch, random.Random(seed))
        seen.add(layers[0].scaling["default"])
        assert 0.5 * before <= layers[0].scaling["default"] <= 1.5 * before
        assert len({layer.scaling["default"] for layer in layers}) == 1  # one factor for the whole adapter
    assert len(seen) == 3
    loss.restore(model)
    assert all(layer.scaling["default"] == before for layer in layers)


def test_relative_update_norm_from_factors_equals_the_dense_norm(tiny_base):
    torch.manual_seed(0)
    name = "model.layers.0.self_attn.q_proj"
    weight = dict(tiny_base.named_modules())[name].weight
    module = LoraModule(A=torch.randn(3, weight.shape[1]), B=torch.randn(weight.shape[0], 3), scale=0.7)
    adapter = LoraAdapter(name="a", source="test", config={}, modules={name: module})
    dense = float(module.delta_weight().norm() / weight.norm())
    # float32 Gram products vs the dense product: agree to 1e-5 relative
    assert relative_update_norms(adapter, tiny_base) == pytest.approx([dense], rel=1e-5)
    assert relative_update_norms(
        LoraAdapter(name="a", source="t", config={}, modules=scaled({name: module}, 0.5)), tiny_base
    ) == pytest.approx([dense / 2], rel=1e-5)
