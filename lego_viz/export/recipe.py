"""mergekit-style YAML configs for LoRA → LoRA merges; the ``recipe.yaml`` of every export is one.

The shape people already write for mergekit::

    merge_method: lego
    base_model: openai-community/gpt2      # optional: checked against the adapters' base
    models:
      - model: path/or/hub-id               # a LoRA adapter here, not a full model
        parameters: {weight: 1.0}
    parameters: {k: 8, seed: 0}
    dtype: bfloat16                         # of the saved factors

mergekit merges full models and cannot write a LoRA (its issue 86); here every ``model`` is a LoRA
adapter and the output is one. ``weight`` multiplies each adapter's ΔW as in mergekit's
``task_arithmetic`` (an alias of ``linear`` here); ``normalize: true`` divides the weights by their
sum, which mergekit's ``linear`` does by default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lego_viz.adapters import LoraAdapter, load_adapters, same_base
from lego_viz.export.serving import DTYPES
from lego_viz.export.yaml_io import ConfigError, read_yaml, shown

RECIPE_VERSION = 2
TOP_LEVEL_KEYS = ("merge_method", "models", "parameters", "base_model", "dtype", "out_dtype", "max_rank",
                  "allow_base_mismatch", "lego_viz_recipe")
MODEL_KEYS = ("model", "parameters", "name", "sha256", "config_sha256")
MODEL_PARAMETERS = ("weight", "density")
METHOD_ALIASES = {"task_arithmetic": "linear"}


@dataclass(frozen=True)
class ModelEntry:
    """One adapter of a config: where it is, its weight, and (in recipes) the hashes it had."""

    model: str
    weight: float = 1.0
    name: str | None = None
    sha256: str = ""
    config_sha256: str = ""


@dataclass(frozen=True)
class MergeConfig:
    """A validated config: everything :func:`lego_viz.merge.merge` and the export need."""

    method: str
    models: tuple[ModelEntry, ...]
    k: int | Mapping[str, int] | None = None
    options: Mapping[str, object] = field(default_factory=dict)
    base_model: str | None = None
    dtype: str | None = None
    max_rank: int | None = None
    allow_base_mismatch: bool = False

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.models]


def _check_keys(mapping: Mapping, valid: tuple[str, ...], where: str) -> None:
    unknown = [shown(key) if not isinstance(key, str) or len(key) > 60 else key for key in mapping if key not in valid][:5]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(valid)}.")


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {shown(value)} (per-layer lists or gradients are not supported).")
    return float(value)


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping of names to values, got {type(value).__name__}.")
    return value


def _model_entry(raw, i: int, label: str) -> tuple[ModelEntry, float | None]:
    where = f"{label}: models[{i}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw["model"].strip():
        raise ConfigError(f"{where} needs 'model: PATH_OR_HUB_ID' (a LoRA adapter), got {shown(raw)}.")
    _check_keys(raw, MODEL_KEYS, where)
    params = _mapping(raw.get("parameters"), f"{where}.parameters")
    _check_keys(params, MODEL_PARAMETERS, f"{where}.parameters")
    weight = _number(params.get("weight", 1.0), f"{where}.parameters.weight")
    density = _number(params["density"], f"{where}.parameters.density") if "density" in params else None
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.name must be a string, got {shown(name)}.")
    entry = ModelEntry(model=raw["model"], weight=weight, name=name, sha256=str(raw.get("sha256") or ""),
                       config_sha256=str(raw.get("config_sha256") or ""))
    return entry, density


def parse_config(data, label: str = "config") -> MergeConfig:
    """Validate a mergekit-style config (already read from YAML).

    Args:
        data: the parsed YAML.
        label: how messages name the config (its path).

    Returns:
        A :class:`MergeConfig`. Method options are checked by ``merge`` itself, which lists the valid ones.

    Raises:
        ConfigError: an unknown key (the message lists the valid ones), a missing or mistyped value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a YAML mapping with merge_method and models, got {type(data).__name__}.")
    _check_keys(data, TOP_LEVEL_KEYS, label)
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(f"{label} names no merge method: add e.g. 'merge_method: lego'.")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{label} needs 'models:', a non-empty list of {{model: PATH_OR_HUB_ID, parameters: {{weight: W}}}}.")
    entries, densities = zip(*(_model_entry(raw, i, label) for i, raw in enumerate(models)))
    params = dict(_mapping(data.get("parameters"), f"{label}: parameters"))
    k = params.pop("k", None)
    if not (k is None or (isinstance(k, int) and not isinstance(k, bool)) or isinstance(k, dict)):
        raise ConfigError(f"{label}: parameters.k must be a whole number or a mapping of module patterns to ranks, got {shown(k)}.")
    normalize = params.pop("normalize", False)
    if not isinstance(normalize, bool):
        raise ConfigError(f"{label}: parameters.normalize must be true or false, got {shown(normalize)}.")
    given = {d for d in densities if d is not None}
    if given:
        # mergekit sets density per model; the PEFT-style methods here apply one density to all factors.
        if len(given) > 1 or ("density" in params and params["density"] not in given):
            raise ConfigError(f"{label}: density differs between models ({sorted(given)}); lego-viz applies one "
                              "density to every adapter: give it once under the top-level parameters.")
        params["density"] = given.pop()
    if normalize:
        total = sum(e.weight for e in entries)
        if total == 0:
            raise ConfigError(f"{label}: normalize: true divides by the sum of the weights, which is 0.")
        entries = tuple(ModelEntry(e.model, e.weight / total, e.name, e.sha256, e.config_sha256) for e in entries)
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise ConfigError(f"{label}: dtype {shown(dtype)} is not one of {', '.join(DTYPES)}.")
    max_rank = data.get("max_rank")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ConfigError(f"{label}: max_rank must be a positive whole number, got {shown(max_rank)}.")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{label}: base_model must be a model name or path, got {shown(base)}.")
    allow = data.get("allow_base_mismatch", False)
    if not isinstance(allow, bool):
        raise ConfigError(f"{label}: allow_base_mismatch must be true or false, got {shown(allow)}.")
    method = METHOD_ALIASES.get(method, method)
    # Only the method's declared options: 'checks', 'errors', 'weights', ... are the program's own arguments.
    from lego_viz.merge.registry import user_options  # the methods' modules, only once a config names one

    params = user_options(method, params, f"{label}: parameters")
    return MergeConfig(method=method, models=tuple(entries), k=k, options=params,
                       base_model=base, dtype=None if dtype is None else str(dtype).lower(), max_rank=max_rank,
                       allow_base_mismatch=allow)


