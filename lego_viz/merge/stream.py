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
    check_permutation,
    exact_cost,
    probe_checks,
)
from lego_viz.merge import MergedAdapter, plan, wrap
from lego_viz.merge.base import MethodOutput
from lego_viz.merge.first_pass import (
    CACHED_GROUP_BYTES,
    GROUP_BYTES,
    Arena,
    UnitSummary,
    module_groups,
    read_stacked,
    stacked_floats,
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


def _as_adapters(adapters: Sequence[LoraAdapter], group: Group) -> list[LoraAdapter]:
    """The adapters restricted to a group's modules, factors in memory as tensors.

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
        A, B = torch.from_numpy(A), torch.from_numpy(B)
        for t, module, units in blocks:
            modules[t][name] = LoraModule(A=A[units], B=B[:, units], scale=module.scale, fan_in_fan_out=module.fan_in_fan_out)
    return [LoraAdapter(name=a.name, source=a.source, config=a.config, modules=found, sha256=a.sha256,
                        weights_file=a.weights_file, config_sha256=a.config_sha256)
            for a, found in zip(adapters, modules)]


def _centroids_of(clusters: LegoClusters, group: Group) -> MethodOutput:
    """lego's centroids of a group read stacked, as numpy arrays (no torch): what :func:`lego_viz.merge.lego.lego`
    makes of the same factors, bit for bit."""
    out = MethodOutput(modules={})
    for name, (A, B, blocks) in group.items():
        clusters.record(out, name, *clusters.centroids(name, A, B, blocks[0][1].fan_in_fan_out))
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
        arrays: where lego's centroids come from the first pass's coefficients (reweighting none /
            l2, every module summarized), keep the merged factors and labels as numpy arrays and
            run without torch: what the ``merge`` command exports. Checks that need the exact route
            (small inputs) still import it.

    Returns:
        A :class:`StreamedMerge`: the merged adapter, the check results and the errors.
    """
    from lego_viz.checks.retention import report_scores

    adapters = list(adapters)
    spec, resolved, warnings, weights, ranks = plan(adapters, method, k, weights, allow_base_mismatch, options)
    hashed = hash_in_background(adapters)  # the report's input hashes, on another core while the merge runs
    groups = [module_order(adapters)] if method in _WHOLE_ONLY else module_groups(adapters, group_bytes)
    # Exact or probe is decided once, for the whole input, as the in-memory checks decide it.
    exact = {key: exact_cost(adapters, concatenated=key == "concat_sum") <= EXACT_BUDGET for key in ("permutation", "concat_sum")}

    output = MethodOutput(modules={})
    found: dict[str, list[CheckResult]] = {"permutation": [], "concat_sum": []}
    result_errors: dict[str, float] = {}
    retained: dict[str, dict] = {a.name: {"per_module": {}} for a in adapters}
    elapsed, done, trimmed = 0.0, 0, 0
    # The first pass is known (the merge command makes it first, in two processes): the clusters come from it
    # without reading a weight, and the groups need only feed the centroids, so they are made small
    # enough to stay in the CPU cache from their read to their use.
    prepared = bool(summaries) and spec.prepare is not None
    if prepared and method not in _WHOLE_ONLY:
        groups = module_groups(adapters, min(group_bytes, CACHED_GROUP_BYTES))
    size = max(stacked_floats(adapters, names) for names in groups)
    arenas = [Arena(size), Arena(size if len(groups) > 1 else 0)]
    total, clusters = sum(len(g) for g in groups), None
    # The next group is read on another thread while this one is merged (file reads, dtype conversion
    # and the NaN/inf scan; all the arithmetic stays on this one), so reading costs the merge no time.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as reader:
        pending = reader.submit(_read, adapters, groups[0], arenas[0], summaries or ())
        if prepared:
            start = time.perf_counter()
            clusters = spec.prepare(adapters, weights, ranks, resolved, summaries)
            elapsed += time.perf_counter() - start
            output.timings.update(clusters.timings)
            _add_counts(output.details, clusters.details)
        # lego's centroids made straight from the stacked arrays: every module read stacked and its
        # coefficients known (reweighting none / l2), so the merge itself needs no torch.
        on_arrays = (arrays and clusters is not None and summaries is not None
                     and set(clusters.coefficients) == set(summaries) == set(module_order(adapters)))
        # Large inputs whose every module has its probe products from the clusters: both checks at once,
        # for all modules, with no weight read.
        probed = (checks and clusters is not None and not any(exact.values())
                  and set(clusters.unit_probes) == set(module_order(adapters)))
        if probed:
            for key, result in zip(("permutation", "concat_sum"), probe_checks(adapters, weights, unit_probes=clusters.unit_probes)):
                found[key].append(result)
        for index, names in enumerate(groups):
            group = pending.result()
            if index + 1 < len(groups):
                pending = reader.submit(_read, adapters, groups[index + 1], arenas[(index + 1) % 2], summaries or ())
            start = time.perf_counter()
            if on_arrays:
                block, part = None, _centroids_of(clusters, group)
            else:
                block = _as_adapters(adapters, group)
                part = (spec.fn(block, weights, ranks, resolved) if clusters is None
                        else spec.fn(block, weights, ranks, resolved, clusters=clusters))
                for name, module in part.modules.items():  # the arena is refilled two groups on
                    if arenas[index % 2].owns(module.A.data_ptr()) or arenas[index % 2].owns(module.B.data_ptr()):
                        part.modules[name] = LoraModule(A=module.A.clone(), B=module.B.clone(), scale=module.scale,
                                                        fan_in_fan_out=module.fan_in_fan_out)
            seconds = time.perf_counter() - start
            elapsed += seconds
            if on_arrays:
                part.timings["centroids"] = seconds
            output.modules.update(part.modules)
            output.labels.update(part.labels)
            output.unit_owner.update(part.unit_owner)
            output.reference_sq_norms.update(part.reference_sq_norms)
            output.report_products.update(part.report_products)
            output.warnings += [w for w in part.warnings if w not in output.warnings]
            for key, value in part.timings.items():
                output.timings[key] = output.timings.get(key, 0.0) + value
            _add_counts(output.details, part.details)
            if checks and not probed:
                block = block or _as_adapters(adapters, group)  # the exact checks work on tensors
                if exact["permutation"] or exact["concat_sum"]:
                    found["permutation"].append(check_permutation(block, exact=exact["permutation"]))
                    found["concat_sum"].append(check_concat_sum(block, weights, exact=exact["concat_sum"]))
                else:  # large inputs: both checks from one probe of every unit
                    for key, result in zip(("permutation", "concat_sum"), probe_checks(block, weights, unit_probes=part.unit_probes)):
                        found[key].append(result)
            if errors:
                part_errors, part_retained = report_scores(part.modules, block or adapters, weights, part.reference_sq_norms,
                                                           part.report_products)
                result_errors.update(part_errors)
                for adapter_name, entry in part_retained.items():
                    retained[adapter_name]["per_module"].update(entry["per_module"])
            del group, block, part
            trimmed += stacked_floats(adapters, names)
            if 4 * trimmed >= GROUP_BYTES or index + 1 == len(groups):
                _release_freed_memory()
                trimmed = 0
            done += len(names)
            if progress is not None:
                progress(done, total)
    hashed()
    merged = wrap(spec, adapters, output, resolved, k, weights, warnings, elapsed)
    results = {key: _combine_checks(parts) for key, parts in found.items() if parts}
    for entry in retained.values():
        values = entry["per_module"].values()
        entry["mean"] = sum(values) / len(values) if values else 0.0
    return StreamedMerge(merged=merged, checks=results, errors=result_errors,
                         retained={name: {"mean": e["mean"], "per_module": e["per_module"]} for name, e in retained.items()} if errors else {})
