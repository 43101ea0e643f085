"""A merge that reads its inputs one group of modules at a time: bounded memory, one read per module.

The methods work module by module already, so a merge of adapters kept on disk
(``load_adapters(..., lazy=True)``) can run on consecutive groups of modules: read the group's
factors of every adapter (float32 from whatever was stored, side by side in reused buffers),
merge them, run the invariance checks and the report's reconstruction errors on the same tensors
while they are in memory, then drop them. The next group is read on another thread meanwhile.
Peak memory is about two groups, not the input; each tensor is read once.

Given lego's first pass (:mod:`lego_viz.merge.first_pass`, which the ``merge`` command makes in two
processes at once), the clusters and the probe checks come from it without reading a weight, and
the weights are read once more, in small groups, only for the centroids. Asked for arrays, that
route runs on numpy alone: the command never imports torch (2 s of CPU, more than the merge).

The result is the one :func:`lego_viz.merge.merge` gives on the same adapters in memory, bit for
bit: methods treat modules independently, and lego's batched k-means does not depend on which
modules share a batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraAdapter, LoraModule, hash_in_background, module_order
from lego_viz.adapters.stored import StoredLoraModule
from lego_viz.checks.invariance import (
    EXACT_BUDGET,
    CheckResult,
    check_concat_sum,
    check_concat_sum_arrays,
    check_permutation,
    check_permutation_arrays,
    exact_cost,
    probe_checks,
)
from lego_viz.merge import MergedAdapter, MergePlan, plan, wrap
from lego_viz.merge.base import MethodOutput
from lego_viz.merge.first_pass import (
    CACHED_GROUP_BYTES,
    GRAM_UNITS,
    GROUP_BYTES,
    Arena,
    UnitSummary,
    module_groups,
    one_blas_thread,
    read_stacked,
    stacked_floats,
    summarize_module,
)
from lego_viz.merge.lego import LegoClusters

if TYPE_CHECKING:
    import torch
else:
    from lego_viz.lazy import torch

# Methods whose result depends on which modules run together: dare_linear draws every module's drop
# mask from one random stream, so it runs as one group.
_WHOLE_ONLY = {"dare_linear"}

Progress = Callable[[int, int], None]  # (modules done, modules in all)


@dataclass
class StreamedMerge:
    """What :func:`merge_streaming` returns."""

    merged: MergedAdapter
    checks: dict[str, CheckResult] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # per module, vs the weighted sum
    retained: dict[str, dict] = field(default_factory=dict)  # per adapter, as lego_viz.checks.retention.retention


Group = dict[str, tuple[np.ndarray, np.ndarray, list] | None]  # per module: read_stacked's (A, B, blocks), or None


def _read(adapters: Sequence[LoraAdapter], names: Sequence[str], arena: Arena | None = None, checked: Container[str] = ()) -> Group:
    """The stored factors of ``names``, each module's of all adapters read side by side into one ``A``
    (n, d_in) and one ``B`` (d_out, n) float32 buffer from ``arena`` (emptied first;
    :func:`lego_viz.merge.first_pass.read_stacked`); None for a module that is not stored that way (in
    memory, ``.bin``). Modules in ``checked`` skip the NaN/inf scan (the first pass made it on the same files).
    """
    if arena is not None:
        arena.used = 0
    return {name: read_stacked(adapters, name, arena, check=name not in checked) for name in names}


def _as_adapters(adapters: Sequence[LoraAdapter], group: Group, arrays: bool = False) -> list[LoraAdapter]:
    """The adapters restricted to a group's modules, factors in memory: tensors, or (``arrays``, the
    merge command's torch-free route) numpy arrays.

    Every adapter's module is a view of its block of the stacked buffers, so the merge and the
    checks take the concatenation without copying it (:func:`lego_viz.units.msu.stacked`); modules that
    were not read stacked are loaded here.
    """
    modules: list[dict[str, LoraModule]] = [{} for _ in adapters]
    for name, found in group.items():
        if found is None:
            for t, adapter in enumerate(adapters):
                if (module := adapter.modules.get(name)) is not None:
                    modules[t][name] = module.load() if isinstance(module, StoredLoraModule) else module
            continue
        A, B, blocks = found
        if not arrays:
            A, B = torch.from_numpy(A), torch.from_numpy(B)
        for t, module, units in blocks:
            modules[t][name] = LoraModule(A=A[units], B=B[:, units], scale=module.scale, fan_in_fan_out=module.fan_in_fan_out)
    return [LoraAdapter(name=a.name, source=a.source, config=a.config, modules=found, sha256=a.sha256,
                        weights_file=a.weights_file, config_sha256=a.config_sha256)
            for a, found in zip(adapters, modules)]


def _centroids_of(clusters: LegoClusters, group: Group, steps: MergePlan) -> MethodOutput:
    """lego's centroids of a group read stacked, as numpy arrays (no torch): what :func:`lego_viz.merge.lego.lego`
    makes of the same factors, bit for bit."""
    out = MethodOutput(modules={})
    for name, (A, B, blocks) in group.items():
        fan_in_fan_out = blocks[0][1].fan_in_fan_out
        clusters.record(out, name, *clusters.centroids(name, A, B, fan_in_fan_out, steps.ranks[name], steps.options))
        out.labels[name], out.unit_owner[name] = clusters.labels[name], clusters.units[name].adapter_index
    return out


_malloc_trim = None  # glibc's malloc_trim, looked up on first use (False where there is none)


def _release_freed_memory() -> None:
    """Give memory freed by the last group back to the OS (glibc; elsewhere a no-op).

    glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a long run of
    groups whose tensors differ in size fragments it and the resident size creeps up group by group
    (2.1 GiB after 32 layers of 64 adapters where one group needs ~0.6 GiB). ``malloc_trim`` hands the
    free pages back.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def _add_counts(total: dict, part: dict) -> None:
    """Add a group's details into the total: numbers add up, nested dicts recurse, the rest is kept."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total[key] = value


def _combine_checks(parts: list[CheckResult]) -> CheckResult:
    first = parts[0]
    combined = CheckResult(name=first.name, tolerance=first.tolerance, expect_pass=first.expect_pass, method=first.method)
    for part in parts:
        combined.per_module.update(part.per_module)
        combined.probe_max_rel_error = max(combined.probe_max_rel_error, part.probe_max_rel_error)
        combined.seconds += part.seconds
    return combined


CHECKS = ("permutation", "concat_sum")


@dataclass(frozen=True)
class _Route:
    """How every group is merged and checked, decided once for the whole input before the first group."""

    plan: MergePlan
    clusters: LegoClusters | None  # lego's clusters, made from the first pass without reading a weight
    on_arrays: bool  # centroids, checks and report from the stacked numpy arrays: no torch
    arrays: bool  # asked for numpy: groups that qualify run on it even without a first pass (_numpy_route)
    exact: dict[str, bool]  # per check: exact (small inputs) or by probes, decided as the in-memory checks decide it
    probes: tuple[CheckResult, CheckResult] | None  # both checks from the clusters' probes of every unit, made up front


@dataclass
class _Totals:
    """What the groups add up to: the method's output, the checks' parts, the report's errors and retention."""

    output: MethodOutput = field(default_factory=lambda: MethodOutput(modules={}))
    checks: dict[str, list[CheckResult]] = field(default_factory=lambda: {key: [] for key in CHECKS})
    errors: dict[str, float] = field(default_factory=dict)
    retained: dict[str, dict] = field(default_factory=dict)  # per adapter name: {"per_module": {...}}
    elapsed: float = 0.0  # seconds of merging (not of reading, checking or scoring)

    def add(self, part: MethodOutput, seconds: float) -> None:
        output = self.output
        output.modules.update(part.modules)
        output.labels.update(part.labels)
        output.unit_owner.update(part.unit_owner)
        output.reference_sq_norms.update(part.reference_sq_norms)
        output.report_products.update(part.report_products)
        output.warnings += [w for w in part.warnings if w not in output.warnings]
        for key, value in part.timings.items():
            output.timings[key] = output.timings.get(key, 0.0) + value
        _add_counts(output.details, part.details)
        self.elapsed += seconds

    def result(self, merged: MergedAdapter, errors: bool) -> StreamedMerge:
        checks = {key: _combine_checks(parts) for key, parts in self.checks.items() if parts}
        retained = {}
        for name, entry in self.retained.items():
            values = entry["per_module"].values()
            retained[name] = {"mean": sum(values) / len(values) if values else 0.0, "per_module": entry["per_module"]}
        return StreamedMerge(merged=merged, checks=checks, errors=self.errors, retained=retained if errors else {})