def _from_recipe_v1(recipe: dict) -> dict:
    """A recipe written before configs took mergekit's shape, in that shape."""
    weights = recipe["weights"] if recipe.get("weights") is not None else [1.0] * len(recipe["adapters"])
    models = [{"model": entry["path"], "name": entry["name"], "sha256": entry.get("sha256", ""),
               "config_sha256": entry.get("config_sha256", ""), "parameters": {"weight": w}}
              for entry, w in zip(recipe["adapters"], weights, strict=True)]  # load_recipe checked the count
    params = dict(recipe.get("options") or {})
    if recipe.get("k") is not None:
        params["k"] = recipe["k"]
    return {"merge_method": recipe["method"], "models": models, "parameters": params,
            "allow_base_mismatch": bool(recipe.get("allow_base_mismatch"))}


def load_recipe(path: str | os.PathLike) -> dict:
    """Read and validate a version-1 ``recipe.yaml`` (lego_viz_recipe: 1)."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    if not isinstance(data, dict) or data.get("lego_viz_recipe") != 1 or not isinstance(data.get("adapters"), list):
        raise ConfigError(f"{path} is not a lego-viz recipe (expected keys lego_viz_recipe: 1, adapters, method).")
    if not isinstance(data.get("method"), str):
        raise ConfigError(f"recipe {path} names no merge method: add e.g. 'method: lego' (as written by an export).")
    for i, entry in enumerate(data["adapters"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("path", "name")):
            raise ConfigError(f"recipe {path}: adapters[{i}] needs a 'path' and a 'name' (strings), got {shown(entry)}.")
    if not isinstance(data.get("options") or {}, dict):
        raise ConfigError(f"recipe {path}: 'options' must be a mapping of option names to values.")
    weights, count = data.get("weights"), len(data["adapters"])
    if weights is not None and (not isinstance(weights, list) or len(weights) != count):
        given = f"{len(weights)} weights" if isinstance(weights, list) else f"a {type(weights).__name__}"
        raise ConfigError(f"recipe {path}: 'weights' must list one number per adapter ({count} adapters), "
                          f"got {given}; fix the list or drop it (weight 1 each).")
    return data


def load_config(path: str | os.PathLike, what: str = "config") -> MergeConfig:
    """Read and validate a config file (mergekit shape, or a lego-viz recipe of any version)."""
    path = Path(path)
    data = read_yaml(path, what)
    if isinstance(data, dict) and data.get("lego_viz_recipe") == 1:
        data = _from_recipe_v1(load_recipe(path))
    return parse_config(data, f"{what} {path}")


def load_models(config: MergeConfig, lazy: bool = False) -> tuple[list[LoraAdapter], list[str]]:
    """Load a config's adapters and check them against what it records.

    Args:
        lazy: leave the weights in their files, read when a module is used (the merge command).

    Returns:
        (adapters, notes): notes say which adapter changed since a recipe hashed it.

    Raises:
        ConfigError: ``base_model`` disagrees with an adapter's base (unless allow_base_mismatch).
    """
    adapters = load_adapters([m.model for m in config.models], [m.name for m in config.models], lazy=lazy)
    notes = []
    for entry, adapter in zip(config.models, adapters):
        if config.base_model and not config.allow_base_mismatch and not same_base(config.base_model, adapter.base_model):
            raise ConfigError(f"base_model is {config.base_model!r} but adapter {adapter.name!r} was trained on "
                              f"{adapter.base_model!r}; fix base_model or set allow_base_mismatch: true.")
        if entry.sha256 and entry.sha256 != adapter.sha256:
            notes.append(f"{adapter.name} changed since the recipe was written (sha256 differs)")
        if entry.config_sha256 and entry.config_sha256 != adapter.config_sha256:
            notes.append(f"{adapter.name} changed since the recipe was written (its adapter_config.json differs)")
    return adapters, notes


def recipe_config(merged, sources: list[dict], dtype: str) -> dict:
    """The config that redoes ``merged`` (what an export writes as ``recipe.yaml``).

    Args:
        merged: the merge (a :class:`lego_viz.merge.MergedAdapter`).
        sources: per source adapter, ``path`` (portable), ``name``, ``sha256``, ``config_sha256``.
        dtype: the saved dtype's torch name.
    """
    return {
        "lego_viz_recipe": RECIPE_VERSION,
        "merge_method": merged.method,
        "base_model": merged.base_model,
        "models": [{"model": s["path"], "name": s["name"], "sha256": s["sha256"], "config_sha256": s["config_sha256"],
                    "parameters": {"weight": w}} for s, w in zip(sources, merged.weights)],
        "parameters": dict(merged.options),  # with k for lego/svd
        "dtype": dtype,
        "allow_base_mismatch": any("allowed by request" in w for w in merged.warnings),
    }
