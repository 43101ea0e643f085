"""Base models for the app's model-running panels, lent to one request at a time.

The checks and the run panel add LoRA updates to a base model with forward hooks
(`lego_viz.checks.invariance.lora_hooks`). Hooks live on the model object, so two requests must never
use the same instance at once: a bounded pool creates instances on demand and lends each to
one request, and no user's hooks can leak into another user's outputs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from lego_viz.adapters import LoraAdapter
from lego_viz.ui.runtime import device

Loader = Callable[[], tuple[object, object]]


class ModelPool:
    """At most `max_size` (model, tokenizer) pairs from `loader`, each lent to one borrower at a time.

    Args:
        loader: builds a fresh (model, tokenizer); called lazily, at most `max_size` times.
        max_size: upper bound on instances (memory); further borrowers wait for a free one.
    """

    def __init__(self, loader: Loader, max_size: int = 2) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self._loader = loader
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.Semaphore(max_size)
        self._lock = threading.Lock()
        self.created = 0

    @contextlib.contextmanager
    def borrow(self) -> Iterator[tuple[object, object]]:
        """Lend a (model, tokenizer) pair for the duration of the `with` block."""
        self._slots.acquire()
        try:
            try:
                pair = self._idle.get_nowait()
            except queue.Empty:
                pair = self._loader()
                with self._lock:
                    self.created += 1
            try:
                yield pair
            finally:
                self._idle.put(pair)
        finally:
            self._slots.release()


def zoo_available() -> bool:
    """Whether the demo zoo's base model is built (the model-running panels need it)."""
    from lego_viz.zoo.model import ZOO_DIR

    return (ZOO_DIR / "base" / "config.json").is_file()


def _load_zoo_base() -> tuple[object, object]:
    from lego_viz.zoo.model import load_base

    return load_base(device=device())


_ZOO: ModelPool | None = None
_ZOO_LOCK = threading.Lock()


def zoo_pool() -> ModelPool:
    """The process-wide pool of zoo base models (created on first use)."""
    global _ZOO
    with _ZOO_LOCK:
        if _ZOO is None:
            _ZOO = ModelPool(_load_zoo_base, max_size=2)
        return _ZOO


def fits_model(model: torch.nn.Module, adapters: Sequence[LoraAdapter]) -> bool:
    """Whether every module of every adapter exists in `model` with matching in/out sizes."""
    named = dict(model.named_modules())
    for adapter in adapters:
        for name, lora in adapter.modules.items():
            weight = getattr(named.get(name), "weight", None)
            if weight is None or weight.dim() != 2:
                return False
            # nn.Linear stores (d_out, d_in); GPT-2 Conv1D (fan_in_fan_out) stores (d_in, d_out).
            expected = (lora.d_in, lora.d_out) if lora.fan_in_fan_out else (lora.d_out, lora.d_in)
            if tuple(weight.shape) != expected:
                return False
    return True