def _route(
    adapters: Sequence[LoraAdapter], steps: MergePlan, summaries: Mapping[str, UnitSummary] | None, arrays: bool,
    checks: bool, totals: _Totals,
) -> _Route:
    """Step 1, before the first group: lego's clusters from the first pass (no weight read), and which
    route the groups take. Where every module has its probe products from the clusters, both checks run
    here, for all modules at once."""
    names = set(module_order(adapters))
    exact = {key: exact_cost(adapters, concatenated=key == "concat_sum") <= EXACT_BUDGET for key in CHECKS}
    clusters = None
    if summaries and steps.method.prepare is not None:
        start = time.perf_counter()
        clusters = steps.method.prepare(adapters, steps.weights, steps.ranks, steps.options, summaries)
        totals.add(MethodOutput(modules={}, timings=clusters.timings, details=clusters.details), time.perf_counter() - start)
    # lego's centroids made straight from the stacked arrays: every module read stacked and clustered from
    # its Gram matrices, so neither the merge nor its checks and report need torch.
    # Modules past GRAM_UNITS (sketch k-means) have neither a first pass nor probes: their centroids come from
    # the factors, and their checks and report too.
    sketched = {name for name, units in clusters.units.items() if units.gram_a is None} if clusters is not None else set()
    on_arrays = (arrays and clusters is not None
                 and set(summaries) | sketched == set(clusters.unit_probes) | sketched == names)
    probes = None
    if checks and clusters is not None and set(clusters.unit_probes) == names and (on_arrays or not any(exact.values())):
        probes = probe_checks(adapters, steps.weights, unit_probes=clusters.unit_probes)
        for key, result in zip(CHECKS, probes):
            if not exact[key]:
                totals.checks[key].append(result)
    return _Route(plan=steps, clusters=clusters, on_arrays=on_arrays, arrays=arrays, exact=exact, probes=probes)


