"""Write safetensors files from numpy arrays, byte for byte as ``safetensors.torch.save_file`` would.

A merge computed in numpy exports without importing torch (its import is the largest single cost of
``python -m lego_viz merge``). numpy has no bfloat16, so bf16 factors are made here as their 16-bit
patterns, rounded as torch rounds; fp16 is numpy's cast with NaNs quieted as torch's kernels quiet them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class Format(NamedTuple):
    """How safetensors stores one dtype."""

    width: int  # bytes per element
    exponent: int | None  # mask of a float's exponent bits (all ones: inf or NaN); None for integers
    name: str  # torch's name of the dtype
    storage: str  # numpy dtype that holds its bits (bfloat16: the raw 16 bits)


# safetensors dtype tag → its format (what lego_viz.adapters.stored reads, and the float ones this module writes)
FORMATS = {
    "F64": Format(8, 0x7FF0000000000000, "float64", "<f8"),
    "F32": Format(4, 0x7F800000, "float32", "<f4"),
    "F16": Format(2, 0x7C00, "float16", "<f2"),
    "BF16": Format(2, 0x7F80, "bfloat16", "<u2"),
    "I64": Format(8, None, "int64", "<i8"), "I32": Format(4, None, "int32", "<i4"), "I16": Format(2, None, "int16", "<i2"),
    "I8": Format(1, None, "int8", "i1"), "U8": Format(1, None, "uint8", "u1"), "BOOL": Format(1, None, "bool", "?"),
}
_TAGS = {form.name: tag for tag, form in FORMATS.items()}  # torch dtype name → tag
_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes


def _float32_bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, as torch's ``.to(torch.bfloat16)`` writes them.

    Round to nearest, ties to even, on the bits (so overflow goes to ±inf, subnormals and -0.0 round like
    any other value); every NaN becomes 0xFFFF, which torch's vectorised CPU kernels write for any NaN.
    """
    bits = _float32_bits(values)
    rounded = (bits >> 16) & 1  # the lowest kept bit: +1 on top of 0x7FFF rounds a tie up only when it is odd
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    out[np.isnan(values)] = 0xFFFF
    return out


def to_float16(values: np.ndarray) -> np.ndarray:
    """float16 of float32 ``values``, as torch's ``.half()``: numpy's cast, NaNs quieted.

    numpy keeps a NaN's payload bits as they are (a signalling NaN stays signalling); torch's F16C
    conversion sets the quiet bit first, then keeps the payload's top 10 bits.
    """
    with np.errstate(over="ignore"):  # overflow to ±inf is the cast's result; callers refuse it (serving.cast_factor)
        out = np.ascontiguousarray(values, dtype=np.float32).astype(np.float16)
    nan = np.isnan(out)
    if nan.any():
        bits = _float32_bits(values)[nan]
        out.view(np.uint16)[nan] = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    return out


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``values`` in ``dtype``'s storage (``float32``, ``float16``; ``bfloat16`` as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return to_bfloat16(values)
    if dtype == "float16":
        return to_float16(values)
    return np.ascontiguousarray(values, dtype=FORMATS[_TAGS[dtype]].storage)


def all_finite(stored: np.ndarray, dtype: str) -> bool:
    """Whether ``stored`` (from :func:`cast`) holds no inf or NaN."""
    exponent = FORMATS[_TAGS[dtype]].exponent
    bits = stored.view(np.uint32 if dtype == "float32" else np.uint16)
    return not np.any((bits & exponent) == exponent)


def save_file(tensors: Mapping[str, np.ndarray], filename: str | os.PathLike, dtype: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors``, each holding ``dtype``'s bits (from :func:`cast`), as a safetensors file.

    The layout is safetensors' own: an 8-byte little-endian header length, then a compact JSON header
    (``__metadata__`` first, then the tensors in the order of their data: sorted by name, as safetensors
    sorts tensors of one dtype) padded with spaces to 8 bytes, then the data.
    """
    header = {} if metadata is None else {"__metadata__": dict(metadata)}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype=FORMATS[_TAGS[dtype]].storage)
        header[name] = {"dtype": _TAGS[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    with open(filename, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in arrays:
            f.write(array.data)
