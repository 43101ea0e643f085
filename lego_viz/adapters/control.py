"""The random-LoRA control: adapters with a real adapter's shapes and unit norms but random directions.

A merge method earns credit only by what it does better than on adapters that carry no skill at all.
A recent study of 1,000 real Llama LoRAs found random adapters about as good as chosen ones in some
merges, so every accuracy in the merge lab is shown beside the same merge of controls (issue 14.4).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from lego_viz.adapters.types import LoraAdapter, LoraModule


def _random_rows(norms: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of length ``width`` pointing in uniformly random directions, with the given norms, (len(norms), width)."""
    # A standard Gaussian vector divided by its norm is uniform on the sphere; float64 keeps the
    # norms exact to the adapter's own precision once cast back.
    directions = torch.randn(norms.shape[0], width, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    return directions * norms.double().unsqueeze(1)


def random_like(adapter: LoraAdapter, seed: int = 0) -> LoraAdapter:
    """A control adapter: the same modules, shapes, config (so scale) and per-unit norms, random directions.

    Row ``i`` of each ``lora_A`` keeps its norm ``‖a_i‖`` and column ``i`` of ``lora_B`` keeps
    ``‖b_i‖`` (so the folded ``‖ã_i‖``, ``‖b̃_i‖`` and the size of every rank-one update are kept);
    their directions are drawn uniformly at random. A unit with a zero half stays zero.

    Args:
        adapter: the adapter to imitate.
        seed: the same seed and adapter name give the same control; adapters with different names
            get different directions at the same seed, so a merge of controls is not trivially aligned.

    Returns:
        A new `LoraAdapter` named ``random_<name>``, in the input's dtype.
    """
    modules = {}
    for name, lora in adapter.modules.items():
        # One generator per module, keyed by (seed, adapter, module): controls do not depend on module order.
        key = zlib.crc32(f"{seed}\x00{adapter.name}\x00{name}".encode())
        generator = torch.Generator().manual_seed(key)
        A = _random_rows(lora.A.norm(dim=1), lora.d_in, generator).to(lora.A.dtype)
        B = _random_rows(lora.B.norm(dim=0), lora.d_out, generator).T.to(lora.B.dtype)
        modules[name] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=lora.scale, fan_in_fan_out=lora.fan_in_fan_out)
    return dataclasses.replace(
        adapter, name=f"random_{adapter.name}", source=f"random_like({adapter.source}, seed={seed})", modules=modules,
        extra_tensors={}, warnings=[], sha256="", weights_file="",
    )
