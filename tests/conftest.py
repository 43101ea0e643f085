"""Shared fixtures: tiny seeded adapters and models built in code, and the real third-party adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lego_viz.adapters import LoraAdapter, LoraModule

REAL_LORAS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real_loras"
REAL_REASON = f"real third-party adapters not found at {REAL_LORAS} (they live in ../shared beside a CI checkout)"

# The tiny Llama used by the output-space and PEFT round-trip tests; module shapes below match it.
TOY_HIDDEN, TOY_KV, TOY_INTER, TOY_LAYERS = 32, 16, 48, 2


def real_lora(name: str) -> Path:
    path = REAL_LORAS / name
    if not path.is_dir():
        pytest.skip(REAL_REASON)
    return path


def real_lora_names() -> list[str]:
    return sorted(p.name for p in REAL_LORAS.iterdir() if p.is_dir()) if REAL_LORAS.is_dir() else []


def toy_shapes(targets=("q_proj", "v_proj", "down_proj")) -> dict[str, tuple[int, int]]:
    """Module name -> (d_in, d_out) for the toy Llama."""
    dims = {"q_proj": (TOY_HIDDEN, TOY_HIDDEN), "k_proj": (TOY_HIDDEN, TOY_KV), "v_proj": (TOY_HIDDEN, TOY_KV),
            "o_proj": (TOY_HIDDEN, TOY_HIDDEN), "gate_proj": (TOY_HIDDEN, TOY_INTER), "up_proj": (TOY_HIDDEN, TOY_INTER),
            "down_proj": (TOY_INTER, TOY_HIDDEN)}
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{parent[t]}.{t}": dims[t] for i in range(TOY_LAYERS) for t in targets}


def make_adapter(
    name: str = "toy",
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    shapes: dict[str, tuple[int, int]] | None = None,
    base: str = "toy/llama",
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    fan_in_fan_out: bool = False,
) -> LoraAdapter:
    """A random (trained-looking: B non-zero) adapter, built in memory."""
    shapes = shapes if shapes is not None else toy_shapes()
    gen = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "base_model_name_or_path": base,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes}), "use_rslora": use_rslora,
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}, "fan_in_fan_out": fan_in_fan_out,
              "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0}
    modules = {}
    from lego_viz.adapters.loading import _module_scale

    for module, (d_in, d_out) in shapes.items():
        rank, scale = _module_scale(config, module, name)
        A = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
        B = torch.randn(d_out, rank, generator=gen) * 0.1
        modules[module] = LoraModule(A=A, B=B, scale=scale, fan_in_fan_out=fan_in_fan_out)
    return LoraAdapter(name=name, source=f"memory:{name}", config=config, modules=modules)


def save_peft_folder(adapter: LoraAdapter, folder: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """Write an adapter as a PEFT folder (optionally with tampered tensors/config)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {}
        for module, lora in adapter.modules.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = lora.A.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = lora.B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config if config is not None else adapter.config))
    return folder


@pytest.fixture(scope="session")
def toy_model():
    """A randomly initialised 2-layer Llama matching :func:`toy_shapes` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=TOY_HIDDEN, intermediate_size=TOY_INTER, num_hidden_layers=TOY_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def toy_adapters() -> list[LoraAdapter]:
    """Three adapters of different ranks on the toy model."""
    return [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=2, alpha=4, seed=2), make_adapter("c", r=6, alpha=6, seed=3)]
