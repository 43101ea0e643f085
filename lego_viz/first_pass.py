"""The one pass over the weights a LoRA-LEGO merge makes, without torch: stacked reads and Gram summaries.

A lego merge needs of each module's weights only its units' Gram matrices ``A Aᵀ`` and ``Bᵀ B``
and each unit's largest and smallest ``A`` entry (for the canonical sign) until the clusters are
known; the centroids read the weights a second time. That first pass is most of the arithmetic
and needs only numpy, so the ``merge`` command runs it while torch is still being imported
(:func:`summarize`), and the merge then starts from the summaries
(:func:`lego_viz.merge.lego.lego`). A merge without them computes the same summaries the same
way, module by module, so the result is identical either way.

The stacked read (:func:`read_stacked`) is shared with the streamed merge (:mod:`lego_viz.stream`):
all adapters' factors of a module go side by side into one ``A`` (n, d_in) and one ``B`` (d_out, n)
buffer, carved out of a reused :class:`Arena`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import LoraAdapter, module_order
from lego_viz.stored import StoredLoraModule

if TYPE_CHECKING:
    from lego_viz.adapters import LoraModule

# float32 bytes of the factors read per group (all adapters' copies of the group's modules). The group
# being merged and the next one, being read, are in memory at once; 128 MiB keeps a 64-adapter merge of
# the reference shape under 1 GiB and still batches ~3 layers of k-means at 8 adapters.
GROUP_BYTES = 128 * 2**20
# Once the clusters are known (from the first pass), groups only feed the centroids: this size keeps a
# group in the CPU's last-level cache from its read (on the reading thread) to its use.
CACHED_GROUP_BYTES = 12 * 2**20
# Above this many units in a module, k-means leaves the n×n Gram matrix (n² memory, O(n²) per step)
# for a sketch of the points (kmeans.sketch_kmeans); below it the Gram route is faster.
GRAM_UNITS = 2048
# The summaries of a whole merge are kept only up to this size (8 adapters of the reference shape take
# 29 MB; 64 take 1.9 GB, and are summarized group by group by the merge itself instead).
SUMMARY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class UnitSummary:
    """What a lego merge needs of one module's weights before its clusters are known (numpy, float32)."""

    gram_a: np.ndarray  # (n, n) A Aᵀ of the stacked raw A rows
    gram_b: np.ndarray  # (n, n) Bᵀ B of the stacked raw B columns
    row_max: np.ndarray  # (n,) largest entry of each A row
    row_min: np.ndarray  # (n,) smallest entry of each A row


def summarize_module(A: np.ndarray, B: np.ndarray) -> UnitSummary:
    """The summary of stacked factors ``A`` (n, d_in) and ``B`` (d_out, n), float32.

    numpy's matmul sees ``A @ A.T`` (and ``B.T @ B``) and calls BLAS ``syrk``: one triangle, half the
    multiply-adds of a general product (torch has no syrk: 0.8 s against 1.3 s for the reference
    shape's 224 modules on one thread). numpy's BLAS follows the same thread limits as torch's
    (OMP_NUM_THREADS, threadpoolctl).
    """
    return UnitSummary(gram_a=A @ A.T, gram_b=B.T @ B, row_max=A.max(axis=1), row_min=A.min(axis=1))


def module_groups(adapters: Sequence[LoraAdapter], budget: int = GROUP_BYTES) -> list[list[str]]:
    """Consecutive modules whose float32 factors, over all adapters, fit ``budget`` bytes (≥ 1 module each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in module_order(adapters):
        size = 4 * sum(m.r * (m.d_in + m.d_out) for a in adapters if (m := a.modules.get(name)) is not None)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _stackable(adapters: Sequence[LoraAdapter], name: str) -> list[tuple[int, StoredLoraModule]] | None:
    """The adapters' stored copies of ``name`` (index, module) if all are on disk with one shape, else None."""
    present = [(t, m) for t, a in enumerate(adapters) if (m := a.modules.get(name)) is not None]
    if not all(isinstance(m, StoredLoraModule) for _, m in present) or len({(m.d_in, m.d_out) for _, m in present}) != 1:
        return None
    return present


def stacked_floats(adapters: Sequence[LoraAdapter], names: Sequence[str]) -> int:
    """float32 elements :func:`read_stacked` takes for ``names`` (the modules it can stack)."""
    total = 0
    for name in names:
        if (present := _stackable(adapters, name)) is not None:
            first = present[0][1]
            total += sum(m.r for _, m in present) * (first.d_in + first.d_out)
    return total


class Arena:
    """A float32 buffer that one group's stacked factors are carved from, again for every group.

    Fresh buffers per group would cost a page fault per 4 KiB written (about 1 s of system time for
    the reference shape's 1.3 GB) and unmapping them interrupts the other core; an arena is faulted
    in once.
    """

    def __init__(self, size: int) -> None:
        self.buffer = np.empty(size, dtype=np.float32)
        self.used = 0

    def take(self, rows: int, cols: int) -> np.ndarray:
        part = self.buffer[self.used : self.used + rows * cols].reshape(rows, cols)
        self.used += rows * cols
        return part

    def owns(self, address: int) -> bool:
        """Whether memory at ``address`` (a tensor's ``data_ptr()``) lies in this arena."""
        start = self.buffer.ctypes.data
        return start <= address < start + self.buffer.nbytes


