"""Several LoRA variants of one base in one batch: row group ``v`` of the batch runs as variant ``v``.

Greedy decoding of a small model on a CPU is bound by reading the weights, not by arithmetic: a forward
pass of four rows costs little more than one of a single row. So the base, each adapter and a merge
answer a prompt together, in one ``generate`` call with the KV cache, instead of one call each.

The updates are added with forward hooks, so the base is never modified. Per module, each variant's
units are stacked (several module sets of one variant are concatenated, which is their sum: ARCHITECTURE
§3.2), zero-padded to the largest rank among the variants, with the scale folded into the ``A`` half;
one batched product then serves every variant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from lego_viz.adapters import LoraModule
from lego_viz.models.compare import Variant

__all__ = ["batched_lora", "greedy_batched", "stacked_factors"]


def stacked_factors(
    variants: Sequence[Variant], dtype: torch.dtype = torch.float32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, every variant's units stacked and zero-padded to one rank ``R``.

    Returns:
        module name → (``A`` (V, R, d_in) with the scale folded in, ``B`` (V, d_out, R)); a variant
        without the module has zero rows there, so it adds nothing.
    """
    per_module: dict[str, list[list[LoraModule]]] = {}
    for v, variant in enumerate(variants):
        for modules in variant.modules:
            for name, lora in modules.items():
                per_module.setdefault(name, [[] for _ in variants])[v].append(lora)
    stacks = {}
    for name, loras in per_module.items():
        first = next(lora for group in loras for lora in group)
        rank = max(sum(lora.r for lora in group) for group in loras)
        a = torch.zeros(len(variants), rank, first.d_in, dtype=dtype)
        b = torch.zeros(len(variants), first.d_out, rank, dtype=dtype)
        for v, group in enumerate(loras):
            start = 0
            for lora in group:
                a[v, start:start + lora.r] = lora.scale * lora.A.to(dtype)
                b[v, :, start:start + lora.r] = lora.B.to(dtype)
                start += lora.r
        stacks[name] = (a, b)
    return stacks


def _hook(a: torch.Tensor, b: torch.Tensor):
    n_variants = a.shape[0]

    def hook(_module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]  # (V·P, L, d_in): rows of one variant are consecutive
        if x.shape[0] % n_variants:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split among {n_variants} variants.")
        grouped = x.reshape(n_variants, -1, x.shape[-1])  # (V, P·L, d_in)
        update = torch.bmm(torch.bmm(grouped, a.transpose(1, 2)), b.transpose(1, 2))  # (V, P·L, d_out)
        return output + update.reshape(output.shape)

    return hook


@contextlib.contextmanager
def batched_lora(model: torch.nn.Module, variants: Sequence[Variant]) -> Iterator[None]:
    """Inside the block, the batch's rows split into ``len(variants)`` equal consecutive groups, and group
    ``v`` runs as ``variants[v]`` (the base plus its module sets). Hooks are removed on exit.

    Raises:
        ValueError: a variant swaps parameters (a task head), which one batch cannot hold.
        KeyError: the model lacks a module the variants target (another architecture).
    """
    if any(v.heads for v in variants):
        raise ValueError("a variant with its own task head cannot share a batch; run it alone (compare.greedy_outputs).")
    named = dict(model.named_modules())
    param = next(model.parameters())
    stacks = stacked_factors(variants, param.dtype)
    missing = [name for name in stacks if name not in named]
    if missing:
        raise KeyError(f"the model has no module {missing[0]!r}; the adapters were trained on another architecture.")
    handles = []
    try:
        for name, (a, b) in stacks.items():
            handles.append(named[name].register_forward_hook(_hook(a.to(param.device), b.to(param.device))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def greedy_batched(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], variants: Sequence[Variant], max_new_tokens: int = 32
) -> list[list[str]]:
    """Greedy answers of every variant to every text, in one batched ``generate`` with the KV cache.

    Args:
        model: the base causal LM.
        tokenizer: its tokenizer (padding is put on the left for the call).
        texts: model inputs as they are (apply a chat template first where the model wants one).
        variants: the models to run; see :func:`batched_lora`.
        max_new_tokens: answer budget.

    Returns:
        ``answers[v][i]``: variant ``v``'s answer to ``texts[i]``, special tokens dropped, stripped.
    """
    if not texts or not variants:
        return [[] for _ in variants]
    rows = [text for _ in variants for text in texts]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # any id will do: padded positions are masked out
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    with batched_lora(model, variants):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             top_p=None, top_k=None, temperature=None)
    answers = [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]
    return [answers[v * len(texts):(v + 1) * len(texts)] for v in range(len(variants))]

