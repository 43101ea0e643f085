"""Save and load a SMoRA adapter as a folder: `smora_config.json` + `smora_model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lego_viz.adapters.files import FileTooLarge, NotRegularFile, read_capped
from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.inject import inject_smora, smora_layers

CONFIG_NAME = "smora_config.json"
WEIGHTS_NAME = "smora_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # a SMoRA config is a few kB
MAX_RESULTS_BYTES = 64 << 20  # an experiment's results.json is about 80 kB
# Everything a SMoRA layer owns except the wrapped base layer: factors, router, β and rank sources.
_LAYER_KEYS = ("lora_A", "lora_B", "router.weight", "router.bias", "unit_source")


def smora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The SMoRA tensors of `model`, keyed `"<module>.<tensor>"` (e.g. `"...q_proj.router.bias"`)."""
    state = {}
    for name, layer in smora_layers(model).items():
        own = layer.state_dict()
        for key in _LAYER_KEYS:
            state[f"{name}.{key}"] = own[key].detach().cpu().contiguous()
    return state


def save_smora(model: nn.Module, folder: str | Path, force: bool = False, extra: dict | None = None) -> Path:
    """Write the SMoRA layers of `model` to `folder`.

    Args:
        model: A model with SMoRA layers (from `inject_smora` or `load_smora`).
        folder: Output folder, created if needed.
        force: Overwrite an existing SMoRA adapter in `folder`.
        extra: Optional JSON-able metadata stored in the config file under `"extra"` (e.g. training record).

    Returns:
        The folder path.
    """
    config = getattr(model, "smora_config", None)
    if config is None or not smora_layers(model):
        raise ValueError("model has no SMoRA layers to save; call inject_smora first")
    folder = Path(folder)
    if (folder / CONFIG_NAME).exists() and not force:
        raise FileExistsError(f"{folder / CONFIG_NAME} exists; pass force=True to overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(smora_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    payload = {"smora": config.to_dict(), "extra": extra or {}}
    (folder / CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return folder


def read_json(path: str | Path, max_bytes: int) -> object:
    """A JSON file read with a size cap: a regular file (a pipe or device never blocks the read), at most
    ``max_bytes``, valid UTF-8 JSON; anything else is a ``ValueError`` that names the file."""
    path = Path(path)
    try:
        data = read_capped(path, max_bytes)
    except NotRegularFile:
        raise ValueError(f"{path} is not a regular file (a device or pipe?)") from None
    except FileTooLarge:
        raise ValueError(f"{path} is larger than {max_bytes >> 20} MiB; not a file lego-viz wrote") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({str(exc)[:120]})") from None


def read_smora_config(folder: str | Path) -> tuple[SMoRAConfig, dict]:
    """The config and the `extra` metadata of a saved SMoRA folder."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a SMoRA adapter folder")
    payload = read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(payload, dict) or not isinstance(payload.get("smora"), dict):
        raise ValueError(f"{path} has no \"smora\" object: not a SMoRA config written by save_smora")
    extra = payload.get("extra", {})
    return SMoRAConfig.from_dict(payload["smora"]), extra if isinstance(extra, dict) else {}


def load_smora(model: nn.Module, folder: str | Path) -> SMoRAConfig:
    """Inject the SMoRA adapter saved in `folder` into `model` (in place) and load its tensors exactly.

    Args:
        model: The base model the adapter was trained on, without SMoRA layers.
        folder: A folder written by `save_smora`.

    Returns:
        The adapter's config.
    """
    config, _ = read_smora_config(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found next to {CONFIG_NAME}")
    state = load_file(str(weights))
    layers = inject_smora(model, config)
    expected = {f"{name}.{key}" for name in layers for key in _LAYER_KEYS}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit this model: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {unexpected[:3]} ({len(unexpected)}); is it the right base model?"
        )
    for name, layer in layers.items():
        own = {key: state[f"{name}.{key}"] for key in _LAYER_KEYS}
        try:
            layer.load_state_dict(own, strict=False)  # the base layer's own weights come from the model
        except RuntimeError as err:
            raise ValueError(f"{weights}: tensors of {name} do not fit this model: {err}") from err
    return config