def read_stacked(
    adapters: Sequence[LoraAdapter], name: str, arena: Arena | None = None, check: bool = True
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, StoredLoraModule, slice]]] | None:
    """Read every adapter's stored factors of ``name`` side by side (float32), or None if they cannot be.

    Returns:
        ``(A (n, d_in), B (d_out, n), blocks)`` with ``blocks`` the (adapter index, module, units)
        of each adapter, in adapter order; the buffers come from ``arena`` when one is given.
        With ``check``, NaN/inf are checked once per buffer (files loaded without the up-front scan);
        without, the caller checks them (:func:`check_stacked`).
    """
    present = _stackable(adapters, name)
    if present is None:
        return None
    first = present[0][1]
    n = sum(m.r for _, m in present)
    A = arena.take(n, first.d_in) if arena is not None else np.empty((n, first.d_in), dtype=np.float32)
    B = arena.take(first.d_out, n) if arena is not None else np.empty((first.d_out, n), dtype=np.float32)
    blocks, start = [], 0
    for t, module in present:
        units = slice(start, start + module.r)
        module.file.read_array(module.key_a, A[units], check=False)
        module.file.read_array(module.key_b, B[:, units], check=False)
        blocks.append((t, module, units))
        start += module.r
    if check:
        check_stacked(A, B, blocks, bool(np.isfinite(A.sum()) and np.isfinite(B.sum())))
    return A, B, blocks


def check_stacked(A: np.ndarray, B: np.ndarray, blocks: list[tuple[int, StoredLoraModule, slice]], finite: bool) -> None:
    """NaN/inf in stacked factors of files loaded without the up-front scan: nothing to do when the
    caller found a finite sum over them (``finite``); else each such tensor is checked on its own."""
    if finite:
        return
    for _, module, units in blocks:
        if module.file.check_on_read:
            module.file.check_values(module.key_a, A[units])
            module.file.check_values(module.key_b, B[:, units])


def summary_bytes(adapters: Sequence[LoraAdapter]) -> int:
    """Bytes :func:`summarize` would keep: two n×n float32 Gram matrices per summarizable module."""
    total = 0
    for name in module_order(adapters):
        if (present := _stackable(adapters, name)) is not None:
            n = sum(m.r for _, m in present)
            total += 8 * n * n if n <= GRAM_UNITS else 0
    return total


def summarize(
    adapters: Sequence[LoraAdapter], group_bytes: int = GROUP_BYTES, progress: Callable[[int, int], None] | None = None,
    read_ahead: bool = True,
) -> Mapping[str, UnitSummary]:
    """:func:`summarize_module` of every module of adapters kept on disk whose units fit the Gram route.

    Groups of modules are read on another thread, one ahead, while this one computes; memory is
    two groups plus the summaries (:func:`summary_bytes`). Modules stored in memory, of mixed
    shapes, or with more than :data:`GRAM_UNITS` units are left out (the merge handles them itself).

    Args:
        adapters: adapters loaded with ``lazy=True``.
        group_bytes: float32 bytes read at once.
        progress: called with (modules done, modules in all) after each group.
        read_ahead: read on another thread; False reads and computes on this one (one core busy,
            as when another process needs the other: the merge command's torch import).
    """
    from concurrent.futures import ThreadPoolExecutor

    wanted = [name for name in module_order(adapters)
              if (present := _stackable(adapters, name)) is not None and sum(m.r for _, m in present) <= GRAM_UNITS]
    if not wanted:
        return {}
    groups = module_groups([_restricted(a, wanted) for a in adapters], group_bytes)
    size = max(stacked_floats(adapters, names) for names in groups)
    arenas = [Arena(size), Arena(size if len(groups) > 1 else 0)]

    def read(index: int) -> list[tuple[str, np.ndarray, np.ndarray, list]]:
        arena = arenas[index % 2]
        arena.used = 0
        return [(name, *read_stacked(adapters, name, arena, check=False)) for name in groups[index]]

    summaries: dict[str, UnitSummary] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") if read_ahead else _Inline() as reader:
        pending = reader.submit(read, 0)
        for index in range(len(groups)):
            block = pending.result()
            if index + 1 < len(groups):
                pending = reader.submit(read, index + 1)
            for name, A, B, blocks in block:
                summary = summarize_module(A, B)
                # A NaN/inf anywhere in a unit makes its squared norm, a Gram diagonal entry, NaN/inf:
                # the Gram matrices stand in for the finite-sum scan.
                check_stacked(A, B, blocks, bool(np.isfinite(summary.gram_a.diagonal().sum() + summary.gram_b.diagonal().sum())))
                summaries[name] = summary
            del block
            if progress is not None:
                progress(len(summaries), len(wanted))
    return summaries


def _restricted(adapter: LoraAdapter, names: Sequence[str]) -> LoraAdapter:
    modules: dict[str, LoraModule] = {name: adapter.modules[name] for name in names if name in adapter.modules}
    return LoraAdapter(name=adapter.name, source=adapter.source, config=adapter.config, modules=modules)


class _Inline:
    """An executor that runs each task when it is submitted (``with`` and ``submit`` only)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn: Callable, *args):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args))
        return future
