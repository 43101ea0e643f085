"""The one pass over the weights a LoRA-LEGO merge makes, without torch: stacked reads and Gram summaries.

A lego merge needs of each module's weights only its units' Gram matrices ``A Aᵀ`` and ``Bᵀ B``
and each unit's largest and smallest ``A`` entry (for the canonical sign) until the clusters are
known; the centroids read the weights a second time. That first pass is most of the arithmetic
and needs only numpy, so the ``merge`` command starts it in a forked process at once, and joins
in once it has set up the merge (:class:`SharedFirstPass`): two cores on it. The merge then starts
from the summaries (:func:`lego_viz.merge.lego.lego_clusters`). A merge without them computes the same
summaries the same way, module by module (:func:`summarize` does it for all modules in one
process), so the result is identical either way.

The stacked read (:func:`read_stacked`) is shared with the streamed merge (:mod:`lego_viz.merge.stream`):
all adapters' factors of a module go side by side into one ``A`` (n, d_in) and one ``B`` (d_out, n)
buffer, carved out of a reused :class:`Arena`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lego_viz.adapters import AdapterError, LoraAdapter, module_order
from lego_viz.adapters.stored import StoredLoraModule, squares_overflow

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


_BLAS = None  # threadpoolctl's controller of numpy's BLAS, made on first use


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread (~12 µs to enter).

    Our numpy products sit between torch's: torch's OpenMP threads spin-wait after each op, and a
    multi-threaded numpy product beside them ran 3× slower (4 layers of the reference shape, 2
    cores: 1.50 s against 0.47 s). One thread also makes the products' bits independent of the core
    count, so the first pass made in another process matches a merge's own.
    """
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def summarize_module(A: np.ndarray, B: np.ndarray) -> UnitSummary:
    """The summary of stacked factors ``A`` (n, d_in) and ``B`` (d_out, n), float32.

    numpy's matmul sees ``A @ A.T`` (and ``B.T @ B``) and calls BLAS ``syrk``: one triangle, half the
    multiply-adds of a general product (torch has no syrk: 0.8 s against 1.3 s for the reference
    shape's 224 modules on one thread).
    """
    # Values whose squares overflow are reported by _checked, in words, not as numpy warnings.
    with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
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
    if check:  # a sum of squares as cheap as a sum, which also catches values too large to merge
        check_stacked(A, B, blocks, not squares_overflow(A) and not squares_overflow(B))
    return A, B, blocks


def check_stacked(A: np.ndarray, B: np.ndarray, blocks: list[tuple[int, StoredLoraModule, slice]], finite: bool) -> None:
    """NaN/inf (or values too large to merge) in stacked factors of files loaded without the up-front
    scan: nothing to do when the caller found a finite sum of squares over them (``finite``); else each
    such tensor is checked on its own."""
    if finite:
        return
    for _, module, units in blocks:
        if module.file.check_on_read:
            module.file.check_values(module.key_a, A[units])
            module.file.check_values(module.key_b, B[:, units])


def _unit_count(adapters: Sequence[LoraAdapter], name: str) -> int:
    """Units of ``name`` over the adapters (for a module :func:`_stackable` accepts)."""
    return sum(m.r for _, m in _stackable(adapters, name))


