"""The merged-adapter object and the method registry every merge method plugs into."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lego_viz.adapters import AdapterError, LoraAdapter, LoraModule
from lego_viz.checks.retention import ReportProducts

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch


class MergeError(AdapterError):
    """A merge cannot run with these inputs or options; the message says what to change."""


@dataclass(frozen=True)
class Option:
    """One option a merge method accepts: default, accepted values and a one-line help."""

    default: Any
    help: str
    choices: tuple | None = None
    kind: type | None = None  # int, float, bool, str; None: anything
    minimum: float | None = None
    maximum: float | None = None

    def validate(self, name: str, method: str, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"option {name!r} of {method!r} must be true or false, got {value!r}.")
        elif self.kind in (int, float):
            ok_type = (int,) if self.kind is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_type) or value != value:
                raise MergeError(f"option {name!r} of {method!r} must be a{'n integer' if self.kind is int else ' number'}, got {value!r}.")
            if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
                raise MergeError(f"option {name!r} of {method!r} must be in [{self.minimum}, {self.maximum}], got {value!r}.")
            value = self.kind(value)
        if self.choices is not None and value not in self.choices:
            raise MergeError(f"option {name!r} of {method!r} must be one of {', '.join(map(str, self.choices))}; got {value!r}.")
        return value


@dataclass
class MethodOutput:
    """What a method function returns; :func:`lego_viz.merge.merge` wraps it into a MergedAdapter."""

    modules: dict[str, LoraModule]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # per module, cluster of each unit (lego)
    unit_owner: dict[str, torch.Tensor] = field(default_factory=dict)  # per module, adapter index of each unit
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # per module ‖Σ_t w_t ΔW_t‖_F², where the method got it for free (lego: its Gram matrices; svd: the
    # singular values), so the report's errors need no second pass over the inputs
    reference_sq_norms: dict[str, float] = field(default_factory=dict)
    # per module the report's inner products, where the method got them for free (lego: from its Gram
    # matrices), so the report reads no weights at all
    report_products: dict[str, ReportProducts] = field(default_factory=dict)
    # per module the units' products with the invariance checks' probes, where the method got them for
    # free (lego: from its Gram matrices; lego_viz.checks.invariance.span_probes), so the checks read no weights
    unit_probes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # how the method ran, for the report (lego: which k-means)


MethodFn = Callable[[Sequence[LoraAdapter], list[float], Mapping[str, int] | None, dict], MethodOutput]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    fn: MethodFn
    description: str
    options: Mapping[str, Option]
    takes_k: bool
    equal_ranks: bool = False  # PEFT's linear/ties/dare need the same r in every adapter
    # A first step over all modules that needs no weights when their first pass is known:
    # ``prepare(adapters, weights, k, options, summaries)`` returns what ``fn(..., clusters=...)`` then
    # takes for any subset of the modules (lego: the clusters; a streamed merge reads weights only for
    # the centroids). None: the method reads the weights of each module once, in ``fn``.
    prepare: Callable | None = None


@dataclass
class MergedAdapter:
    """The result of any merge method: LoRA modules with scale 1 (folded), plus what made them.

    Factors and labels are torch tensors, except from the torch-free lego route of a streamed merge
    (:func:`lego_viz.merge.stream.merge_streaming` with ``arrays=True``, the ``merge`` command), where they
    are numpy arrays; :func:`lego_viz.export.folder.export_adapter` writes either.
    """

    name: str
    method: str
    options: dict
    modules: dict[str, LoraModule]
    sources: list[dict]
    base_model: str | None
    template_config: dict
    weights: list[float]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_owner: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reference_sq_norms: dict[str, float] = field(default_factory=dict)  # see MethodOutput
    report_products: dict[str, ReportProducts] = field(default_factory=dict)  # see MethodOutput
    details: dict = field(default_factory=dict)  # see MethodOutput

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.r for name, m in self.modules.items()}

    def cluster_sizes(self) -> dict[str, list[int]]:
        """Units per cluster, per module (lego only)."""
        return {m: np.bincount(np.asarray(lab), minlength=self.modules[m].r).tolist() for m, lab in self.labels.items()}

    def cluster_composition(self, module: str) -> torch.Tensor:
        """(k, T) counts: how many units of each source adapter went into each cluster of ``module``."""
        labels, owner = self.labels[module], self.unit_owner[module]
        counts = torch.zeros(self.modules[module].r, len(self.sources), dtype=torch.long)
        counts.index_put_((labels, owner), torch.ones_like(labels), accumulate=True)
        return counts

    def to_adapter(self) -> LoraAdapter:
        """View the merge as a plain adapter (for checks, hooks and the app's tables)."""
        config = dict(self.template_config)
        config.update(r=max(self.ranks.values()), lora_alpha=max(self.ranks.values()), base_model_name_or_path=self.base_model)
        return LoraAdapter(name=self.name, source=f"merge:{self.method}", config=config, modules=self.modules)
