"""Adapters: the shared types, loading and validation, tensors that stay on disk, safetensors I/O.

``from lego_viz.adapters import load_adapters, LoraAdapter, ...`` is the public surface; the modules
beneath are :mod:`~lego_viz.adapters.types` (imported by everything), :mod:`~lego_viz.adapters.loading`,
:mod:`~lego_viz.adapters.stored`, :mod:`~lego_viz.adapters.safetensors_io`,
:mod:`~lego_viz.adapters.patterns` (rank_pattern keys matched in bounded time),
:mod:`~lego_viz.adapters.control` (the random-direction control adapters) and
:mod:`~lego_viz.adapters.files` (small user files read with a cap, never blocking).
"""

from lego_viz.adapters.loading import (
    adapter_weights,
    build_modules,
    check_compatible,
    hash_in_background,
    load_adapter,
    load_adapters,
    module_order,
    resolve_adapter_path,
    same_base,
    sha256_file,
    stored_dtype,
    twin_note,
)
from lego_viz.adapters.patterns import pattern_value
from lego_viz.adapters.types import (
    CONFIG_NAME,
    HUB_ID,
    KEY_PREFIX,
    PEFT_DEFAULT_ALPHA,
    WEIGHT_NAMES,
    AdapterError,
    LoraAdapter,
    LoraModule,
    printable,
)

__all__ = [
    "CONFIG_NAME", "HUB_ID", "KEY_PREFIX", "PEFT_DEFAULT_ALPHA", "WEIGHT_NAMES", "AdapterError", "LoraAdapter",
    "LoraModule", "adapter_weights", "build_modules", "check_compatible", "hash_in_background", "load_adapter",
    "load_adapters", "module_order", "pattern_value", "printable", "resolve_adapter_path", "same_base",
    "sha256_file", "stored_dtype", "twin_note",
]