def _summarizable(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The modules :func:`summarize` covers: stored with one shape in every adapter, ≤ GRAM_UNITS units."""
    return [name for name in module_order(adapters)
            if _stackable(adapters, name) is not None and _unit_count(adapters, name) <= GRAM_UNITS]


def summary_bytes(adapters: Sequence[LoraAdapter]) -> int:
    """Bytes :func:`summarize` would keep: two n×n float32 Gram matrices per summarizable module."""
    return sum(8 * _unit_count(adapters, name) ** 2 for name in _summarizable(adapters))


def _read_summary(adapters: Sequence[LoraAdapter], name: str, arena: Arena) -> UnitSummary:
    """Read one module's factors into ``arena`` (emptied first) and summarize them, values unchecked."""
    arena.used = 0
    A, B, _ = read_stacked(adapters, name, arena, check=False)
    return summarize_module(A, B)


def _checked(adapters: Sequence[LoraAdapter], name: str, summary: UnitSummary) -> UnitSummary:
    """``summary``, once its module is known to hold no NaN/inf (raises :class:`AdapterError` otherwise).

    A NaN/inf anywhere in a unit makes its squared norm, a Gram diagonal entry, NaN/inf: the Gram
    matrices stand in for the finite-sum scan, and only a failing module is read again to name the tensor.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(summary.gram_a.diagonal().sum() + summary.gram_b.diagonal().sum())
    if not finite:
        A, B, blocks = read_stacked(adapters, name, check=True)
        # Finite values whose squares overflow (|value| ~1e19 and up), or values that changed after
        # the file was checked: either way the units cannot be merged; say which adapter and why.
        peaks = [(max(float(np.abs(A[units]).max(initial=0)), float(np.abs(B[:, units]).max(initial=0))), module)
                 for _, module, units in blocks]
        for largest, module in peaks:
            if not np.isfinite(largest):
                raise AdapterError(f"{module.file.label}: {module.file.path.name} holds NaN/inf values in module {name} "
                                   "(the file changed after it was checked?); nothing was written.")
        largest, worst = max(peaks, key=lambda peak: peak[0])
        raise AdapterError(f"{worst.file.label}: {worst.file.path.name} holds values up to {largest:.3g} in module {name}, too "
                           "large to merge in float32 (their squares overflow); the adapter is broken or saved at the wrong scale.")
    return summary


def summarize(adapters: Sequence[LoraAdapter]) -> Mapping[str, UnitSummary]:
    """:func:`summarize_module` of every module of adapters kept on disk whose units fit the Gram route,
    in this process (the merge command shares the work with a forked one: :class:`SharedFirstPass`).

    Memory is one module's factors plus the summaries (:func:`summary_bytes`). Modules stored in
    memory, of mixed shapes, or with more than :data:`GRAM_UNITS` units are left out (the merge
    handles them itself).
    """
    names = _summarizable(adapters)
    if not names:
        return {}
    arena = Arena(max(stacked_floats(adapters, [name]) for name in names))
    return {name: _checked(adapters, name, _read_summary(adapters, name, arena)) for name in names}


class SharedFirstPass:
    """:func:`summarize` by two processes at once: a forked one starts now, and this one joins in when
    it is free (the merge command: once it has set up the merge).

    Modules are claimed one at a time from a shared counter, and each summary is written into
    memory both processes share, so whichever process is free works and nothing is copied between
    them. Values are checked for NaN/inf from the Gram diagonals here, in :meth:`result`; if the
    forked process fails or dies, its unfinished modules are summarized here (and an error in
    them raised here).

    Use :meth:`start`, before this process starts any thread.
    """

    def __init__(self, adapters: Sequence[LoraAdapter], names: list[str]) -> None:
        import mmap
        import multiprocessing

        self.adapters, self.names = adapters, names
        self.units = [_unit_count(adapters, name) for name in names]
        self.offsets = np.cumsum([0] + [2 * n * n + 2 * n for n in self.units]).tolist()
        # anonymous shared memory: the summaries (float32) and one "done" byte per module
        self.memory = mmap.mmap(-1, 4 * self.offsets[-1] + len(names))
        self.values = np.frombuffer(self.memory, dtype=np.float32, count=self.offsets[-1])
        self.done = np.frombuffer(self.memory, dtype=np.uint8, offset=4 * self.offsets[-1])
        self.largest = max(stacked_floats(adapters, [name]) for name in names)
        context = multiprocessing.get_context("fork")
        self.counter = context.Value("i", 0)
        self.process = context.Process(target=self._work, daemon=True)
        self.process.start()

    @classmethod
    def start(cls, adapters: Sequence[LoraAdapter]) -> SharedFirstPass | None:
        """Start the first pass of ``adapters`` in a forked process; None where it cannot help: torch
        is imported already (nothing to overlap, and no fork after it), the summaries would exceed
        :data:`SUMMARY_BYTES`, the platform cannot fork, or no module qualifies."""
        import multiprocessing
        import sys

        if "torch" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
            return None
        names = _summarizable(adapters)
        if not names or summary_bytes(adapters) > SUMMARY_BYTES:
            return None
        return cls(adapters, names)

    def _claim(self, parent: bool = False) -> int | None:
        lock = self.counter.get_lock()
        while not lock.acquire(timeout=0.2):
            if parent and not self.process.is_alive():  # died holding the lock: go on alone
                self.counter = _Counter(self.counter.value)
                lock = self.counter.get_lock()
        try:
            index = self.counter.value
            if index >= len(self.names):
                return None
            self.counter.value = index + 1
        finally:
            lock.release()
        return index

    def _slots(self, index: int) -> UnitSummary:
        n, start = self.units[index], self.offsets[index]
        gram_a = self.values[start : start + n * n].reshape(n, n)
        gram_b = self.values[start + n * n : start + 2 * n * n].reshape(n, n)
        row_max = self.values[start + 2 * n * n : start + 2 * n * n + n]
        return UnitSummary(gram_a, gram_b, row_max, self.values[start + 2 * n * n + n : start + 2 * n * n + 2 * n])

    def _summarize(self, index: int, arena: Arena) -> None:
        found, slots = _read_summary(self.adapters, self.names[index], arena), self._slots(index)
        for name in ("gram_a", "gram_b", "row_max", "row_min"):
            getattr(slots, name)[...] = getattr(found, name)
        self.done[index] = 1

    def _work(self) -> None:  # the forked process
        arena = Arena(self.largest)
        try:
            while (index := self._claim()) is not None:
                self._summarize(index, arena)
        except Exception:  # the parent redoes this module and raises the error itself
            pass

    def result(self) -> Mapping[str, UnitSummary]:
        """Take part until every module is claimed, wait for the forked process, and return the summaries.

        Raises:
            AdapterError: a NaN/inf in a file (or a file that cannot be read).
        """
        arena = Arena(self.largest)
        while (index := self._claim(parent=True)) is not None:
            self._summarize(index, arena)
        self.process.join()
        summaries = {}
        for index, name in enumerate(self.names):
            if not self.done[index]:  # the forked process failed on it, or died
                self._summarize(index, arena)
            summaries[name] = _checked(self.adapters, name, self._slots(index))
        return summaries


class _Counter:
    """A counter in this process only, with the lock interface of ``multiprocessing.Value``."""

    def __init__(self, value: int) -> None:
        import threading

        self.value, self._lock = value, threading.Lock()

    def get_lock(self):
        return self._lock
