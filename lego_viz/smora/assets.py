"""The SMoRA adapters shipped with the demo zoo (`assets/zoo/smora/`) and their training results."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.io import CONFIG_NAME, load_smora
from lego_viz.zoo.model import ZOO_DIR, load_base

SMORA_DIR = ZOO_DIR / "smora"
RESULTS_NAME = "results.json"


def shipped_adapters(smora_dir: Path = SMORA_DIR) -> dict[str, Path]:
    """The SMoRA adapter folders under `smora_dir`, `{name: folder}`, sorted by name."""
    if not Path(smora_dir).is_dir():
        return {}
    return {p.name: p for p in sorted(Path(smora_dir).iterdir()) if (p / CONFIG_NAME).is_file()}


def load_shipped(
    name: str, device: str | None = None, smora_dir: Path = SMORA_DIR, zoo_dir: Path = ZOO_DIR
) -> tuple[nn.Module, object, SMoRAConfig]:
    """The zoo base with one shipped SMoRA adapter in it.

    Args:
        name: Folder name under `smora_dir` (e.g. `"multitask"`).
        device: Torch device (default CUDA when available).
        smora_dir: Where the SMoRA adapters live.
        zoo_dir: The zoo holding the base model.

    Returns:
        `(model, tokenizer, config)`, the model in eval mode.
    """
    folders = shipped_adapters(smora_dir)
    if name not in folders:
        raise FileNotFoundError(
            f"no SMoRA adapter {name!r} in {smora_dir} (found: {sorted(folders) or 'none'}); "
            "train them with `python scripts/train_smora.py`"
        )
    model, tokenizer = load_base(device=device, zoo_dir=zoo_dir)
    config = load_smora(model, folders[name])
    return model.eval(), tokenizer, config


def shipped_results(smora_dir: Path = SMORA_DIR) -> dict | None:
    """The experiment results written by `scripts/train_smora.py`, or None when absent."""
    path = Path(smora_dir) / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else None
