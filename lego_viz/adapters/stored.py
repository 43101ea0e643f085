"""Adapters that stay on disk: read a safetensors file tensor by tensor, when a module is used.

A merge of many large adapters must not hold them all in memory. The safetensors format is a JSON
header of names, dtypes, shapes and byte ranges followed by the raw data, so one tensor is one
``pread`` of its range: memory stays at the modules being processed, kept as stored (bf16/fp16)
until the moment they are turned into float32. We read with plain file reads rather than the
library's memory map, whose touched pages would stay resident in the process until it closes.

Validation needs no torch: shapes come from the header and NaN/inf are found from the bit patterns
with numpy (an all-ones exponent), so ``inspect`` starts fast.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lego_viz.adapters.safetensors_io import FORMATS
from lego_viz.adapters.types import AdapterError, LoraModule

if TYPE_CHECKING:
    import numpy as np
    import torch

_UINT = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}
# Largest header read: an adapter's header takes ~130 bytes per tensor, so 16 MiB is over 100,000
# tensors; parsing a hostile one (millions of tiny JSON values) costs ~20x its size in memory.
_MAX_HEADER = 16 << 20
# Bytes scanned per step when looking for NaN/inf, so a large tensor is never held twice.
_SCAN_BYTES = 1 << 24
# Bits (sign cleared) of 2**64 per dtype, √ of float32's largest: from there up a value's square
# overflows float32, so no merge of it can be finite (fp16 never gets there).
_TOO_LARGE = {"F32": 0x5F800000, "BF16": 0x5F80, "F64": 0x43F0000000000000}


_SCRATCH = threading.local()


def _scratch(nbytes: int, slot: int = 0) -> np.ndarray:
    """A reused byte buffer of at least ``nbytes`` (≤ _SCAN_BYTES) for this thread (one per ``slot``).

    A fresh buffer per tensor would be a fresh memory map per tensor above glibc's mmap threshold,
    every page faulted in again: scanning the reference shape's 1.3 GB took twice as long.
    """
    import numpy as np

    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[slot] = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
    return buffer[:nbytes]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def dim(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> str:
        """The torch name of the stored dtype (``bfloat16``), without importing torch."""
        return FORMATS[self.dtype].name


class SafetensorsFile:
    """The index of a safetensors file; tensors are read on request.

    Args:
        path: the ``.safetensors`` file.
        label: adapter name used in error messages.

    Raises:
        AdapterError: the header is not a valid safetensors header or points outside the file.
    """

    def __init__(self, path: str | os.PathLike, label: str) -> None:
        self.path = Path(path)
        self.label = label
        self.check_on_read = False  # set when the values were not scanned at load (see read)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file")
                if length > _MAX_HEADER:
                    raise ValueError(f"header of {length:,} bytes; an adapter's takes well under {_MAX_HEADER >> 20} MiB")
                raw = handle.read(length)
            header = _parse_header(raw)
            data_start = 8 + length
            self.tensors: dict[str, TensorInfo] = {}
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if not isinstance(entry["dtype"], str) or entry["dtype"] not in FORMATS:
                    raise ValueError(f"tensor {key} has dtype {str(entry['dtype'])[:20]!r}; readable: {', '.join(FORMATS)}")
                width = FORMATS[entry["dtype"]].width
                shape, offsets = tuple(entry["shape"]), tuple(entry["data_offsets"])
                if not all(type(n) is int for n in shape + offsets) or len(offsets) != 2:
                    raise ValueError(f"tensor {key} needs whole numbers for its shape and two data_offsets")
                begin, end = offsets
                if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != width * math.prod(shape):
                    raise ValueError(f"tensor {key} has byte range {begin}..{end} that does not fit its shape")
                self.tensors[key] = TensorInfo(entry["dtype"], shape, data_start + begin, end - begin)
            _check_tiling(self.tensors, data_start, size)
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterError(f"{label}: {self.path.name} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:160]}).") from None

    def _read_bytes(self, info: TensorInfo, into: memoryview | None = None) -> memoryview:
        """The tensor's bytes, read into ``into`` (a writable buffer of ``info.nbytes``) or else into
        this thread's scratch buffer (valid until its next read; a fresh buffer above 16 MiB)."""
        import numpy as np

        if into is not None:
            buffer = into
        else:
            buffer = memoryview(_scratch(info.nbytes) if info.nbytes <= _SCAN_BYTES else np.empty(info.nbytes, dtype=np.uint8))
        with open(self.path, "rb") as handle:
            handle.seek(info.start)
            if handle.readinto(buffer) != info.nbytes:
                raise AdapterError(f"{self.label}: {self.path.name} is corrupt or truncated (it changed while being read).")
        return buffer

    def count_nonfinite(self, key: str) -> int:
        """NaN/inf values of a float tensor (0 for integer tensors), read in bounded chunks.

        A value is NaN/inf when its exponent bits are all ones, i.e. when its bits without the sign
        are ≥ the exponent mask; the largest such magnitude per chunk (two cheap passes, read into one
        reused buffer) says whether to count at all, so a clean file costs about its read. The same
        largest magnitude shows finite values too large to merge (:data:`_TOO_LARGE`): those raise
        :class:`AdapterError` here.
        """
        import numpy as np

        info = self.tensors[key]
        width, mask = FORMATS[info.dtype].width, FORMATS[info.dtype].exponent
        if mask is None or not info.nbytes:
            return 0
        magnitude = np.array((1 << (8 * width - 1)) - 1, dtype=_UINT[width])  # all bits but the sign
        step = min(_SCAN_BYTES - _SCAN_BYTES % width, info.nbytes)
        buffer = _scratch(step).view(_UINT[width])
        bad, huge, large = 0, 0, _TOO_LARGE.get(info.dtype, mask)
        with open(self.path, "rb") as handle:
            handle.seek(info.start)
            for offset in range(0, info.nbytes, step):
                size = min(step, info.nbytes - offset)
                if handle.readinto(memoryview(buffer).cast("B")[:size]) != size:
                    raise AdapterError(f"{self.label}: {self.path.name} is corrupt or truncated (it changed while being read).")
                bits = np.bitwise_and(buffer[: size // width], magnitude, out=buffer[: size // width])
                if (top := int(bits.max())) >= mask:
                    bad += int(np.count_nonzero(bits >= mask))
                elif top >= large:
                    huge = max(huge, top)
        if huge and not bad:
            largest = float(np.array(huge, dtype=_UINT[width]).view(FORMATS[info.dtype].storage)) if info.dtype != "BF16" \
                else float(np.array(huge << 16, dtype=np.uint32).view(np.float32))
            raise too_large(self.label, self.path.name, key, largest)
        return bad

    def read_stored(self, key: str) -> torch.Tensor:
        """One tensor as stored (its own dtype), in fresh memory: nothing stays mapped to the file,
        so removing or truncating the file later neither keeps its disk space nor faults a reader."""
        import torch

        info = self.tensors[key]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._read_bytes(info, memoryview(raw.numpy()))
        return raw.view(getattr(torch, info.torch_dtype)).reshape(info.shape)

    def read(self, key: str) -> torch.Tensor:
        """One tensor in float32 (converted from its stored dtype here, after the read)."""
        import torch

        out = torch.empty(self.tensors[key].shape, dtype=torch.float32)
        self.read_array(key, out.numpy())
        return out

    def read_array(self, key: str, out: np.ndarray, check: bool | None = None) -> None:
        """Read one tensor into ``out`` (float32, the tensor's shape; a view into a larger buffer is fine).

        No torch: float32 data is read straight into a contiguous ``out``; other dtypes (and strided
        views) go through one buffer of the stored bytes and are converted on the copy (bf16 by
        moving its bits into the top half of a float32, which is what bf16 is). With ``check`` (by
        default ``check_on_read``: a file loaded without the up-front scan) the values are checked
        here (:meth:`check_values`); a caller that reads many tensors side by side can pass
        ``check=False`` and check them together.
        """
        import numpy as np

        info = self.tensors[key]
        if tuple(out.shape) != info.shape or out.dtype != np.float32:
            raise ValueError(f"read_array: {key} is {info.shape}, got a {out.dtype} buffer of {tuple(out.shape)}")
        if info.nbytes:
            if info.dtype == "F32" and out.flags.c_contiguous:
                self._read_bytes(info, memoryview(out.reshape(-1)).cast("B"))
            else:
                raw = np.frombuffer(self._read_bytes(info), dtype=FORMATS[info.dtype].storage).reshape(info.shape)
                # A block of columns of a wider buffer (the stacked B factors) is filled row by row.
                rows = out.ndim == 2 and not out.flags.c_contiguous and out.strides[1] == 4 and info.nbytes <= _SCAN_BYTES
                target = out if not rows else raw if info.dtype == "F32" else _scratch_floats(info.shape)
                if info.dtype == "BF16":
                    np.left_shift(raw, 16, out=target.view(np.uint32), dtype=np.uint32)
                elif target is not raw:
                    target[...] = raw
                if rows:
                    _copy_rows(out, target)
        if self.check_on_read if check is None else check:
            self.check_values(key, out)

    def check_values(self, key: str, values: np.ndarray) -> None:
        """Raise :class:`AdapterError` if ``values`` (tensor ``key`` as read, float32) hold NaN/inf or
        values too large to merge (:func:`check_finite`)."""
        check_finite(self.label, self.path.name, key, values)


def squares_overflow(values: np.ndarray) -> bool:
    """Whether the sum of squares of float32 ``values`` is not finite: a NaN/inf among them, or values
    too large to merge (products of two such overflow float32). One pass, as cheap as a sum."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        if values.flags.c_contiguous:
            flat = values.reshape(-1)
            return not np.isfinite(np.dot(flat, flat))
        axes = "abcdefghijklmnop"[: values.ndim]
        return not np.isfinite(np.einsum(f"{axes},{axes}->", values, values))


def check_finite(label: str, file: str, key: str, values: np.ndarray) -> None:
    """Raise :class:`AdapterError` for NaN/inf in ``values`` (float32, tensor ``key`` of ``file``), or
    for values so large that the sum of their squares overflows float32: no method can merge those.

    A finite sum of squares (one pass) proves there is neither; only then are values counted.
    """
    import numpy as np

    if not squares_overflow(values):
        return
    if bad := int(values.size - np.isfinite(values).sum()):
        raise AdapterError(f"{label}: {file} tensor {key} has {bad} NaN/inf values.")
    raise too_large(label, file, key, float(np.abs(values).max()))


def too_large(label: str, file: str, key: str, largest: float) -> AdapterError:
    """The error for finite values too large to merge in float32."""
    return AdapterError(f"{label}: {file} tensor {key} holds values up to {largest:.3g}, too large to merge in float32 "
                        "(their squares overflow); the adapter is broken or saved at the wrong scale.")


def _parse_header(raw: bytes) -> dict:
    """The header's JSON object; nesting deeper than the parser's recursion limit is refused as such
    (a safetensors header is an object of objects holding arrays), and ``__metadata__`` must map names
    to strings, as the safetensors library requires."""
    try:
        header = json.loads(raw)
    except RecursionError:
        raise ValueError("header nests deeper than any safetensors header does") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    return header


def _check_tiling(tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges must cover the data exactly, one after another, as the safetensors library
    requires: an overlap (two tensors sharing bytes), a gap or a tail of other bytes is refused."""
    at = data_start
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].nbytes)):
        if info.start != at:
            what = "overlaps the tensor before it" if info.start < at else f"leaves a gap of {info.start - at} bytes before it"
            raise ValueError(f"tensor {key} at bytes {info.start - data_start}..{info.start - data_start + info.nbytes} {what}")
        at += info.nbytes
    if at != size:
        problem = "runs past the end of the file" if at > size else f"leaves {size - at} bytes at the end unused"
        raise ValueError(f"the data {problem} (header covers {at - data_start} bytes, file holds {size - data_start})")