def _numpy_route(route: _Route, group: Group) -> bool:
    """Whether a group runs on numpy alone: every module of it was read stacked (safetensors), and the whole
    input does (its first pass given, or sketched past :data:`~lego_viz.merge.first_pass.GRAM_UNITS` units),
    or lego was asked for arrays without one (the group then makes its own first pass)."""
    stacked = all(found is not None for found in group.values())  # a module past GRAM_UNITS may be a .bin
    if route.on_arrays:
        return stacked
    return route.arrays and route.clusters is None and route.plan.method.prepare is not None and stacked


def _merge_group(
    route: _Route, adapters: Sequence[LoraAdapter], group: Group, arena: Arena, totals: _Totals, numpy_route: bool
) -> tuple[list[LoraAdapter], MethodOutput]:
    """Step 2, per group: the merge of its modules. Returns the group's adapters (views of the stacked
    buffers, for the checks and the report) and the method's output for them."""
    steps, start = route.plan, time.perf_counter()
    block = _as_adapters(adapters, group, arrays=numpy_route)
    if numpy_route:
        part = _numpy_merge(route, block, group)
    else:
        extra = {} if route.clusters is None else {"clusters": route.clusters}
        part = steps.method.fn(block, steps.weights, steps.ranks, steps.options, **extra)
        for name, module in part.modules.items():  # the arena is refilled two groups on
            if arena.owns(module.A.data_ptr()) or arena.owns(module.B.data_ptr()):
                part.modules[name] = LoraModule(A=module.A.clone(), B=module.B.clone(), scale=module.scale,
                                                fan_in_fan_out=module.fan_in_fan_out)
    totals.add(part, time.perf_counter() - start)
    return block, part


