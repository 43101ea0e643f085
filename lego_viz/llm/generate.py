"""Batched greedy answers from a chat model: chat template, left padding, KV cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["chat_texts", "greedy"]


def chat_texts(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Each prompt as a one-turn chat with the model's own template, ready for the assistant's answer."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


def greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 32,
           progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy answers, batched (prompts sorted by length so a batch pads little), in the input order.

    Args:
        model: a causal LM (a ``PeftModel`` works too).
        tokenizer: its tokenizer; padding is forced to the left for the call.
        prompts: user messages.
        max_new_tokens: answer budget; an answer cut there is returned as it is.
        batch_size: prompts per forward.
        progress: called with (done, total) after each batch.

    Returns:
        The decoded answers without special tokens, stripped.
    """
    import torch

    texts = chat_texts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, top_p=None, top_k=None, temperature=None)
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[row, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = side
    return answers