def _scratch_floats(shape: tuple[int, int]) -> np.ndarray:
    """A contiguous float32 buffer of ``shape``, this thread's own (see :func:`_scratch`), valid until its next use."""
    import numpy as np

    return _scratch(4 * shape[0] * shape[1], slot=1).view(np.float32).reshape(shape)


def _copy_rows(out: np.ndarray, values: np.ndarray) -> None:
    """``out[...] = values`` for a 2-d ``out`` whose rows are contiguous but spaced apart.

    Seen as one opaque item per row, the copy is one loop of row-sized memcpys: about 4× faster
    than numpy's element loop over short rows (a (14336, 16) block of a (14336, 128) buffer).
    """
    import numpy as np

    row = np.dtype((np.void, out.shape[1] * out.itemsize))
    out.view(row)[...] = np.ascontiguousarray(values).view(row)


class StoredLoraModule(LoraModule):
    """A :class:`LoraModule` whose ``A`` and ``B`` are read from the file on each access (float32).

    Shapes, ``r`` and the scale are known without reading; :meth:`load` reads both factors once and
    returns a plain in-memory module, which is what a merge works on, one group of modules at a time.
    """

    def __init__(self, file: SafetensorsFile, key_a: str, key_b: str, scale: float, fan_in_fan_out: bool = False):
        # A frozen dataclass: set the fields the way its own __init__ would.
        for name, value in (("file", file), ("key_a", key_a), ("key_b", key_b), ("scale", scale),
                            ("fan_in_fan_out", fan_in_fan_out)):
            object.__setattr__(self, name, value)

    @property
    def A(self) -> torch.Tensor:  # (r, d_in)
        return self.file.read(self.key_a)

    @property
    def B(self) -> torch.Tensor:  # (d_out, r)
        return self.file.read(self.key_b)

    @property
    def r(self) -> int:
        return self.file.tensors[self.key_a].shape[0]

    @property
    def d_in(self) -> int:
        return self.file.tensors[self.key_a].shape[1]

    @property
    def d_out(self) -> int:
        return self.file.tensors[self.key_b].shape[0]

    @property
    def stored_bytes(self) -> int:
        return self.file.tensors[self.key_a].nbytes + self.file.tensors[self.key_b].nbytes

    def load(self) -> LoraModule:
        return LoraModule(A=self.A, B=self.B, scale=self.scale, fan_in_fan_out=self.fan_in_fan_out)

    def __repr__(self) -> str:
        return f"StoredLoraModule({self.file.path.name}: {self.key_a}, r={self.r}, d_in={self.d_in}, d_out={self.d_out})"
