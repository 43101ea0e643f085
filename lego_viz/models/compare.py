"""Run the base, each source adapter and merges side by side on the user's text.

Three views of one question — does the merge still behave?

* greedy outputs for a prompt (:func:`greedy_outputs`);
* per-token log-likelihood of the text under each model, and the **output-space retention** of each
  source adapter in a merge (:func:`output_retention`): over every token position of the texts,

      KL(t ‖ merge) = mean over positions of Σ_v p_t(v) · (log p_t(v) − log p_merge(v))
      KL(t ‖ base)  = the same with the base in place of the merge
      kept          = 1 − KL(t ‖ merge) / KL(t ‖ base)

  where ``p_t`` is the next-token distribution of the base with adapter t alone at weight 1. ``kept``
  is 1 when the merge predicts exactly what the adapter does, 0 when it is no closer to the adapter
  than the base is, and negative when it is farther. It is left undefined (NaN) for an adapter whose
  KL(t ‖ base) is below :data:`MIN_EFFECT_KL`: one that barely changes the base has nothing to keep,
  and the ratio would only amplify noise. No labels are needed;
* output-space invariance checks on the real base (:func:`output_space_checks`).

Adapters are added with forward hooks (:func:`lego_viz.checks.invariance.lora_hooks`), so one loaded base
serves every variant. Headless: the app and the CLI format what these functions return.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lego_viz.adapters import LoraAdapter, LoraModule
from lego_viz.adapters.files import FileTooLarge, NotRegularFile, read_capped
from lego_viz.checks.invariance import check_outputs, logits_with, lora_hooks
from lego_viz.models.base import adapter_heads, swapped_parameters

Modules = Mapping[str, LoraModule]
# Bounds on the user's text: a few dozen prompts of a few hundred tokens keep one retention run
# (T + 2 forward passes per text) within about a minute for gpt2 on a 2-core CPU.
MAX_TEXTS = 64
MAX_TEXT_BYTES = 1_000_000
MAX_TOKENS = 256
# Output-space check tolerance on max |Δlogit|, relative to the largest |logit| of the base: float32
# sums in another order differ by ~1e-7 relative; bfloat16 keeps 8 bits of mantissa (~4e-3).
OUTPUT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# Below this KL(adapter ‖ base) (nats per token) an adapter counts as "no measurable effect" on the
# texts and its `kept` is NaN: a weakly trained real adapter (‖ΔW‖ ≈ 0.2) sits near 1e-6.
MIN_EFFECT_KL = 1e-4
_JSON_KEYS = ("text", "prompt", "input", "content")


class TextError(ValueError):
    """The user's text or prompt file cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Variant:
    """One model to run: the base plus some LoRA module sets, with some parameters swapped in (heads)."""

    label: str
    modules: tuple[Modules, ...] = ()
    heads: Mapping[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def applied(model: torch.nn.Module, variant: Variant) -> Iterator[None]:
    """The model behaves as ``variant`` inside the block."""
    with lora_hooks(model, *variant.modules), swapped_parameters(model, variant.heads):
        yield


def model_variants(
    model: torch.nn.Module, adapters: Sequence[LoraAdapter], merges: Mapping[str, Modules]
) -> tuple[list[Variant], list[str]]:
    """Base, each adapter alone at weight 1 (with the heads PEFT would load for it), and each merge.

    Returns:
        (variants in that order, notes on heads used or left out)
    """
    variants = [Variant("base")]
    notes: list[str] = []
    for adapter in adapters:
        heads, head_notes = adapter_heads(model, adapter)
        notes += head_notes
        variants.append(Variant(adapter.name, (adapter.modules,), heads))
    variants += [Variant(label, (modules,)) for label, modules in merges.items()]
    if any(a.extra_tensors for a in adapters) and merges:
        notes.append("merges hold LoRA units only: no task head or modules_to_save is carried into them.")
    return variants, notes


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_outputs(model, tokenizer, prompt: str, variants: Sequence[Variant], max_new_tokens: int = 32) -> list[tuple[str, str]]:
    """Greedy completion of ``prompt`` by each variant.

    Returns:
        (label, completion) per variant, in order.
    """
    if not prompt or not prompt.strip():
        raise TextError("the prompt is empty; type a prompt first.")
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -MAX_TOKENS:].to(_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for variant in variants:
        with applied(model, variant):
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )
        rows.append((variant.label, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return rows


# --------------------------------------------------------------------------- the user's texts


def parse_texts(content: str, kind: str = "txt", max_texts: int = MAX_TEXTS) -> tuple[list[str], list[str]]:
    """Texts from pasted text or a file's content: one per non-empty line (``txt``), or ``jsonl``.

    A ``jsonl`` line is a JSON string or an object with a ``text``, ``prompt``, ``input`` or
    ``content`` field.

    Returns:
        (texts, notes) — the notes say when texts beyond ``max_texts`` were left out.
    """
    if len(content.encode("utf-8", "surrogateescape")) > MAX_TEXT_BYTES:
        raise TextError(f"the text is larger than {MAX_TEXT_BYTES // 1000} kB; give fewer or shorter prompts.")
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        if kind != "jsonl":
            texts.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextError(f"line {number} is not valid JSON ({exc.msg}); a .jsonl file has one JSON object per line.") from None
        if isinstance(item, dict):
            item = next((item[k] for k in _JSON_KEYS if isinstance(item.get(k), str)), None)
        if not isinstance(item, str) or not item.strip():
            raise TextError(f"line {number} has no text: expected a JSON string or an object with one of {', '.join(_JSON_KEYS)}.")
        texts.append(item.strip())
    if not texts:
        raise TextError("no text given: paste some text (one prompt per line) or upload a .txt / .jsonl file of prompts.")
    notes = []
    if len(texts) > max_texts:
        notes.append(f"used the first {max_texts} of {len(texts)} texts.")
        texts = texts[:max_texts]
    return texts, notes


def read_texts(path: str | Path, max_texts: int = MAX_TEXTS) -> tuple[list[str], list[str]]:
    """:func:`parse_texts` of a ``.txt`` or ``.jsonl`` file."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("txt", "jsonl"):
        raise TextError(f"{path.name}: give a .txt (one prompt per line) or .jsonl file.")
    try:
        raw = read_capped(path, MAX_TEXT_BYTES)
    except OSError as exc:
        raise TextError(f"{path.name}: cannot be read ({exc.strerror}).") from None
    except NotRegularFile:
        raise TextError(f"{path.name} is not a regular file (a device, pipe or folder); give a .txt or .jsonl file.") from None
    except FileTooLarge:
        raise TextError(f"{path.name} is larger than {MAX_TEXT_BYTES // 1000} kB; give fewer or shorter prompts.") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TextError(f"{path.name} is not UTF-8 text.") from None
    return parse_texts(content, kind, max_texts)


# --------------------------------------------------------------------------- retention


@dataclass
class RetentionReport:
    """Per-token log-likelihoods and KL retention of each adapter in each merge (see the module doc)."""

    adapters: list[str]
    merges: list[str]
    n_texts: int = 0
    n_tokens: int = 0  # next-token positions averaged over (the KL figures)
    loglik: dict[str, float] = field(default_factory=dict)  # model label → mean log p(next token)
    kl_to_base: dict[str, float] = field(default_factory=dict)  # adapter → mean KL(adapter ‖ base)
    kl_to_merge: dict[str, dict[str, float]] = field(default_factory=dict)  # merge → adapter → mean KL(adapter ‖ merge)
    notes: list[str] = field(default_factory=list)

    def kept(self, merge: str, adapter: str) -> float:
        """``1 − KL(adapter ‖ merge) / KL(adapter ‖ base)``; NaN below :data:`MIN_EFFECT_KL`."""
        to_base = self.kl_to_base[adapter]
        return 1.0 - self.kl_to_merge[merge][adapter] / to_base if to_base >= MIN_EFFECT_KL else math.nan

    def mean_kept(self, merge: str) -> float:
        """Mean ``kept`` over the source adapters (a k-sweep's y-axis for real adapters)."""
        values = [v for v in (self.kept(merge, a) for a in self.adapters) if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def rows(self) -> list[dict]:
        """One row per (merge, adapter)."""
        return [
            {
                "merge": merge, "adapter": adapter, "kl_to_merge": self.kl_to_merge[merge][adapter],
                "kl_to_base": self.kl_to_base[adapter], "kept": self.kept(merge, adapter),
                "loglik_adapter": self.loglik[adapter], "loglik_merge": self.loglik[merge],
            }
            for merge in self.merges for adapter in self.adapters
        ]

    def to_dict(self) -> dict:
        """JSON-able; an undefined ``kept`` is None."""
        data = asdict(self)
        data["rows"] = [{k: _none_if_nan(v) for k, v in row.items()} for row in self.rows()]
        data["mean_kept"] = {m: _none_if_nan(self.mean_kept(m)) for m in self.merges}
        return data


def _none_if_nan(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _encode(tokenizer, text: str, device: torch.device) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[:, :MAX_TOKENS].to(device)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Σ over positions of KL(p ‖ q) for rows of log-probabilities (L, V)."""
    return float((logp.exp() * (logp - logq)).sum())


@torch.no_grad()
def output_retention(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    adapters: Sequence[LoraAdapter],
    merges: Mapping[str, Modules],
) -> RetentionReport:
    """Log-likelihood of each model and the KL retention of each adapter in each merge, on ``texts``.

    Args:
        model: the base causal LM (hooks are added and removed; nothing else changes).
        tokenizer: its tokenizer; each text is cut to :data:`MAX_TOKENS` tokens.
        texts: the user's texts (see :func:`parse_texts`).
        adapters: the source adapters, each run alone at weight 1 (with its usable heads).
        merges: label → merged LoRA modules; several merges share the base and adapter passes,
            so a k-sweep costs one extra forward pass per text and k.

    Returns:
        The report; ``report.kept(merge, adapter)`` and ``report.mean_kept(merge)`` give the retention.
    """
    variants, notes = model_variants(model, adapters, merges)
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be unique; got {', '.join(labels)} (rename the merge or the adapter).")
    report = RetentionReport(adapters=[a.name for a in adapters], merges=list(merges), notes=notes)
    n_refs = 1 + len(adapters)  # base, then the adapters: their log-probs are kept per text for the KLs
    sums = dict.fromkeys(labels, 0.0)
    kl_base = dict.fromkeys(report.adapters, 0.0)
    kl_merge = {m: dict.fromkeys(report.adapters, 0.0) for m in merges}
    predicted = skipped = 0
    device = _device(model)
    for text in texts:
        ids = _encode(tokenizer, text, device)
        if ids.shape[1] < 2:
            skipped += 1
            continue
        report.n_texts += 1
        report.n_tokens += ids.shape[1]
        predicted += ids.shape[1] - 1
        targets = ids[0, 1:, None]
        refs: list[torch.Tensor] = []
        for i, variant in enumerate(variants):
            with applied(model, variant):
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (L, V)
            sums[variant.label] += float(logp[:-1].gather(1, targets).sum())
            if i < n_refs:
                refs.append(logp)
            else:  # a merge: compared with every adapter as it comes, then dropped
                for name, ref in zip(report.adapters, refs[1:]):
                    kl_merge[variant.label][name] += _kl(ref, logp)
        for name, ref in zip(report.adapters, refs[1:]):
            kl_base[name] += _kl(ref, refs[0])
    if not report.n_texts:
        raise TextError("every text is shorter than two tokens; give longer texts.")
    if skipped:
        report.notes.append(f"{skipped} text(s) shorter than two tokens were skipped.")
    report.loglik = {label: total / predicted for label, total in sums.items()}
    report.kl_to_base = {name: total / report.n_tokens for name, total in kl_base.items()}
    report.kl_to_merge = {m: {name: total / report.n_tokens for name, total in row.items()} for m, row in kl_merge.items()}
    return report


def retention_sweep(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], adapters: Sequence[LoraAdapter], merges_by_k: Mapping[int, Modules]
) -> dict[int, float]:
    """Mean ``kept`` over the source adapters for each k: a k-sweep's y-axis for real adapters.

    Args:
        merges_by_k: k → the merged modules at that k (e.g. ``merge(adapters, "lego", k=k).modules``).

    Returns:
        k → :meth:`RetentionReport.mean_kept`; the base and adapter passes are shared by every k.
    """
    report = output_retention(model, tokenizer, texts, adapters, {f"k={k}": m for k, m in merges_by_k.items()})
    return {k: report.mean_kept(f"k={k}") for k in merges_by_k}


# --------------------------------------------------------------------------- output-space checks


@dataclass(frozen=True)
class OutputCheck:
    """One output-space invariance check on a real base: max |Δlogit| against its tolerance."""

    name: str
    max_abs_diff: float
    tolerance: float
    expect_pass: bool

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.tolerance) == self.expect_pass


@torch.no_grad()
def output_space_checks(
    model: torch.nn.Module, tokenizer, text: str, adapters: Sequence[LoraAdapter], weights: Sequence[float] | None = None, seed: int = 0
) -> list[OutputCheck]:
    """Permutation, concatenation = sum, and the broken A-only shuffle, as logits on ``text`` (ARCHITECTURE §3).

    The tolerance scales with the base's largest |logit| and its dtype (:data:`OUTPUT_RTOL`): real
    bases have logits in the hundreds, where float32 rounding alone reaches ~1e-4.
    """
    ids = _encode(tokenizer, text, _device(model))
    if ids.shape[1] < 1:
        raise TextError("the check text is empty; give a prompt.")
    scale = float(logits_with(model, ids).abs().max())
    dtype = next(model.parameters()).dtype
    tolerance = OUTPUT_RTOL.get(dtype, 1e-2) * max(scale, 1.0)
    diffs = check_outputs(model, ids, adapters, weights, seed=seed)
    return [OutputCheck(name, diff, tolerance, name != "permutation_a_only") for name, diff in diffs.items()]