def _numpy_merge(route: _Route, block: list[LoraAdapter], group: Group) -> MethodOutput:
    """lego's centroids from a group's stacked arrays, with the clusters made up front, or else the group's
    own: its first pass from the factors just read, then the clusters (what lego makes of the group in
    memory, bit for bit: k-means does not depend on which modules share a batch)."""
    steps, clusters = route.plan, route.clusters
    if clusters is None:
        summaries = {name: summarize_module(A, B) for name, (A, B, _) in group.items() if A.shape[0] <= GRAM_UNITS}
        clusters = steps.method.prepare(block, steps.weights, steps.ranks, steps.options, summaries)
    start = time.perf_counter()
    part = _centroids_of(clusters, group, steps)
    part.timings["centroids"] = time.perf_counter() - start
    if route.clusters is None:  # the group's own clusters: their cost and details count with it
        part.timings.update(clusters.timings)
        _add_counts(part.details, clusters.details)
    return part


def _check_group(route: _Route, block: list[LoraAdapter], part: MethodOutput, totals: _Totals, numpy_route: bool) -> None:
    """Step 3, per group: the invariance checks of its modules, those not made up front from the units' probes."""
    exact, weights = route.exact, route.plan.weights
    if route.probes is not None and not any(exact.values()):
        return
    if numpy_route:  # exact on the stacked arrays, or from the units' probes (which give the probe column too)
        probes = route.probes or probe_checks(block, weights, unit_probes=part.unit_probes)
        found = {"permutation": lambda: check_permutation_arrays(block),
                 "concat_sum": lambda: check_concat_sum_arrays(block, weights)}
        for key, probed in zip(CHECKS, probes):
            if exact[key]:
                result = found[key]()
                result.probe_max_rel_error = max((probed.per_module[m] for m in result.per_module), default=0.0)
                totals.checks[key].append(result)
            elif route.probes is None:
                totals.checks[key].append(probed)
    elif exact["permutation"] or exact["concat_sum"]:
        totals.checks["permutation"].append(check_permutation(block, exact=exact["permutation"]))
        totals.checks["concat_sum"].append(check_concat_sum(block, weights, exact=exact["concat_sum"]))
    else:  # large inputs: both checks from one probe of every unit
        for key, result in zip(CHECKS, probe_checks(block, weights, unit_probes=part.unit_probes)):
            totals.checks[key].append(result)


def _score_group(route: _Route, block: list[LoraAdapter], part: MethodOutput, totals: _Totals) -> None:
    """Step 4, per group: the report's error of each module against the weighted sum, and each adapter's retention."""
    from lego_viz.checks.retention import report_scores

    errors, retained = report_scores(part.modules, block, route.plan.weights, part.reference_sq_norms, part.report_products)
    totals.errors.update(errors)
    for adapter_name, entry in retained.items():
        totals.retained.setdefault(adapter_name, {"per_module": {}})["per_module"].update(entry["per_module"])


