"""One call for every merge method: ``merge(adapters, method="lego", k=8, weights=None, **options)``.

Each method lives in its own module beside its :class:`MergeMethod` (name, options, whether it takes k);
:mod:`lego_viz.merge.registry` lists them. Unknown methods or options are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

from lego_viz.adapters import LoraAdapter, adapter_weights, check_compatible, module_order
from lego_viz.adapters.patterns import PatternTable
from lego_viz.adapters.types import shown
from lego_viz.merge.base import MergedAdapter, MergeError, MergeMethod, MethodOutput, Option
from lego_viz.merge.lego import PRESETS
from lego_viz.merge.registry import MERGE_METHODS

__all__ = ["MERGE_METHODS", "PRESETS", "MergeError", "MergeMethod", "MergePlan", "MergedAdapter", "Option", "merge", "plan",
           "resolve_k", "wrap"]


def resolve_k(adapters: Sequence[LoraAdapter], k: int | Mapping[str, int] | None) -> dict[str, int]:
    """Per-module target rank, validated against the number of units ``n`` of each module.

    Args:
        k: one rank for every module; or a mapping from module names or name patterns (PEFT
            rank_pattern style, e.g. ``"q_proj"``) to ranks, with an optional ``"*"`` default;
            or None for the largest source rank.
    """
    default_rank = max(max(a.ranks) for a in adapters)
    names = module_order(adapters)
    if isinstance(k, Mapping):
        table = PatternTable({key: v for key, v in k.items() if key != "*"}, "k pattern")
        _check_k_patterns(table, names)
    result = {}
    for name in names:
        n = sum(a.modules[name].r for a in adapters if name in a.modules)
        if k is None:
            rank = min(default_rank, n)
        elif isinstance(k, Mapping):
            rank = table.value(name, k.get("*", min(default_rank, n)))
        else:
            rank = k
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise MergeError(f"k must be a whole number, got {rank!r} for module {name}.")
        if rank < 1 or rank > n:
            raise MergeError(
                f"k={rank} is out of range for module {name}: it has n={n} units (MSUs), so 1 ≤ k ≤ {n}. "
                "k larger than the number of units is an error, not a clamp: lower k."
            )
        result[name] = rank
    return result


def _check_k_patterns(table: PatternTable, names: Sequence[str]) -> None:
    """A per-module k pattern that matches no module is a typo: say so (one that is not a regex, or
    backtracks without end, the table refuses)."""
    for key in table.keys_matching_none(names)[:1]:
        examples = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
        raise MergeError(
            f"k pattern {shown(key)} matches no module; patterns match the end of a module name, "
            f"e.g. {examples} (full names like {names[0]} also work)."
        )


def _resolve_options(spec: MergeMethod, options: dict) -> dict:
    preset = options.pop("preset", None)
    if preset is not None:
        if spec.name != "lego" or preset not in PRESETS:
            valid = ", ".join(PRESETS) if spec.name == "lego" else "none"
            raise MergeError(f"unknown preset {preset!r} for method {spec.name!r}; valid presets: {valid}.")
        options = {**PRESETS[preset], **options}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise MergeError(f"unknown option(s) {', '.join(unknown)} for method {spec.name!r}; valid options: {valid}.")
    resolved = {name: opt.default for name, opt in spec.options.items()}
    for name, value in options.items():
        resolved[name] = spec.options[name].validate(name, spec.name, value)
    return resolved


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """A merge validated before any weights are read (:func:`plan`): what every step after it takes."""

    method: MergeMethod
    options: dict  # the method's options, validated, defaults filled in
    weights: list[float]  # one per adapter
    ranks: dict[str, int] | None  # k per module (methods that take k)
    k: int | Mapping[str, int] | None  # k as asked for, for the record
    warnings: list[str]


def plan(
    adapters: Sequence[LoraAdapter],
    method: str,
    k: int | Mapping[str, int] | None,
    weights: Sequence[float] | None,
    allow_base_mismatch: bool,
    options: dict,
) -> MergePlan:
    """Validate a merge before any weights are read: the method, its options, the adapters' compatibility,
    one weight per adapter and k per module."""
    spec = MERGE_METHODS.get(method)
    if spec is None:
        names = sorted(MERGE_METHODS, key=lambda m: m != "lego")  # the headline method first
        raise MergeError(f"unknown merge method {method!r}; valid methods: {', '.join(names)}.")
    resolved = _resolve_options(spec, dict(options))
    warnings = check_compatible(adapters, allow_base_mismatch=allow_base_mismatch)
    weights = adapter_weights(adapters, weights)
    if spec.takes_k:
        ranks = resolve_k(adapters, k)
    elif k is not None:
        raise MergeError(f"method {method!r} takes no k: its rank is fixed by the inputs. Drop k or choose lego/svd.")
    else:
        ranks = None
    return MergePlan(method=spec, options=resolved, weights=weights, ranks=ranks, k=k, warnings=warnings)


def wrap(plan: MergePlan, adapters: Sequence[LoraAdapter], output: MethodOutput, elapsed: float,
         name: str | None = None) -> MergedAdapter:
    """Turn a method's output into the :class:`MergedAdapter` every caller gets."""
    spec, k = plan.method, plan.k
    first = adapters[0]
    template = {key: first.config.get(key) for key in ("task_type", "fan_in_fan_out", "bias") if key in first.config}
    modules = output.modules
    if len({a.fan_in_fan_out for a in adapters}) > 1:
        # Flags that disagree (check_compatible warns): True is the likely truth, as configs of old
        # PEFT versions left it out for GPT-2 Conv1D; PEFT resets it from the layer type on load anyway.
        template["fan_in_fan_out"] = True
        modules = {n: dataclasses.replace(m, fan_in_fan_out=True) for n, m in modules.items()}
    record = dict(plan.options)
    if spec.takes_k:
        record["k"] = k if isinstance(k, int) or k is None else dict(k)
    return MergedAdapter(
        name=name or f"{spec.name}_merge",
        method=spec.name,
        options=record,
        modules=modules,
        sources=[
            {"name": a.name, "source": a.source, "sha256": a.sha256, "base_model": a.base_model,
             "r": a.config.get("r"), "lora_alpha": a.config.get("lora_alpha"), "weights_file": a.weights_file,
             "config_sha256": a.config_sha256, "dtype": a.dtype}
            for a in adapters
        ],
        base_model=first.base_model,
        template_config=template,
        weights=[w if math.isfinite(w) else 0.0 for w in plan.weights],
        labels=output.labels,
        unit_owner=output.unit_owner,
        timings={**output.timings, "total": elapsed},
        warnings=plan.warnings + output.warnings + [w for a in adapters for w in a.warnings],
        reference_sq_norms=output.reference_sq_norms,
        report_products=output.report_products,
        details=output.details,
    )


