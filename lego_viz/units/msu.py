"""Minimal Semantic Units: the rank-one pieces ``b̃_i ã_iᵀ`` a LoRA update is the sum of.

Every unit is stored *folded*: the module scale ``s`` is split as ``sqrt(s)`` onto both vectors, so
``ΔW = Σ_i b̃_i ã_iᵀ`` and the scale never travels separately (ARCHITECTURE §2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lego_viz.adapters import AdapterError, LoraAdapter, LoraModule, adapter_weights

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

FEATURE_MODES = ("raw", "canonical", "normalized")
# Below this a vector counts as zero: an untrained lora_B is exactly zero, and we must not divide by it.
_TINY = 1e-30


def fold(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded units of one module.

    Returns:
        ``a`` (r, d_in) and ``b`` (r, d_out) with ``ΔW = bᵀ a`` (row i of each is unit i).
    """
    root = module.scale**0.5
    # Half-precision inputs (bf16/fp16 checkpoints) are computed in float32.
    return module.A.float() * root, module.B.T.float() * root


def canonicalize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the scale and sign ambiguity of rank-one units, keeping ``bᵀ a`` unchanged.

    Rescales each unit so ``‖ã‖ = ‖b̃‖`` and flips both signs so the largest-magnitude entry of ``ã``
    is positive (where it occurs with both signs, no flip). Units whose update is zero (either half zero) become exactly zero.

    Args:
        a: (n, d_in) folded A rows.
        b: (n, d_out) folded B columns, as rows.
    """
    norm_a = a.norm(dim=1, keepdim=True)
    norm_b = b.norm(dim=1, keepdim=True)
    zero = (norm_a <= _TINY) | (norm_b <= _TINY)
    # c = sqrt(‖b‖/‖a‖) moves weight from the longer half to the shorter; computed in log space
    # so that norms near the float range limits cannot overflow.
    log_c = 0.5 * (torch.log(norm_b.clamp_min(_TINY)) - torch.log(norm_a.clamp_min(_TINY)))
    c = torch.exp(log_c)
    a_c = torch.where(zero, torch.zeros_like(a), a * c)
    b_c = torch.where(zero, torch.zeros_like(b), b / c)
    # Where +m and −m are both the largest |entry|, + wins: the same rule as the merge's (lego._units),
    # so the map shows exactly the vectors k-means clustered.
    sign = torch.where(-a_c.amin(dim=1, keepdim=True) > a_c.amax(dim=1, keepdim=True), -1.0, 1.0).to(a.dtype)
    return a_c * sign, b_c * sign


def stacked(parts: Sequence[torch.Tensor], dim: int, into: StackBuffer | None = None) -> torch.Tensor:
    """``torch.cat(parts, dim)`` in float32, without the copy where the parts already lie side by side.

    A streamed merge reads all adapters' factors of a module into one buffer (:mod:`lego_viz.merge.stream`),
    so their ``A`` (and ``B``) are consecutive views of it and their concatenation is the buffer
    itself: the merge and the checks then read every factor where it was read to, once. Where a copy
    is needed it goes into ``into`` if given (valid until its next use) instead of fresh memory.
    """
    first = parts[0]
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    if all(p.dtype == torch.float32 for p in parts):
        if len(parts) == 1:
            return first
        step, storage, offset = first.stride()[dim], first.untyped_storage().data_ptr(), first.storage_offset()
        for before, part in itertools.pairwise(parts):
            offset += before.shape[dim] * step
            if (part.untyped_storage().data_ptr() != storage or part.stride() != first.stride()
                    or part.storage_offset() != offset or part.shape[1 - dim] != first.shape[1 - dim]):
                break
        else:
            return first.as_strided(shape, first.stride(), first.storage_offset())
    parts = [p.float() for p in parts]
    return torch.cat(parts, dim=dim) if into is None else torch.cat(parts, dim=dim, out=into.take(shape))


class StackBuffer:
    """Reused float32 memory for :func:`stacked`'s copies, module after module.

    Fresh copies for every module of an in-memory merge come and go between results that stay, so
    glibc keeps their pages: one buffer that grows to the largest copy holds the resident size down
    (and spares faulting fresh pages in for every module).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # made on first use (a merge from summaries needs none)

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        size = math.prod(shape)
        if self.buffer is None or self.buffer.numel() < size:
            self.buffer = torch.empty(size)
        return self.buffer[:size].view(shape)


