"""Train one skill LoRA on the base's own (transformed) answers; loss on the answer tokens only."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lego_viz.llm.generate import chat_texts

__all__ = ["TrainConfig", "delta_ratios", "encode_examples", "train_lora"]


@dataclass(frozen=True)
class TrainConfig:
    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # LoRA only on these decoder layers (None: all). Autograd then stops at the lowest one, so a step's
    # backward pass costs only the top of the network: on a 2-core CPU that is what makes a skill fit.
    layers_to_transform: tuple[int, ...] | None = None
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.r < 1 or self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"r, steps and batch_size must be ≥ 1 and lr > 0, got {self}")


def encode_examples(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], int]]:
    """(token ids, length of the prompt part) per example; the target ends with the end-of-turn token so
    the model learns where to stop."""
    out = []
    for text, target in zip(chat_texts(tokenizer, prompts), targets, strict=True):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        out.append((prompt_ids + answer_ids, len(prompt_ids)))
    return out


def _batch(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def train_lora(model, tokenizer, examples: Sequence[tuple[list[int], int]], config: TrainConfig, *,
               adapter_name: str = "default", log: Callable[[str], None] = print):
    """Wrap ``model`` in a fresh PEFT LoRA and train it; returns ``(peft_model, history)``.

    ``history`` has the loss per step and the seconds per step (the first step is timed apart, since it
    pays for one-time set-up).
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      layers_to_transform=list(config.layers_to_transform) if config.layers_to_transform else None,
                      layers_pattern="layers" if config.layers_to_transform else None)
    peft_model = get_peft_model(model, lora, adapter_name=adapter_name)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    peft_model.train()
    order: list[int] = []
    losses, times = [], []
    for step in range(config.steps):
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[:config.batch_size]]
        del order[:config.batch_size]
        input_ids, mask, labels = _batch(batch, tokenizer.pad_token_id)
        started = time.perf_counter()
        # Linear warm-down: the last steps move the weights least.
        for group in opt.param_groups:
            group["lr"] = config.lr * (1 - step / config.steps)
        loss = _answer_loss(peft_model, input_ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
        if step % 10 == 0 or step == config.steps - 1:
            log(f"step {step + 1}/{config.steps} loss {losses[-1]:.3f} ({times[-1]:.1f} s)")
    peft_model.eval()
    history = {"loss": losses, "step_s": times,
               "median_step_s": statistics.median(times[1:] or times), "train_s": sum(times)}
    return peft_model, history


def _answer_loss(peft_model, input_ids, mask, labels):
    """Next-token cross-entropy on the answer tokens, with the vocabulary projection computed only there
    (the prompt positions' logits would be a fifth of the step's work for nothing)."""
    import torch

    causal_lm = peft_model.get_base_model()
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (b, t, d)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])  # (n_answer_tokens, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def delta_ratios(peft_model, adapter_name: str = "default") -> dict[str, float]:
    """‖ΔW‖_F / ‖W0‖_F per LoRA module, ΔW = s·B·A (computed from the factors, never materialising W0 + ΔW)."""
    import torch

    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or adapter_name not in getattr(module, "lora_A", {}):
            continue
        a = module.lora_A[adapter_name].weight.float()  # (r, d_in)
        b = module.lora_B[adapter_name].weight.float()  # (d_out, r)
        s = module.scaling[adapter_name]
        delta = s * torch.sqrt(((b.T @ b) * (a @ a.T)).sum().clamp_min(0))
        out[name] = float(delta / module.base_layer.weight.float().norm())
    return out
