"""Seeded synthetic adapters of the reference shape (ARCHITECTURE §8), built in memory — nothing is downloaded.

The reference is "Llama-3-8B": 32 layers × seven linear layers, 8 adapters at r = 16 on all of them.
Units are not pure noise: each module has a small pool of shared directions that the adapters'
units are noisy copies of, so k-means has real clusters to find (as with adapters trained on
related tasks) and needs a realistic number of iterations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lego_viz.adapters import KEY_PREFIX, LoraAdapter, LoraModule

# (name, d_in, d_out) of Llama-3-8B's seven linear layers per decoder block.
LLAMA3_8B_LINEARS = (
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 1024),
    ("self_attn.v_proj", 4096, 1024),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 14336),
    ("mlp.up_proj", 4096, 14336),
    ("mlp.down_proj", 14336, 4096),
)
BASE_MODEL = "synthetic/llama-3-8b-shape"


@dataclass(frozen=True)
class ReferenceShape:
    """How many adapters of which shape to synthesise.

    Args:
        n_layers: decoder blocks (32 in the reference).
        n_adapters: adapters to merge (8).
        rank: LoRA rank of every module (16).
        shrink: divide every layer width by this (1 = the reference widths; quick runs use more).
        lora_alpha: PEFT ``lora_alpha`` (scale ``alpha / r``).
        pool: shared unit directions per module that adapters' units are noisy copies of.
        noise: relative size of the per-unit noise around its pool direction.
    """

    n_layers: int = 32
    n_adapters: int = 8
    rank: int = 16
    shrink: int = 1
    lora_alpha: float = 32.0
    pool: int = 24
    noise: float = 0.5

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_adapters", "rank", "shrink", "pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if 1024 % self.shrink:
            raise ValueError(f"shrink must divide 1024 (the smallest width), got {self.shrink}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")

    @property
    def linears(self) -> list[tuple[str, int, int]]:
        return [(name, d_in // self.shrink, d_out // self.shrink) for name, d_in, d_out in LLAMA3_8B_LINEARS]

    def module_names(self) -> list[str]:
        return [f"model.layers.{i}.{name}" for i in range(self.n_layers) for name, _, _ in self.linears]

    def describe(self) -> str:
        widths = ", ".join(f"{name.split('.')[-1]} {d_in}→{d_out}" for name, d_in, d_out in self.linears)
        return f"{self.n_layers} layers × {{{widths}}}; {self.n_adapters} adapters at r={self.rank}"


def _pools(shape: ReferenceShape, name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared unit directions of one module, (pool, d_in) and (pool, d_out)."""
    d_in, d_out = next((i, o) for n, i, o in shape.linears if name.endswith(n))
    return (torch.randn(shape.pool, d_in, generator=gen) / d_in**0.5,
            torch.randn(shape.pool, d_out, generator=gen) / d_out**0.5)


def _units(shape: ReferenceShape, pool_a: torch.Tensor, pool_b: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's ``A`` (r, d_in) and ``B`` (d_out, r): noisy copies of pool directions."""
    d_in, d_out = pool_a.shape[1], pool_b.shape[1]
    pick = torch.randint(shape.pool, (shape.rank,), generator=gen)
    gain = torch.rand(shape.rank, 1, generator=gen) + 0.5  # units differ in strength, not only direction
    a = gain * (pool_a[pick] + shape.noise * torch.randn(shape.rank, d_in, generator=gen) / d_in**0.5)
    b = pool_b[pick] + shape.noise * torch.randn(shape.rank, d_out, generator=gen) / d_out**0.5
    return a, b.T.contiguous()


def _config(shape: ReferenceShape) -> dict:
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": BASE_MODEL,
        "r": shape.rank,
        "lora_alpha": shape.lora_alpha,
        "target_modules": sorted({name.split(".")[-1] for name, _, _ in shape.linears}),
        "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False,
        "bias": "none",
    }


def make_adapters(
    shape: ReferenceShape, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[LoraAdapter]:
    """``shape.n_adapters`` adapters with LoRA on every linear layer, seeded.

    Args:
        shape: the adapter set to build.
        seed: RNG seed; the same seed gives the same tensors.
        dtype: storage dtype of ``A`` and ``B`` (bf16/fp16 to exercise half-precision inputs).

    Returns:
        Adapters named ``synthetic_0`` … with PEFT-like configs.
    """
    gen = torch.Generator().manual_seed(seed)
    modules: list[dict[str, LoraModule]] = [{} for _ in range(shape.n_adapters)]
    scale = shape.lora_alpha / shape.rank
    for name in shape.module_names():
        pool_a, pool_b = _pools(shape, name, gen)
        for t in range(shape.n_adapters):
            a, b = _units(shape, pool_a, pool_b, gen)
            modules[t][name] = LoraModule(A=a.to(dtype), B=b.to(dtype), scale=scale)
    return [
        LoraAdapter(
            name=f"synthetic_{t}", source=f"synthetic:{seed}:{t}", config=_config(shape), modules=modules[t]
        )
        for t in range(shape.n_adapters)
    ]


def write_adapters(
    shape: ReferenceShape, folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[Path]:
    """Write ``shape.n_adapters`` PEFT folders under ``folder``, one adapter in memory at a time.

    For inputs larger than memory (many adapters): the pools of shared directions are drawn once
    (per module), then each adapter's units are drawn from its own seeded generator and saved.

    Returns:
        The adapter folders ``synthetic_0`` …
    """
    pool_gen = torch.Generator().manual_seed(seed)
    pools = {name: _pools(shape, name, pool_gen) for name in shape.module_names()}
    folders = []
    for t in range(shape.n_adapters):
        gen = torch.Generator().manual_seed(seed * 100_003 + t + 1)
        tensors = {}
        for name, (pool_a, pool_b) in pools.items():
            a, b = _units(shape, pool_a, pool_b, gen)
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to(dtype)
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to(dtype)
        folders.append(_save(Path(folder) / f"synthetic_{t}", tensors, _config(shape)))
    return folders


def _save(target: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def save_adapters(adapters: list[LoraAdapter], folder: str | Path) -> list[Path]:
    """Write in-memory adapters (e.g. from :func:`make_adapters`) as PEFT folders under ``folder``."""
    return [
        _save(Path(folder) / adapter.name,
              {f"{KEY_PREFIX}{name}.lora_{side}.weight": getattr(m, side).contiguous()
               for name, m in adapter.modules.items() for side in "AB"},
              adapter.config)
        for adapter in adapters
    ]


def adapter_bytes(adapters: list[LoraAdapter]) -> int:
    """Bytes held by the adapters' ``A`` and ``B`` tensors."""
    return sum(
        t.numel() * t.element_size()
        for adapter in adapters
        for m in adapter.modules.values()
        for t in (m.A, m.B)
    )
