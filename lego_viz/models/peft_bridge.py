"""Merge adapters that live in a ``PeftModel``, the way PEFT users already work.

``model.load_adapter(path, adapter_name=...)`` several times, then :func:`merge_peft` adds the merge
next to them like ``add_weighted_adapter`` does — with any method of the registry, and with the
scale of each source read from the layer itself, so rsLoRA and per-module ``rank_pattern`` /
``alpha_pattern`` adapters merge exactly. The merged adapter goes in through PEFT's own
``add_adapter`` + ``set_peft_model_state_dict``, the path ``PeftModel.from_pretrained`` takes, so
it behaves exactly like the exported folder loaded from disk.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

from lego_viz.adapters import KEY_PREFIX, AdapterError, LoraAdapter, LoraModule
from lego_viz.merge import MergedAdapter, MergeError, merge


def _plain(value):
    """A PEFT config value as JSON-able data (sets → sorted lists, enums → their value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _free_name(model, adapter_name: str) -> None:
    if adapter_name in model.peft_config:
        # add_weighted_adapter returns silently here, leaving the old adapter under the new merge's name
        raise MergeError(f"the model already has an adapter {adapter_name!r}; choose another adapter_name "
                         "or remove it first with model.delete_adapter.")


def _peft_model(model):
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise AdapterError(f"expected a peft.PeftModel (PeftModel.from_pretrained(base, path)), got {type(model).__name__}; "
                           "adapters loaded through transformers' own load_adapter are not reachable here.")
    return model


def adapter_from_peft(model, adapter_name: str = "default") -> LoraAdapter:
    """The LoRA adapter ``adapter_name`` of a live ``PeftModel`` as a :class:`LoraAdapter`.

    Args:
        model: a ``peft.PeftModel`` holding the adapter.
        adapter_name: its name in ``model.peft_config``.

    Returns:
        The adapter with float32 factors and each module's scale as the layer applies it.

    Raises:
        AdapterError: not a PeftModel, unknown name, or a LoRA variant that is not a sum of rank-one units.
    """
    model = _peft_model(model)
    from peft.tuners.lora import LoraLayer

    if adapter_name not in model.peft_config:
        raise AdapterError(f"the model has no adapter {adapter_name!r}; it has {', '.join(model.peft_config)}.")
    config = _plain(model.peft_config[adapter_name].to_dict())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"adapter {adapter_name!r} is {config.get('peft_type')}, not LORA.")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterError(f"adapter {adapter_name!r} has {flag}=true: not a sum of rank-one units, so it is not merged.")
    modules: dict[str, LoraModule] = {}
    warnings: list[str] = []
    dtypes: set[str] = set()
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if A.dim() != 2:
            warnings.append(f"{name}: {A.dim()}-D LoRA (conv) is not supported and was left out.")
            continue
        dtypes.add(str(A.dtype).removeprefix("torch."))
        modules[name] = LoraModule(A=A.detach().float().cpu().contiguous(), B=B.detach().float().cpu().contiguous(),
                                   scale=float(layer.scaling[adapter_name]),
                                   fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)))
    if not modules:
        raise AdapterError(f"adapter {adapter_name!r} has no 2-D LoRA layers in this model.")
    return LoraAdapter(name=adapter_name, source=f"peft:{adapter_name}", config=config, modules=modules,
                       warnings=warnings, dtype=dtypes.pop() if len(dtypes) == 1 else "float32")


def add_to_peft(model, merged: MergedAdapter, adapter_name: str) -> None:
    """Add a merge to a ``PeftModel`` as adapter ``adapter_name`` (not activated), as from_pretrained would load it."""
    from peft import LoraConfig, set_peft_model_state_dict

    from lego_viz.export.folder import peft_config

    _free_name(_peft_model(model), adapter_name)
    settings = {key: value for key, value in peft_config(merged).items() if key != "peft_type"}
    model.add_adapter(adapter_name, LoraConfig(**settings))
    state = {}
    for name, lora in merged.modules.items():
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = lora.A
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = lora.B
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key and "lora_" in key]
    if missing or result.unexpected_keys:
        model.delete_adapter(adapter_name)
        raise MergeError(f"the merge does not fit the model: {len(missing)} LoRA weights missing, "
                         f"{len(result.unexpected_keys)} unexpected (e.g. {(missing or result.unexpected_keys)[0]}).")


def merge_peft(
    model,
    adapter_names: Sequence[str],
    method: str = "lego",
    k: int | Mapping[str, int] | None = None,
    weights: Sequence[float] | None = None,
    adapter_name: str = "merged",
    **options,
) -> MergedAdapter:
    """Merge adapters loaded in a ``PeftModel`` and add the result to it, like ``add_weighted_adapter``.

    Args:
        model: a ``peft.PeftModel`` with the adapters loaded (``load_adapter`` once per adapter).
        adapter_names: the adapters to merge.
        method: any method of :data:`lego_viz.merge.MERGE_METHODS`.
        k: target rank (``lego``, ``svd``): an int, a per-module mapping, or None.
        weights: one per adapter, default 1.
        adapter_name: name of the new adapter; ``model.set_adapter(adapter_name)`` activates it.
        **options: the method's options (``seed``, ``features``, ``density``...).

    Returns:
        The :class:`MergedAdapter` (export it with :func:`lego_viz.export.folder.export_adapter`).
    """
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    _free_name(_peft_model(model), adapter_name)  # before the merge's work, not after
    adapters = [adapter_from_peft(model, name) for name in adapter_names]
    merged = merge(adapters, method=method, k=k, weights=weights, name=adapter_name, **options)
    add_to_peft(model, merged, adapter_name)
    return merged


__all__ = ["adapter_from_peft", "add_to_peft", "merge_peft"]
