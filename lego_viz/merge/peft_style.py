"""PEFT's own ``linear``, ``ties`` and ``dare_linear`` combinations, reproduced exactly.

PEFT combines the ``A`` factors and the ``B`` factors *separately* (weights ``sqrt(|w·s|)``, the sign on
the A side), so the result is ``(Σ B_t)(Σ A_t)`` with cross terms — not ``Σ ΔW_t``. Users compare
against it, and the gap to the exact sum is one of the clearest lessons of concat–sum equivalence.
The per-tensor rules come from ``peft.utils.merge_utils`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lego_viz.adapters import LoraAdapter, LoraModule, module_order
from lego_viz.merge.base import MergeError, MergeMethod, MethodOutput, Option

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

_DENSITY = Option(0.5, "fraction of entries kept per factor", kind=float, minimum=0.0, maximum=1.0)
_SIGN = Option("total", "how TIES elects the majority sign", choices=("total", "frequency"))
_SEED = Option(0, "seed of DARE's random drop mask", kind=int, minimum=0)


def peft_merge_utils():
    # Imported on use: peft pulls in transformers (seconds), which no other method needs.
    from peft.utils import merge_utils

    return merge_utils


def _combine(adapters: Sequence[LoraAdapter], weights: list[float], rule) -> MethodOutput:
    out = MethodOutput(modules={})
    for name in module_order(adapters):
        present = [(a.modules[name], w) for a, w in zip(adapters, weights) if name in a.modules]
        ranks = {lora.r for lora, _ in present}
        if len(ranks) > 1:
            raise MergeError(
                f"PEFT-style combinations need equal ranks, but module {name} has r = {sorted(ranks)}; "
                "use lego, linear or svd for adapters of different ranks."
            )
        w_a, w_b = [], []
        for lora, w in present:
            ws = w * lora.scale
            w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            w_b.append(math.sqrt(abs(ws)))
        A = rule([lora.A for lora, _ in present], torch.tensor(w_a))
        B = rule([lora.B for lora, _ in present], torch.tensor(w_b))
        out.modules[name] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=1.0, fan_in_fan_out=present[0][0].fan_in_fan_out)
    return out


def peft_linear(adapters, weights, k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    return _combine(adapters, weights, peft_merge_utils().task_arithmetic)




PEFT_LINEAR = MergeMethod(
    "peft_linear",
    peft_linear,
    "PEFT's 'linear': A's and B's averaged separately ((Σ B)(Σ A), cross terms included); equal ranks.",
    options={},
    takes_k=False,
    equal_ranks=True,
)
def ties(adapters, weights, k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    density, sign = options["density"], options["majority_sign_method"]
    return _combine(adapters, weights, lambda ts, ws: peft_merge_utils().ties(ts, ws, density, sign))




TIES = MergeMethod(
    "ties",
    ties,
    "PEFT's 'ties' on the A and B factors separately (trim, elect sign, disjoint mean); equal ranks.",
    options={"density": _DENSITY, "majority_sign_method": _SIGN},
    takes_k=False,
    equal_ranks=True,
)
def dare_linear(adapters, weights, k: Mapping[str, int] | None, options: dict) -> MethodOutput:
    density = options["density"]
    # PEFT draws its mask from the global RNG; fork it so a seeded merge is reproducible and
    # leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        return _combine(adapters, weights, lambda ts, ws: peft_merge_utils().dare_linear(ts, ws, density))



DARE_LINEAR = MergeMethod(
    "dare_linear",
    dare_linear,
    "PEFT's 'dare_linear' on the A and B factors separately (random drop + rescale); equal ranks.",
    options={"density": _DENSITY, "seed": _SEED},
    takes_k=False,
    equal_ranks=True,
)
