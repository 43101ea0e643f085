"""Make an export fit where it is served: the saved dtype, a rank cap, and the push to the Hub.

Serving stacks load LoRAs in the model's dtype (most adapters in the wild are bf16) and cap the rank
they accept (vLLM's ``max_lora_rank``, 16 by default), so both are settled at export time, with a
message that says what to change rather than a failure on the server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lego_viz.adapters import AdapterError, safetensors_io

if TYPE_CHECKING:
    import torch

    from lego_viz.merge import MergedAdapter

# Names users type (CLI, mergekit configs) → the torch dtype name written to the safetensors file.
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


class ServingError(AdapterError):
    """The export does not fit the serving constraints asked for; the message says what to lower or change."""


def resolve_dtype(requested: str | None, source_dtypes: Iterable[str]) -> str:
    """The dtype to save the merged factors in.

    Args:
        requested: ``fp32``/``bf16``/``fp16`` (or the full torch names); None for the inputs' dtype.
        source_dtypes: how each source adapter stored its factors.

    Returns:
        The dtype's torch name (``float32``, ``bfloat16``, ``float16``): the requested one, else the
        inputs' common dtype, else float32 (inputs differ).
    """
    if requested is None:
        found = {DTYPES.get(str(d), "float32") for d in source_dtypes}
        return found.pop() if len(found) == 1 else "float32"
    name = DTYPES.get(str(requested).lower())
    if name is None:
        raise ServingError(f"unknown dtype {requested!r}; valid: fp32, bf16, fp16 (or float32, bfloat16, float16).")
    return name


def cast_factor(factor: torch.Tensor | np.ndarray, dtype: str | torch.dtype, key: str) -> torch.Tensor | np.ndarray:
    """``factor`` in ``dtype``; refuses a cast that overflows (fp16 tops out at 65504).

    Args:
        factor: a torch tensor, or a float32 numpy array (a merge run without torch; torch is not imported).
        dtype: the dtype's name as :func:`resolve_dtype` gives it (or a torch dtype).
        key: the tensor's name in the file, for the message.

    Returns:
        A contiguous CPU tensor in ``dtype``; for an array, the array in ``dtype``'s storage
        (bfloat16 as uint16 bit patterns, see :func:`lego_viz.adapters.safetensors_io.cast`).
    """
    name = str(dtype).removeprefix("torch.")
    if isinstance(factor, np.ndarray):
        out = safetensors_io.cast(factor, name)
        finite = safetensors_io.all_finite(out, name)
    else:
        import torch

        out = factor.detach().to(getattr(torch, name)).contiguous().cpu()
        # A finite sum proves every value finite (one pass, no mask); only a non-finite one is looked at.
        finite = torch.isfinite(out.sum(dtype=torch.float64)) or torch.isfinite(out).all()
    if not finite and not math.isfinite(largest := float(abs(factor).max())):
        # Not the cast: the merge itself made NaN/inf, from inputs it could not add up in float32.
        raise ServingError(f"{key} of the merge holds NaN/inf values (largest |value| {largest}) before any cast: an input "
                           "holds NaN/inf or values too large to merge in float32, or changed during the merge. "
                           "Check the inputs (python -m lego_viz inspect) and run again.")
    if not finite:
        raise ServingError(f"{key} overflows in {name} (largest |value| {float(abs(factor).max()):.3g}); "
                           "export in bf16 or fp32 instead.")
    return out


def check_max_rank(merged: MergedAdapter, max_rank: int | None) -> None:
    """Refuse a merge with any module above ``max_rank`` (a serving stack would reject it on load)."""
    if max_rank is None:
        return
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ServingError(f"max rank must be a positive whole number, got {max_rank!r}.")
    over = {name: r for name, r in merged.ranks.items() if r > max_rank}
    if not over:
        return
    worst = max(over, key=over.get)
    if merged.method in ("lego", "svd"):
        fix = f"lower k to {max_rank} or less (e.g. --k {max_rank}, or a per-module k for those modules)"
    else:
        fix = (f"method {merged.method} keeps the inputs' ranks (linear: their sum); use lego or svd with "
               f"k ≤ {max_rank}, or merge fewer / lower-rank adapters")
    raise ServingError(f"{len(over)} of {len(merged.ranks)} modules exceed max rank {max_rank} (largest: rank "
                       f"{over[worst]} at {worst}); {fix}.")


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Upload an exported folder (it carries its model card) to a Hub model repo.

    Args:
        folder: the export.
        repo_id: ``owner/name``; created when it does not exist.
        token: a Hub token; default the logged-in one (``HF_TOKEN`` or ``hf auth login``).
        private: create the repo private.

    Returns:
        The URL of the upload's commit.

    Raises:
        ServingError: offline, no token, or the Hub refused (the message names the cause).
    """
    folder = Path(folder)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        raise ServingError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set. The export is complete in {folder}; "
                           f"push it later with `hf upload {repo_id} {folder}`.")
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise ServingError(f"cannot push to {repo_id}: no Hugging Face token. Run `hf auth login` or set HF_TOKEN; "
                           f"the export is complete in {folder}.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message="Upload LoRA merged with lego-viz")
    except Exception as exc:  # network, auth and permission errors all come back as one line
        raise ServingError(f"push to {repo_id} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                           f"the export is complete in {folder}.") from None
    return str(getattr(info, "commit_url", info))
