"""The SMoRA adapters shipped with the demo zoo (`assets/zoo/smora/`) and their training results."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.io import CONFIG_NAME, WEIGHTS_NAME, load_smora, read_smora_config
from lego_viz.zoo.model import ZOO_DIR, load_base

SMORA_DIR = ZOO_DIR / "smora"
RESULTS_NAME = "results.json"


def _dirs(smora_dir: Path | None, zoo_dir: Path | None = None) -> tuple[Path, Path]:
    # looked up at call time, so tests (and other zoos) can point the module elsewhere
    return Path(smora_dir or SMORA_DIR), Path(zoo_dir or ZOO_DIR)


def base_fingerprint(zoo_dir: Path | None = None) -> str:
    """sha256 of the zoo base weights: a SMoRA adapter only makes sense on the base it was trained on."""
    path = _dirs(None, zoo_dir)[1] / "base" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"zoo base weights not found at {path}; build the zoo with `python scripts/build_zoo.py`")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_adapters(smora_dir: Path | None = None) -> dict[str, Path]:
    """The SMoRA adapter folders under `smora_dir` (default `SMORA_DIR`), `{name: folder}`, sorted by name."""
    smora_dir, _ = _dirs(smora_dir)
    if not smora_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(smora_dir.iterdir()) if (p / CONFIG_NAME).is_file()}


def load_shipped(
    name: str, device: str | None = None, smora_dir: Path | None = None, zoo_dir: Path | None = None
) -> tuple[nn.Module, object, SMoRAConfig]:
    """The zoo base with one shipped SMoRA adapter in it.

    Args:
        name: Folder name under `smora_dir` (e.g. `"multitask"`).
        device: Torch device (default CUDA when available).
        smora_dir: Where the SMoRA adapters live (default `SMORA_DIR`).
        zoo_dir: The zoo holding the base model (default `ZOO_DIR`).

    Returns:
        `(model, tokenizer, config)`, the model in eval mode.
    """
    smora_dir, zoo_dir = _dirs(smora_dir, zoo_dir)
    folders = shipped_adapters(smora_dir)
    if name not in folders:
        raise FileNotFoundError(
            f"no SMoRA adapter {name!r} in {smora_dir} (found: {sorted(folders) or 'none'}); "
            "train them with `python scripts/train_smora.py`"
        )
    _, extra = read_smora_config(folders[name])
    trained_on = extra.get("base_sha256")
    if trained_on is not None and trained_on != base_fingerprint(zoo_dir):
        raise ValueError(
            f"SMoRA adapter {name!r} was trained on another zoo base (sha256 {trained_on[:12]}…); "
            "the zoo was rebuilt since: re-run `python scripts/train_smora.py`"
        )
    model, tokenizer = load_base(device=device, zoo_dir=zoo_dir)
    config = load_smora(model, folders[name])
    return model.eval(), tokenizer, config


def shipped_results(smora_dir: Path | None = None) -> dict | None:
    """The experiment results written by `scripts/train_smora.py`, or None when absent."""
    path = _dirs(smora_dir)[0] / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def adapter_modules(folder: Path) -> list[str]:
    """Names of the SMoRA layers saved in `folder` (layers in numeric order), without loading any tensor."""
    with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as handle:
        keys = list(handle.keys())
    names = [key.removesuffix(".lora_A") for key in keys if key.endswith(".lora_A")]
    # "layers.10" after "layers.9": compare digit runs as numbers
    return sorted(names, key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def saved_tensor(folder: Path, key: str) -> torch.Tensor:
    """One tensor of a saved SMoRA adapter (e.g. `"<module>.router.bias"`), read without loading the rest."""
    with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as handle:
        if key not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise KeyError(f"{folder} has no tensor {key!r}")
        return handle.get_tensor(key)
