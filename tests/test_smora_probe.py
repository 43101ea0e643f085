"""Routing probes: per-token gates and per-task selection counts (padding must not change them)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lego_viz.smora import SMoRAConfig, inject_smora, smora_layers
from lego_viz.smora.probe import task_routing, token_routing
from lego_viz.zoo.tokenizer import build_tokenizer

R, K = 8, 3


def smora_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    inject_smora(model, SMoRAConfig(r=R, k=K, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():
        for layer in smora_layers(model).values():
            layer.lora_B.normal_()  # routing of later layers then depends on earlier SMoRA outputs
    return model


def test_token_routing_covers_every_token() -> None:
    tokenizer = build_tokenizer()
    model = smora_model(tokenizer)
    routing = token_routing(model, tokenizer, "reverse: abc=cba")
    assert routing.tokens[0] == tokenizer.bos_token and len(routing.tokens) == 1 + len("reverse: abc=cba")
    assert sorted(routing.gates) == sorted(smora_layers(model))
    gates = routing.gates["model.layers.1.mlp.down_proj"]
    assert gates.shape == (len(routing.tokens), R) and ((gates != 0).sum(-1) == K).all()


def test_task_routing_counts_match_unpadded_runs() -> None:
    tokenizer = build_tokenizer()
    model = smora_model(tokenizer)
    texts = {"short": ["ab=ba", "x=x"], "long": ["sort: 3141=1134", "add: 12+34=46"]}
    module = "model.layers.1.self_attn.q_proj"
    routing = task_routing(model, tokenizer, texts, [module])
    assert routing.tasks == ["short", "long"]
    assert routing.tokens.tolist() == [sum(len(t) + 1 for t in group) for group in texts.values()]
    for row, group in enumerate(texts.values()):
        alone = sum((token_routing(model, tokenizer, text, [module]).gates[module] != 0).float().sum(0) for text in group)
        assert torch.equal(routing.counts[module][row], alone)  # left padding with shifted positions changes nothing
    assert torch.allclose(routing.frequency(module).sum(-1), torch.full((2,), float(K)))  # exact: counts / tokens
    assert torch.equal(routing.load(module), routing.counts[module].sum(0))