def merge_streaming(
    adapters: Sequence[LoraAdapter],
    method: str = "lego",
    k: int | Mapping[str, int] | None = None,
    weights: Sequence[float] | None = None,
    allow_base_mismatch: bool = False,
    checks: bool = True,
    errors: bool = True,
    progress: Progress | None = None,
    group_bytes: int = GROUP_BYTES,
    summaries: Mapping[str, UnitSummary] | None = None,
    arrays: bool = False,
    **options,
) -> StreamedMerge:
    """:func:`lego_viz.merge.merge` plus the checks and report errors, one group of modules at a time.

    Args:
        adapters: adapters, typically loaded with ``lazy=True`` (in-memory ones work the same).
        method, k, weights, allow_base_mismatch, **options: as in :func:`lego_viz.merge.merge`.
        checks: run the permutation and concatenation–summation checks on every group.
        errors: compute each module's ‖ΔW_merged − Σ w_t ΔW_t‖ / ‖Σ w_t ΔW_t‖ and each adapter's
            retention (:mod:`lego_viz.checks.retention`) for the report.
        progress: called with (modules done, modules in all) after each group.
        group_bytes: float32 bytes of input factors held at once.
        summaries: the first pass over the weights, made beforehand (:func:`lego_viz.merge.first_pass.summarize`;
            the ``merge`` command makes it beside its own start-up), for methods that take it (lego).
        arrays: for lego, keep the merged factors and labels as numpy arrays and run the merge (any
            reweighting, ``lsq``), the checks (exact or by probes) and the report without torch, for
            every module stored as safetensors (past :data:`~lego_viz.merge.first_pass.GRAM_UNITS` units,
            lego's sketch k-means on the CPU): what the ``merge`` command exports. Without ``summaries``,
            each group makes its own first pass from the factors it reads.

    Returns:
        A :class:`StreamedMerge`: the merged adapter, the check results and the errors.
    """
    adapters = list(adapters)
    steps = plan(adapters, method, k, weights, allow_base_mismatch, options)
    hashed = hash_in_background(adapters)  # the report's input hashes, on another core while the merge runs
    groups = _groups(adapters, method, group_bytes, prepared=bool(summaries) and steps.method.prepare is not None)
    size = max(stacked_floats(adapters, names) for names in groups)
    arenas = [Arena(size), Arena(size if len(groups) > 1 else 0)]
    totals = _Totals(retained={a.name: {"per_module": {}} for a in adapters})
    done, total, trimmed = 0, sum(len(g) for g in groups), 0
    # The next group is read on another thread while this one is merged (file reads, dtype conversion
    # and the NaN/inf scan; all the arithmetic stays on this one), so reading costs the merge no time.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as reader:
        pending = reader.submit(_read, adapters, groups[0], arenas[0], summaries or ())
        route = _route(adapters, steps, summaries, arrays, checks, totals)
        for index, names in enumerate(groups):
            group = pending.result()
            if index + 1 < len(groups):
                pending = reader.submit(_read, adapters, groups[index + 1], arenas[(index + 1) % 2], summaries or ())
            numpy_route = _numpy_route(route, group)
            block, part = _merge_group(route, adapters, group, arenas[index % 2], totals, numpy_route)
            with one_blas_thread():  # the reader and the hashes have the other cores; threaded BLAS would spin against them
                if checks:
                    _check_group(route, block, part, totals, numpy_route)
                if errors:
                    _score_group(route, block, part, totals)
            del group, block, part
            trimmed += stacked_floats(adapters, names)
            if 4 * trimmed >= GROUP_BYTES or index + 1 == len(groups):
                _release_freed_memory()
                trimmed = 0
            done += len(names)
            if progress is not None:
                progress(done, total)
    hashed()
    return totals.result(wrap(steps, adapters, totals.output, totals.elapsed), errors)


def _groups(adapters: Sequence[LoraAdapter], method: str, group_bytes: int, prepared: bool) -> list[list[str]]:
    """The groups of modules the merge reads at a time. With lego's first pass known, the groups need only
    feed the centroids, so they are made small enough to stay in the CPU cache from their read to their use."""
    if method in _WHOLE_ONLY:
        return [module_order(adapters)]
    return module_groups(adapters, min(group_bytes, CACHED_GROUP_BYTES) if prepared else group_bytes)
