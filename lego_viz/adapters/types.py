"""The adapter types every layer shares: :class:`LoraModule`, :class:`LoraAdapter`, :class:`AdapterError`.

They live apart from loading (:mod:`lego_viz.adapters.loading`) so that the on-disk modules of
:mod:`lego_viz.adapters.stored` can subclass them without importing the loader.
"""

from __future__ import annotations

import re
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
# What PEFT's LoraConfig puts in for a config without lora_alpha (not r: the scale would differ).
PEFT_DEFAULT_ALPHA = 8
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class AdapterError(ValueError):
    """An adapter (or a set of adapters) cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module: ``ΔW = scale · B @ A`` on a base layer ``W0 (d_out, d_in)``.

    ``fan_in_fan_out`` marks GPT-2 ``Conv1D`` layers whose base weight is stored transposed;
    ``A`` and ``B`` keep the shapes below either way.
    """

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float
    fan_in_fan_out: bool = False

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale · B A`` of shape (d_out, d_in). Only for small layers and tests."""
        return self.scale * (self.B @ self.A)


@dataclass
class LoraAdapter:
    """A loaded LoRA adapter: its config, its LoRA modules and whatever else its file held."""

    name: str
    source: str
    config: dict
    modules: dict[str, LoraModule]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sha256: str = ""
    weights_file: str = ""
    config_sha256: str = ""  # the config sets the scale, so a recipe checks it as well as the weights
    weights_path: str = ""  # the weights file read, for a hash computed later (hash_in_background)
    dtype: str = "float32"  # how the file stored A and B (loading converts to float32); exports default to it
    # (device, inode, size, mtime) of the weights file when it was loaded: a merge that reads or hashes
    # it later refuses a file that has changed since (lego_viz.adapters.loading.check_unchanged)
    weights_identity: tuple = ()

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> list[int]:
        return [m.r for m in self.modules.values()]

    @property
    def n_msus(self) -> int:
        return sum(self.ranks)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def target_names(self) -> list[str]:
        """Short target names (``q_proj``, ``c_attn``) in first-seen order."""
        return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.modules))

    def summary(self) -> dict:
        """A small JSON-able description (the rows of ``inspect`` and of the app's adapter table)."""
        ranks = sorted(set(self.ranks))
        scales = sorted({round(m.scale, 6) for m in self.modules.values()})
        return {
            "name": self.name,
            "base_model": self.base_model,
            "r": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "scale": scales[0] if len(scales) == 1 else scales,
            "use_rslora": bool(self.config.get("use_rslora") or False),
            "fan_in_fan_out": self.fan_in_fan_out,
            "targets": self.target_names,
            "modules": len(self.modules),
            "msus": self.n_msus,
            "extra_tensors": len(self.extra_tensors),
            "source": self.source,
        }



_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value) -> str:
    """``repr(value)`` cut short: an error message names a value from a file, never echoes a huge one."""
    return _SHORT.repr(value)


def printable(text: str) -> str:
    """File names may hold bytes that are not UTF-8 (surrogate escapes); show them as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
