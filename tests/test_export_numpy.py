"""Exports of merges held in numpy: no torch import, and the same bytes as the torch export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_adapter
from safetensors.torch import load_file

from lego_viz.adapters.safetensors_io import to_bfloat16, to_float16
from lego_viz.export.folder import export_adapter
from lego_viz.export.serving import ServingError
from lego_viz.merge import merge

# float32 bit patterns where a conversion can go wrong
EDGE_BITS = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # ±0, ±inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0x7FA00000,  # quiet and signalling NaNs
    0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8000,  # float32 max; bf16's last value, and the tie above it (→ inf)
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80008001,  # float32 subnormals, ties among them
    0x3F808000, 0x3F818000, 0xBF818000, 0x3F80FFFF,  # ties to even (down, up), just below a tie
]
EDGE_VALUES = [65504.0, 65519.996, 65520.0, -65520.0, 2.0**-14, 2.0**-14 - 2.0**-24,  # fp16: max, overflow tie, min normal
               2.0**-24, 2.0**-25, 3 * 2.0**-25, 2.0**-25 * 1.0000001, -(2.0**-26), 1e-8, 1 / 3]  # fp16 subnormals, ties


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    every_pattern = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(over="ignore"):  # the largest magnitudes overflow float32 on purpose
        magnitudes = (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-46, 39, 200_000)).astype(np.float32)
    edges = np.concatenate([np.array(EDGE_BITS, dtype=np.uint32).view(np.float32), np.array(EDGE_VALUES, dtype=np.float32)])
    return np.concatenate([every_pattern, magnitudes, edges, -edges])


def _is_nan(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Which 16-bit patterns of ``dtype`` are NaN: exponent all ones, mantissa not zero."""
    exponent, mantissa = (0x7C00, 0x03FF) if dtype == torch.float16 else (0x7F80, 0x007F)
    return ((bits & exponent) == exponent) & ((bits & mantissa) != 0)


def _torch_bits(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("module", ["lego_viz.export.folder", "lego_viz.export.serving", "lego_viz.export.model_card", "lego_viz.export.recipe"])
def test_import_leaves_torch_out(module):
    heavy = ("torch", "lego_viz.merge", "lego_viz.checks.retention", "lego_viz.checks.invariance")
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


@pytest.mark.parametrize("convert, dtype", [(to_bfloat16, torch.bfloat16), (to_float16, torch.float16)])
def test_conversion_matches_torch_bit_for_bit(convert, dtype):
    values = _values()
    ours, theirs = convert(values).view(np.uint16), _torch_bits(values, dtype)
    # A NaN's bits depend on the CPU's vector kernels torch picks (and an export refuses NaN anyway):
    # every NaN must stay a NaN; every other value must have torch's bits exactly.
    nan = np.isnan(values)
    assert _is_nan(ours[nan], dtype).all()
    wrong = np.flatnonzero((ours != theirs) & ~nan)
    assert wrong.size == 0, [(hex(b), hex(o), hex(t)) for b, o, t in
                             zip(values.view(np.uint32)[wrong[:5]], ours[wrong[:5]], theirs[wrong[:5]])]


def _as_numpy(merged):
    """The same merge with its factors and labels as numpy arrays (what the torch-free merge hands over)."""
    modules = {name: dataclasses.replace(m, A=m.A.numpy(), B=m.B.numpy()) for name, m in merged.modules.items()}
    labels = {name: lab.numpy() for name, lab in merged.labels.items()}
    return dataclasses.replace(merged, modules=modules, labels=labels)


@pytest.fixture(scope="module")
def lego_merge():
    adapters = [make_adapter("a", r=4, alpha=8, seed=1), make_adapter("b", r=2, alpha=4, seed=2),
                make_adapter("c", r=6, alpha=6, seed=3)]
    return merge(adapters, "lego", k={"q_proj": 2, "*": 5})


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_numpy_export_writes_the_torch_export_bytes(tmp_path, lego_merge, dtype):
    as_numpy = _as_numpy(lego_merge)
    assert isinstance(next(iter(as_numpy.modules.values())).A, np.ndarray)
    torch_out = export_adapter(lego_merge, tmp_path / "torch", dtype=dtype)
    numpy_out = export_adapter(as_numpy, tmp_path / "numpy", dtype=dtype)
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "README.md"):
        assert (numpy_out / name).read_bytes() == (torch_out / name).read_bytes(), name
    torch_report, numpy_report = (json.loads((out / "merge_report.json").read_text()) for out in (torch_out, numpy_out))
    assert {**numpy_report, "created": None} == {**torch_report, "created": None}
    assert numpy_report["cluster_sizes"]  # labels as numpy arrays counted like tensors

    saved = load_file(str(numpy_out / "adapter_model.safetensors"))
    assert len(saved) == 2 * len(lego_merge.modules)
    for name, lora in lego_merge.modules.items():
        for side in "AB":
            tensor = saved[f"base_model.model.{name}.lora_{side}.weight"]
            expected = getattr(lora, side).to(tensor.dtype)
            assert str(tensor.dtype).removeprefix("torch.") == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
            assert torch.equal(tensor, expected), (name, side)


def test_numpy_fp16_overflow_is_refused_as_for_tensors(tmp_path):
    merged = merge([make_adapter("big", r=2)], "linear", weights=[1e6])  # ΔW entries far beyond fp16's 65504
    messages = []
    for which, candidate in (("torch", merged), ("numpy", _as_numpy(merged))):
        with pytest.raises(ServingError, match=r"overflows in float16.*bf16 or fp32") as caught:
            export_adapter(candidate, tmp_path / which, dtype="fp16")
        messages.append(str(caught.value))
        assert not (tmp_path / which).exists()
    assert messages[0] == messages[1]