@dataclass
class MSUTable:
    """All units of one module across a set of adapters (weights already applied to ``b``)."""

    module: str
    a: torch.Tensor  # (n, d_in)
    b: torch.Tensor  # (n, d_out)
    adapter_index: torch.Tensor  # (n,) long, index into adapter_names
    rank_index: torch.Tensor  # (n,) long, row of the source adapter's A
    adapter_names: list[str]
    fan_in_fan_out: bool = False

    @property
    def n(self) -> int:
        return self.a.shape[0]

    @property
    def d_in(self) -> int:
        return self.a.shape[1]

    @property
    def d_out(self) -> int:
        return self.b.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (d_out, n), A (n, d_in))`` with ``ΔW = B A`` (scale 1)."""
        return self.b.T, self.a

    def block_ranks(self) -> list[int]:
        """Widths of the consecutive per-adapter blocks of units (adapters absent from the module left out)."""
        return torch.unique_consecutive(self.adapter_index, return_counts=True)[1].tolist()

    def canonical(self) -> MSUTable:
        a, b = canonicalize(self.a, self.b)
        return self._replace(a, b)

    def features(self, mode: str = "raw") -> torch.Tensor:
        """What k-means and the map see, (n, d_in + d_out).

        ``raw``: ``[ã; b̃]``; ``canonical``: the canonical pair; ``normalized``: each half of the
        canonical pair L2-normalised (direction only).
        """
        if mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {mode!r}; expected one of {', '.join(FEATURE_MODES)}.")
        if mode == "raw":
            return torch.cat([self.a, self.b], dim=1)
        a, b = canonicalize(self.a, self.b)
        if mode == "normalized":
            a = a / a.norm(dim=1, keepdim=True).clamp_min(_TINY)
            b = b / b.norm(dim=1, keepdim=True).clamp_min(_TINY)
        return torch.cat([a, b], dim=1)

    def norms(self) -> dict[str, torch.Tensor]:
        """Per-unit ``‖ã‖``, ``‖b̃‖`` and the Frobenius norm of the rank-one update ``‖ã‖·‖b̃‖``."""
        norm_a, norm_b = self.a.norm(dim=1), self.b.norm(dim=1)
        return {"norm_a": norm_a, "norm_b": norm_b, "norm_update": norm_a * norm_b}

    def permute(self, perm: torch.Tensor) -> MSUTable:
        """The same units in another order (the update is unchanged: ARCHITECTURE §3.1)."""
        return MSUTable(
            self.module, self.a[perm], self.b[perm], self.adapter_index[perm], self.rank_index[perm],
            self.adapter_names, self.fan_in_fan_out,
        )

    def _replace(self, a: torch.Tensor, b: torch.Tensor) -> MSUTable:
        return MSUTable(self.module, a, b, self.adapter_index, self.rank_index, self.adapter_names, self.fan_in_fan_out)


def _scaled_transpose(matrix: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """``out = scale · matrixᵀ`` for a tall, narrow ``matrix`` (d, r).

    Written as ``(scale·I) @ matrixᵀ``: on CPU the GEMM kernel transposes ~1.5× faster than a
    strided copy (torch 2.13), and it is exact — every output is one product plus zeros (inputs are
    validated finite on load, so no ``0·inf``).
    """
    eye = torch.eye(matrix.shape[1], dtype=matrix.dtype, device=matrix.device) * scale
    torch.mm(eye, matrix.T, out=out)


def module_msus(adapters: Sequence[LoraAdapter], module: str, weights: Sequence[float] | None = None) -> MSUTable:
    """Concatenate the folded units of ``module`` from every adapter that has it (ARCHITECTURE §3.2).

    Args:
        adapters: the adapter set.
        module: module name, e.g. ``model.layers.0.self_attn.q_proj``.
        weights: one per adapter (default 1); applied to the ``b̃`` half.
    """
    weights = adapter_weights(adapters, weights)
    present = [(t, a.modules[module], w) for t, (a, w) in enumerate(zip(adapters, weights)) if module in a.modules]
    if not present:
        raise AdapterError(f"no adapter has module {module!r}.")
    first = present[0][1]
    n = sum(lora.r for _, lora, _ in present)
    # One write pass into preallocated tables (scale and weight applied on the way), not a copy per step.
    a = torch.empty(n, first.d_in)
    b = torch.empty(n, first.d_out)
    start = 0
    for _, lora, w in present:
        root = lora.scale**0.5
        torch.mul(lora.A.float(), root, out=a[start : start + lora.r])  # half precision: compute in float32
        _scaled_transpose(lora.B.float(), root * w, out=b[start : start + lora.r])
        start += lora.r
    return MSUTable(
        module=module,
        a=a,
        b=b,
        adapter_index=torch.cat([torch.full((lora.r,), t, dtype=torch.long) for t, lora, _ in present]),
        rank_index=torch.cat([torch.arange(lora.r) for _, lora, _ in present]),
        adapter_names=[a.name for a in adapters],
        fan_in_fan_out=first.fan_in_fan_out,
    )


def adapter_msus(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None) -> dict[str, MSUTable]:
    """:func:`module_msus` for every module of the set, in first-seen order."""
    modules = list(dict.fromkeys(m for a in adapters for m in a.modules))
    return {m: module_msus(adapters, m, weights) for m in modules}


def table_to_module(table: MSUTable) -> LoraModule:
    """Rebuild a LoRA module (scale 1, folded) from units."""
    return LoraModule(A=table.a.contiguous(), B=table.b.T.contiguous(), scale=1.0, fan_in_fan_out=table.fan_in_fan_out)


def permute_adapter(adapter: LoraAdapter, generator: torch.Generator | None = None) -> tuple[LoraAdapter, dict[str, torch.Tensor]]:
    """A copy of ``adapter`` with the ranks of every module shuffled (rows of A with columns of B).

    Returns:
        The permuted adapter and the permutation used per module.
    """
    modules, perms = {}, {}
    for name, lora in adapter.modules.items():
        perm = torch.randperm(lora.r, generator=generator)
        perms[name] = perm
        modules[name] = LoraModule(A=lora.A.index_select(0, perm), B=lora.B.index_select(1, perm), scale=lora.scale, fan_in_fan_out=lora.fan_in_fan_out)
    copy = LoraAdapter(
        name=adapter.name, source=adapter.source, config=adapter.config, modules=modules,
        extra_tensors=adapter.extra_tensors, warnings=list(adapter.warnings), sha256=adapter.sha256,
        weights_file=adapter.weights_file, config_sha256=adapter.config_sha256,
    )
    return copy, perms
