"""Item 2: factored ``svd`` merge vs PEFT ``add_weighted_adapter(combination_type="svd")``.

PEFT forms every dense ``d_out × d_in`` update and takes its full SVD; ours never leaves the
factors (QR of both, SVD of the small core). Both run on the same synthetic adapters, loaded
into a PEFT model built from a Llama config with the reference layer widths — with fewer layers
(stated in the table), since PEFT's SVD takes minutes per layer on a CPU.

    python -m benchmarks.bench_svd [--quick]
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.report import Row, item_main, seconds, timed
from benchmarks.synthetic import ReferenceShape, make_adapters
from lego_viz.adapters import LoraAdapter
from lego_viz.checks.factored import Factored, relative_error
from lego_viz.merge import merge

K = 16
QUICK_SHAPE = ReferenceShape(n_layers=1, shrink=8)
FULL_SHAPE = ReferenceShape(n_layers=1)  # PEFT needs ≈ 2 min per reference layer on 2 cores
SPEEDUP_TARGET = 100.0
DIFFERENCE_TARGET = 1e-4
MERGED = "svd_merge"


def llama_model(shape: ReferenceShape) -> LlamaForCausalLM:
    """A Llama model with the reference widths (÷ shape.shrink) and shape.n_layers blocks; weights left uninitialised."""
    config = LlamaConfig(
        hidden_size=4096 // shape.shrink,
        intermediate_size=14336 // shape.shrink,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128 // shape.shrink,
        num_hidden_layers=shape.n_layers,
        vocab_size=128,  # the merge never touches embeddings; keep them small
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Base weights are never read by an SVD merge: allocate without filling, so pages stay untouched.
    return model.to_empty(device="cpu")


def peft_model_with(adapters: list[LoraAdapter], shape: ReferenceShape):
    """Load our adapters' tensors into a PEFT model, one PEFT adapter per input adapter."""
    first = adapters[0]
    config = LoraConfig(
        r=shape.rank,
        lora_alpha=shape.lora_alpha,
        target_modules=first.config["target_modules"],
        init_lora_weights=False,
    )
    with warnings.catch_warnings():  # PEFT calls a transformers API deprecated in v5; nothing we can change
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(llama_model(shape), config, adapter_name=first.name)
        for adapter in adapters[1:]:
            model.add_adapter(adapter.name, config)
    prefix = "base_model.model."
    with torch.no_grad():
        for path, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            name = path.removeprefix(prefix)
            for adapter in adapters:
                lora = adapter.modules[name]
                layer.lora_A[adapter.name].weight.copy_(lora.A)
                layer.lora_B[adapter.name].weight.copy_(lora.B)
    return model


def peft_svd(model, names: list[str], k: int) -> dict[str, Factored]:
    """Run PEFT's SVD merge and return its result per module (scale 1: PEFT sets lora_alpha = r)."""
    model.add_weighted_adapter(names, [1.0] * len(names), MERGED, combination_type="svd", svd_rank=k)
    prefix = "base_model.model."
    return {
        path.removeprefix(prefix): Factored(
            layer.lora_B[MERGED].weight.detach(), layer.lora_A[MERGED].weight.detach()
        )
        for path, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and MERGED in layer.lora_A
    }


def timed_peft_svd(adapters: list[LoraAdapter], shape: ReferenceShape) -> tuple[dict[str, Factored], float]:
    """PEFT's SVD merge result and its time (building the PEFT model is not timed)."""
    model = peft_model_with(adapters, shape)
    return timed(lambda: peft_svd(model, [a.name for a in adapters], K))


def compare(shape: ReferenceShape, repeats: int = 3) -> tuple[float, float, float, int]:
    """Time both merges on the same adapters.

    Returns:
        (PEFT seconds, ours seconds — best of ``repeats``, largest relative Frobenius difference, modules).
    """
    adapters = make_adapters(shape)
    theirs, peft_time = timed_peft_svd(adapters, shape)
    ours_time = float("inf")
    for _ in range(repeats):
        merged, elapsed = timed(lambda: merge(adapters, "svd", k=K))
        ours_time = min(ours_time, elapsed)
    difference = max(
        relative_error(theirs[name], Factored.of(module)) for name, module in merged.modules.items()
    )
    return peft_time, ours_time, difference, len(merged.modules)


def run(quick: bool = False) -> list[Row]:
    shape = QUICK_SHAPE if quick else FULL_SHAPE
    peft_time, ours_time, difference, n_modules = compare(shape)
    speedup = peft_time / ours_time
    scope = f"{n_modules} modules ({shape.n_layers} layer{'s' if shape.n_layers > 1 else ''}"
    scope += f", widths ÷{shape.shrink})" if shape.shrink > 1 else " at reference widths)"
    return [
        Row(
            "2 svd",
            f"factored svd merge, k={K}, {scope}; ours best of 3",
            seconds(ours_time),
            f"PEFT svd {seconds(peft_time)}",
            f"{speedup:.0f}× faster",
            f"≥ {SPEEDUP_TARGET:.0f}×",
            speedup >= SPEEDUP_TARGET,
        ),
        Row(
            "2 svd",
            "largest relative difference ‖ΔW_ours − ΔW_PEFT‖_F / ‖ΔW_PEFT‖_F",
            "—",
            "—",
            f"{difference:.1e}",
            f"≤ {DIFFERENCE_TARGET:.0e}",
            difference <= DIFFERENCE_TARGET,
        ),
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    return item_main(run, __doc__, "1 layer at 1/8 width: seconds, for CI", argv)


if __name__ == "__main__":
    main()
