"""Where the app runs: device choice, the optional ZeroGPU decorator, public (Space) mode."""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# Upload limits: a LoRA of a 7B model at r = 16 is ~40 MB; the demo never needs more.
MAX_FILE_SIZE = "100mb"
UPLOAD_TYPES = [".zip", ".json", ".safetensors", ".bin"]
# Adapter slots in the load panel; a Space session never needs more.
MAX_ADAPTERS = 12
# Weights in memory (as loaded: float32 factors) one public session may hold, and all sessions of the
# process together: a 1 MB zip can unpack to a valid 1 GiB adapter, and every session keeps its own.
MAX_SESSION_WEIGHT_BYTES = 1 << 30
MAX_APP_WEIGHT_BYTES = 4 << 30
# Seconds an idle session's state (and its temp files) survive.
SESSION_TTL_S = 2 * 3600
# Requests that run at once (the queue's default concurrency limit).
CONCURRENCY = 2


def device() -> str:
    """`"cuda"` when a GPU is visible, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_threads() -> int:
    """Give each concurrent request an equal share of the CPU cores for torch.

    On oversubscribed cores the small matrix ops of the app (QR of a 384 x 48 factor, k-means on a
    48 x 48 Gram matrix) were measured 10-100x slower than with one thread each.

    Returns:
        The number of torch threads set.
    """
    threads = max(1, (os.cpu_count() or 1) // CONCURRENCY)
    torch.set_num_threads(threads)
    # numpy/scipy BLAS (inside umap and scikit-learn) has its own pool; cap it the same way.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    return threads


def public_mode(flag: bool = False) -> bool:
    """Whether the app runs for the public (a Space): then local paths are refused.

    Args:
        flag: `--public` from the command line.
    """
    return flag or bool(os.environ.get("SPACE_ID")) or os.environ.get("LEGO_VIZ_PUBLIC", "") not in ("", "0")


def allowed_roots() -> list[Path]:
    """Folders typed local paths may point into (local mode only; public mode refuses all paths).

    ``LEGO_VIZ_ALLOWED_ROOTS`` (os.pathsep-separated) replaces the default: the working directory,
    the home directory, the temp directory and the bundled assets.
    """
    configured = os.environ.get("LEGO_VIZ_ALLOWED_ROOTS", "")
    if configured.strip():
        return [Path(p).expanduser().resolve() for p in configured.split(os.pathsep) if p.strip()]
    assets = Path(__file__).resolve().parents[2] / "assets"
    return [Path.cwd().resolve(), Path.home().resolve(), Path(tempfile.gettempdir()).resolve(), assets]


def check_allowed_path(spec: str) -> None:
    """Refuse a typed local path that resolves (symlinks followed) outside :func:`allowed_roots`."""
    from lego_viz.adapters import AdapterError, printable

    resolved = Path(spec).expanduser().resolve()
    roots = allowed_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise AdapterError(
            f"{printable(spec)}: outside the folders this app may read ({', '.join(map(str, roots))}); "
            "set LEGO_VIZ_ALLOWED_ROOTS to allow another folder"
        )


@functools.cache
def _spaces_gpu() -> Callable | None:
    if importlib.util.find_spec("spaces") is None:
        return None
    import spaces

    return spaces.GPU


def on_gpu(fn: F) -> F:
    """Wrap a model-running function in `spaces.GPU` when the `spaces` package exists (ZeroGPU).

    Elsewhere the function is returned unchanged, so the app works on any CPU machine.
    """
    gpu = _spaces_gpu()
    return fn if gpu is None else gpu(fn)


def server_port(default: int = 7860) -> int:
    """The port from `PORT` or `GRADIO_SERVER_PORT` (hosting platforms set one of them)."""
    for name in ("PORT", "GRADIO_SERVER_PORT"):
        value = os.environ.get(name)
        if value:
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ValueError(f"{name}={value!r} is not a valid port number")
            return int(value)
    return default