def merge(
    adapters: Sequence[LoraAdapter],
    method: str = "lego",
    k: int | Mapping[str, int] | None = None,
    weights: Sequence[float] | None = None,
    allow_base_mismatch: bool = False,
    name: str | None = None,
    **options,
) -> MergedAdapter:
    """Merge LoRA adapters into one.

    Args:
        adapters: adapters for the same base model (checked).
        method: one of :data:`MERGE_METHODS` (``lego``, ``linear``, ``svd``, ``core_space``, ``knots``, ``peft_linear``,
            ``ties``, ``dare_linear``).
        k: target rank (``lego``, ``svd``, ``core_space``, ``knots``): an int, a per-module mapping, or None (largest source rank).
        weights: one per adapter, default 1.
        allow_base_mismatch: accept different base-model names when shapes agree.
        name: name of the merged adapter.
        **options: method options (see ``MERGE_METHODS[method].options``); ``preset="paper"`` for lego.

    Returns:
        A :class:`MergedAdapter` with scale-1 modules, settings, timings and (lego) cluster labels.
    """
    adapters = list(adapters)
    steps = plan(adapters, method, k, weights, allow_base_mismatch, options)
    start = time.perf_counter()
    output = steps.method.fn(adapters, steps.weights, steps.ranks, steps.options)
    elapsed = time.perf_counter() - start
    return wrap(steps, adapters, output, elapsed, name)
