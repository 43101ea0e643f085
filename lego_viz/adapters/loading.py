"""Load and validate PEFT LoRA adapters into typed :class:`LoraAdapter` objects.

An adapter can be given as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``
or ``.bin``), a ``.zip`` of one, or a hub id. Everything is converted to float32 on the CPU; the
original file is hashed so that reports and recipes can name exactly what was merged. With
``lazy=True`` a safetensors adapter is validated from its header and stays on disk until a module is
used (:mod:`lego_viz.adapters.stored`). torch is imported where tensors are made, not here, so a command that
only reads headers starts fast.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import pickle
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lego_viz.adapters.files import FileTooLarge, NotRegularFile, read_capped
from lego_viz.adapters.patterns import PatternTable
from lego_viz.adapters.types import (
    CONFIG_NAME,
    HUB_ID,
    KEY_PREFIX,
    LORA_KEY,
    PEFT_DEFAULT_ALPHA,
    WEIGHT_NAMES,
    AdapterError,
    LoraAdapter,
    LoraModule,
    printable,
    shown,
)

if TYPE_CHECKING:
    import torch

# What a zip may unpack to: enough for a rank-64 adapter on every layer of a 70B model is far beyond
# a demo, but a zip bomb is stopped long before it fills the disk.
MAX_UNZIPPED_BYTES = 2 * 1024**3
# Entries a zip may hold: an adapter is two files; thousands of empty ones only fill the disk's inodes.
MAX_ZIP_ENTRIES = 1000
# What reading a damaged zip raises besides BadZipFile: a corrupt deflate stream, a cut-off entry,
# an encrypted one, an unknown compression method, a negative seek from a lying offset.
_ZIP_ERRORS = (zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)

# --------------------------------------------------------------------------- locating the files


def zip_members(zip_path: Path, max_bytes: int | None = None) -> list[zipfile.ZipInfo]:
    """The entries of a zip, checked before anything is extracted: a readable directory, at most
    :data:`MAX_ZIP_ENTRIES` entries, no path escapes or links, and declared sizes within ``max_bytes``
    (default :data:`MAX_UNZIPPED_BYTES`). Callers that extract several zips add up their declared sizes.
    """
    max_bytes = MAX_UNZIPPED_BYTES if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, *_ZIP_ERRORS) as exc:
        raise AdapterError(f"{zip_path.name}: not a readable zip file ({type(exc).__name__}: {str(exc)[:120]}).") from None
    if len(members) > MAX_ZIP_ENTRIES:
        raise AdapterError(f"{zip_path.name}: holds {len(members)} entries; an adapter zip needs a handful (at most {MAX_ZIP_ENTRIES}).")
    total = 0
    for info in members:
        name = info.filename
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or (parts and (":" in parts[0])) or ".." in parts:
            raise AdapterError(f"{zip_path.name}: refused entry {name!r} (absolute path or '..' escape).")
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:
            raise AdapterError(f"{zip_path.name}: refused entry {name!r} (symbolic link).")
        total += info.file_size
        if total > max_bytes:
            raise AdapterError(
                f"{zip_path.name}: uncompressed size exceeds {max_bytes / 1024**2:.0f} MiB; "
                "refusing to extract (zip bomb?)."
            )
    return members


def _safe_extract_zip(zip_path: Path, dest: Path, max_bytes: int | None = None) -> None:
    """Extract a zip (:func:`zip_members` checks it first), counting the bytes that really come out:
    a directory that lies about sizes is stopped at the declared size of each entry and at ``max_bytes``
    in all, and a damaged one ends in a message, never a half-read traceback."""
    max_bytes = MAX_UNZIPPED_BYTES if max_bytes is None else max_bytes
    members = zip_members(zip_path, max_bytes)
    written = 0
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in (m for m in members if not m.is_dir()):
                target = dest / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                left = info.file_size
                with archive.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written, left = written + len(chunk), left - len(chunk)
                        if left < 0 or written > max_bytes:
                            raise AdapterError(f"{zip_path.name}: entry {info.filename!r} is larger than declared; refused (zip bomb?).")
                        out.write(chunk)
    except (zipfile.BadZipFile, FileExistsError, NotADirectoryError, IsADirectoryError, *_ZIP_ERRORS) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(
            f"{zip_path.name}: damaged zip ({type(exc).__name__}: {str(exc)[:120]}); zip the adapter folder again and retry."
        ) from None


# How far below a given folder an adapter is looked for: a zip's folder or a training run's
# checkpoint-N/adapter is found, and ``model: /`` does not walk the whole filesystem (13 s).
SEARCH_DEPTH = 3
SEARCH_ENTRIES = 10_000


def _config_folders(root: Path, label: str) -> list[Path]:
    """Folders holding ``adapter_config.json`` at most :data:`SEARCH_DEPTH` levels below ``root``
    (breadth first, links not followed, at most :data:`SEARCH_ENTRIES` entries looked at)."""
    found, level, seen = [], [root], 0
    for _ in range(SEARCH_DEPTH + 1):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > SEARCH_ENTRIES:
                            raise AdapterError(f"{label}: no {CONFIG_NAME} in the first {SEARCH_ENTRIES:,} entries of this "
                                               "folder; give the adapter's own folder.")
                        if entry.name == CONFIG_NAME and entry.is_file():
                            found.append(folder)
                        elif entry.is_dir(follow_symlinks=False):
                            below.append(Path(entry.path))
            except OSError:  # unreadable, or gone meanwhile (/proc)
                continue
        level = below
    return sorted(found)


def _find_adapter_dir(root: Path, label: str) -> Path:
    """The folder under ``root`` that holds ``adapter_config.json`` (root itself or a few levels down)."""
    if (root / CONFIG_NAME).is_file():
        return root
    found = _config_folders(root, label)
    if len(found) == 1:
        return found[0]
    if not found:
        raise AdapterError(f"{label}: no {CONFIG_NAME} found within {SEARCH_DEPTH} levels; expected a PEFT LoRA folder "
                           "(adapter_config.json + adapter_model.safetensors).")
    raise AdapterError(f"{label}: holds {len(found)} adapters ({', '.join(p.name for p in found)}); give one at a time.")


def _hub_snapshot(repo_id: str) -> Path:
    """Fetch only the adapter files of a hub repo (cache first); fail clearly when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise AdapterError("hub ids need the huggingface_hub package; pip install huggingface_hub") from None
    patterns = [CONFIG_NAME, *WEIGHT_NAMES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise AdapterError(
            f"{repo_id!r} is not a local path and is not in the Hugging Face cache, and HF_HUB_OFFLINE is set. "
            "Download it on a machine with network access or give a local folder / zip."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as exc:
        raise AdapterError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}). Offline? Give a local folder or zip of the adapter instead."
        ) from None


def resolve_adapter_path(spec: str | os.PathLike, workdir: Path | None = None) -> Path:
    """Turn a folder, a zip, a file inside a PEFT folder or a hub id into the folder holding the adapter.

    Args:
        spec: what the user gave.
        workdir: where zips are extracted (a fresh temporary folder when omitted).

    Returns:
        The folder that contains ``adapter_config.json``.
    """
    text = os.fspath(spec)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text or not text.strip():
        raise AdapterError("empty adapter path: give a PEFT folder, a .zip of one, or a hub id.")
    if "\x00" in text:
        raise AdapterError("adapter path contains a NUL byte.")
    path = Path(text).expanduser()
    if len(os.fsencode(path)) > 4096 or any(len(os.fsencode(part)) > 255 for part in path.parts):
        # the file system's limits: checking such a path raises OSError (File name too long)
        raise AdapterError(f"{printable(text[:80])!r}{'…' if len(text) > 80 else ''}: no such file or folder (a name in it is longer than the 255 bytes "
                           "a file system allows), and not a valid hub id (owner/name).")
    if path.is_dir():
        return _find_adapter_dir(path, text)
    if path.is_file():
        if zipfile.is_zipfile(path):
            import tempfile

            dest = Path(tempfile.mkdtemp(prefix="lego_viz_zip_", dir=workdir))
            if workdir is None:  # ours to remove: lazy adapters read it until the process ends
                atexit.register(shutil.rmtree, dest, ignore_errors=True)
            try:
                _safe_extract_zip(path, dest)
                return _find_adapter_dir(dest, path.name)
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        if path.name == CONFIG_NAME or path.name in WEIGHT_NAMES:
            return _find_adapter_dir(path.parent, text)
        raise AdapterError(f"{printable(text)}: not a folder, a .zip, or a PEFT adapter file.")
    if len(text) <= 200 and HUB_ID.match(text) and ".." not in text:
        return _find_adapter_dir(_hub_snapshot(text), text)
    raise AdapterError(f"{printable(text[:120])!r}: no such file or folder, and not a valid hub id (owner/name).")


# --------------------------------------------------------------------------- reading the files


MAX_CONFIG_BYTES = 4 << 20  # an adapter_config.json is a few kB; rank_pattern for every module of a 70B model ~100 kB


class _LongInt(str):
    """A JSON integer too long for ``int()`` (4,300 digits), kept as text so that the message can name its key."""


def _json_int(text: str):
    return int(text) if len(text) <= 100 else _LongInt(text)


def _json_object(label: str):
    def pairs(items: list[tuple[str, object]]) -> dict:
        for key, value in items:
            for item in value if isinstance(value, list) else (value,):
                if isinstance(item, _LongInt):
                    raise AdapterError(f"{label}: {CONFIG_NAME} key {key[:60]!r} holds a whole number of {len(item)} digits; "
                                       "expected at most 100.")
        return dict(items)

    return pairs


def _read_config(folder: Path, label: str) -> dict:
    path = folder / CONFIG_NAME
    try:
        data = read_capped(path, MAX_CONFIG_BYTES)
        config = json.loads(data.decode("utf-8"), parse_int=_json_int, object_pairs_hook=_json_object(label))
    except FileNotFoundError:
        raise AdapterError(f"{label}: {CONFIG_NAME} is missing.") from None
    except NotRegularFile:
        raise AdapterError(f"{label}: {CONFIG_NAME} is not a regular file (a device or pipe?).") from None
    except FileTooLarge:
        raise AdapterError(f"{label}: {CONFIG_NAME} is larger than {MAX_CONFIG_BYTES >> 20} MiB; not a PEFT config.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{label}: {CONFIG_NAME} is not valid JSON ({exc}).") from None
    except RecursionError:
        raise AdapterError(f"{label}: {CONFIG_NAME} nests too deeply to be a PEFT config.") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{label}: {CONFIG_NAME} must hold a JSON object, got {type(config).__name__}.")
    return config


def _weights_path(folder: Path, label: str) -> Path:
    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            return path
    raise AdapterError(f"{label}: no adapter_model.safetensors or adapter_model.bin next to {CONFIG_NAME}.")


def _read_weights(path: Path, label: str) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        # Our reader, not safetensors.load_file: one header check for every route, and plain reads
        # into fresh memory instead of a map of the file (a map faults when the file is truncated,
        # and keeps a deleted upload's disk space while the adapter lives).
        from lego_viz.adapters.stored import SafetensorsFile

        stored = SafetensorsFile(path, label)
        return {key: stored.read_stored(key) for key in stored.tensors}
    try:
        # weights_only refuses any pickled object that is not a tensor or a plain container,
        # so a crafted __reduce__ never runs; map_location handles files saved from CUDA.
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterError(
            f"{label}: {path.name} holds pickled objects other than tensors (which could run code); refused for safety. "
            f"Re-save it as safetensors.{_offending_global(exc)}"
        ) from None
    except Exception as exc:
        raise AdapterError(f"{label}: {path.name} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:160]}).") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterError(f"{label}: {path.name} must hold a flat mapping of tensor names to tensors.")
    return tensors


def _offending_global(exc: Exception) -> str:
    """The 'Unsupported global: GLOBAL posix.system' part of torch's refusal, if present."""
    for line in str(exc).splitlines():
        if "Unsupported global" in line:
            return f" ({line.strip().rstrip('.')[:120]})"
    return ""


def file_identity(path: Path | int) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns) of a file (a path or an open descriptor): replacing,
    truncating or rewriting it changes at least one of them."""
    found = os.fstat(path) if isinstance(path, int) else os.stat(path)
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


def check_unchanged(path: Path, identity: tuple, label: str, handle: int | None = None) -> None:
    """Raise :class:`AdapterError` if the file (at ``path``, or open as ``handle``) is no longer the one
    loaded (``identity`` from :func:`file_identity`)."""
    try:
        now = file_identity(path if handle is None else handle)
    except FileNotFoundError:
        now = ()
    if identity and now != tuple(identity):
        raise AdapterError(
            f"{label}: {path.name} changed while it was being used (replaced, truncated or rewritten); nothing was written. "
            "Run again once the file stays as it is."
        )


def sha256_file(path: Path, identity: tuple = (), label: str = "") -> str:
    """The sha256 of a file, read in chunks (not mapped: a file truncated meanwhile would kill the
    process with SIGBUS). With ``identity`` (:func:`file_identity` at load), a file that is no longer
    the one loaded, before or after the hash, is refused, so a hash always names the bytes merged.
    """
    digest, step = hashlib.sha256(), 1 << 22
    buffer = bytearray(step)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        check_unchanged(path, identity, label, handle.fileno())
        while count := handle.readinto(buffer):
            digest.update(view[:count])  # hashlib and the read both release the GIL for chunks this large
        check_unchanged(path, identity, label, handle.fileno())
    return digest.hexdigest()


def _positive_number(value, what: str, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AdapterError(f"{label}: {what} must be a positive number, got {shown(value)}.")
    return float(value)


def _pattern_tables(config: dict, label: str) -> tuple[PatternTable, PatternTable]:
    """The config's rank_pattern and alpha_pattern, compiled once per adapter (one time budget each)."""
    return tuple(PatternTable(config.get(key), f"{label}: {key} key") for key in ("rank_pattern", "alpha_pattern"))


def _module_scale(config: dict, module: str, label: str, tables: tuple | None = None) -> tuple[int, float]:
    tables = tables or _pattern_tables(config, label)
    r = tables[0].value(module, config.get("r"))
    alpha = tables[1].value(module, config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{label}: r must be a positive integer for {module}, got {shown(r)}.")
    alpha = _positive_number(alpha, f"lora_alpha for {module}", label)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, scale


def _validate_config(config: dict, label: str) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{label}: peft_type is {shown(config.get('peft_type'))}; only LORA adapters are supported."
        )
    if config.get("use_dora"):
        raise AdapterError(f"{label}: DoRA adapters (use_dora=true) are not LoRA sums of rank-one units; not supported.")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{label}: r must be a positive integer, got {shown(r)}.")
    if r > 65536:
        raise AdapterError(f"{label}: r={r} is implausibly large (max 65536).")
    _positive_number(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha", label)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{label}: {key} must be a JSON object of module patterns, got {type(patterns).__name__}.")
        PatternTable(patterns, f"{label}: {key} key")  # every key a valid, bounded regex


@dataclass
class BuiltModules:
    """What :func:`build_modules` makes of a weights file."""

    modules: dict[str, LoraModule]
    extra: dict[str, torch.Tensor]  # tensors kept aside (their headers only for a file left on disk)
    warnings: list[str]


def _pair_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """The ``lora_A``/``lora_B`` tensors by module and side (``{module: {"A": (key, tensor), ...}}``), and the rest."""
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        short = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        match = LORA_KEY.match(short)
        if match is None:
            extra[short] = tensor
            continue
        pairs.setdefault(match["module"], {})[match["side"]] = (key, tensor)
    return pairs, extra


def _check_pair(module: str, sides: dict[str, tuple[str, torch.Tensor]], label: str, weights_name: str) -> None:
    """Raise :class:`AdapterError` unless the module has both its ``lora_A`` and its ``lora_B`` tensor."""
    for side in ("A", "B"):
        if side not in sides:
            other = "A" if side == "B" else "B"
            raise AdapterError(
                f"{label}: {weights_name} has {sides[other][0]} but no matching lora_{side} tensor for module {module}."
            )


def _check_ranks(module: str, key_a: str, A, key_b: str, B, r: int, label: str) -> None:
    """Raise :class:`AdapterError` unless ``A`` (r, d_in) and ``B`` (d_out, r) share the config's ``r``."""
    if A.shape[0] != B.shape[1]:
        raise AdapterError(
            f"{label}: {key_a} is {tuple(A.shape)} but {key_b} is {tuple(B.shape)}; "
            "expected A (r, d_in) and B (d_out, r) with the same r."
        )
    if A.shape[0] != r:
        raise AdapterError(
            f"{label}: {key_a} has r={A.shape[0]} rows but the config says r={r} for {module} "
            "(r / rank_pattern); the config and the weights do not belong together."
        )


def _finite_module(A, B, keys: tuple[str, str], scale: float, fan_in_fan_out: bool, label: str, weights_name: str) -> LoraModule:
    """A module of float32 copies of ``A`` and ``B``, refused if either holds NaN/inf or values too large to merge."""
    import torch

    from lego_viz.adapters.stored import check_finite

    A32, B32 = A.detach().to(torch.float32), B.detach().to(torch.float32)
    for key, tensor in zip(keys, (A32, B32)):
        check_finite(label, weights_name, key, tensor.numpy())
    return LoraModule(A=A32.contiguous(), B=B32.contiguous(), scale=scale, fan_in_fan_out=fan_in_fan_out)


def _stored_module(stored, keys: tuple[str, str], scale: float, fan_in_fan_out: bool, label: str, weights_name: str):
    """A module left on disk in ``stored``; its tensors are scanned for NaN/inf now unless ``stored`` checks on read."""
    from lego_viz.adapters.stored import StoredLoraModule

    for key in keys if not stored.check_on_read else ():
        if bad := stored.count_nonfinite(key):
            raise AdapterError(f"{label}: {weights_name} tensor {key} has {bad} NaN/inf values.")
    return StoredLoraModule(stored, keys[0], keys[1], scale, fan_in_fan_out)


def _extra_warning(extra: dict[str, torch.Tensor]) -> str:
    heads = sorted({k.split(".")[0] if "." not in k else k.rsplit(".", 1)[0] for k in extra})
    shown = ", ".join(heads[:4]) + (" …" if len(heads) > 4 else "")
    return (f"{len(extra)} non-LoRA tensors ({shown}) — task heads, modules_to_save or LoRA biases — are "
            "kept aside and left out of merges.")


def build_modules(
    tensors: dict[str, torch.Tensor], config: dict, label: str, weights_name: str, stored=None
) -> BuiltModules:
    """Pair up ``lora_A``/``lora_B`` tensors into validated :class:`LoraModule` objects.

    Args:
        stored: a :class:`lego_viz.adapters.stored.SafetensorsFile` whose ``tensors`` (shapes only) are
            passed as ``tensors``: the modules stay on disk (:class:`~lego_viz.adapters.stored.StoredLoraModule`).

    Returns:
        The modules, the extra tensors kept aside (their headers only when ``stored``) and the warnings.
    """
    pairs, extra = _pair_keys(tensors)
    built = BuiltModules(modules={}, extra=extra, warnings=[])
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    tables = _pattern_tables(config, label)
    for module, sides in pairs.items():
        _check_pair(module, sides, label, weights_name)
        (key_a, A), (key_b, B) = sides["A"], sides["B"]
        if A.dim() != 2 or B.dim() != 2:
            built.warnings.append(f"{module}: {A.dim()}-D LoRA tensors (conv/embedding LoRA) are not supported and were left out.")
            extra[key_a] = A
            extra[key_b] = B
            continue
        r, scale = _module_scale(config, module, label, tables)
        _check_ranks(module, key_a, A, key_b, B, r, label)
        if stored is not None:
            built.modules[module] = _stored_module(stored, (key_a, key_b), scale, fan_in_fan_out, label, weights_name)
        else:
            built.modules[module] = _finite_module(A, B, (key_a, key_b), scale, fan_in_fan_out, label, weights_name)
    if not built.modules:
        raise AdapterError(f"{label}: {weights_name} holds no lora_A/lora_B weight pairs.")
    if extra:
        built.warnings.append(_extra_warning(extra))
    return built


def stored_dtype(tensors: dict[str, torch.Tensor]) -> str:
    """The dtype of a file's LoRA factors (``bfloat16``, ``float16``, ``float32``); float32 when they mix.

    ``tensors`` may hold tensors or, for a lazy adapter, :class:`lego_viz.adapters.stored.TensorInfo` headers.
    """
    dtypes = {str(getattr(t, "torch_dtype", t.dtype)).removeprefix("torch.") for key, t in tensors.items() if LORA_KEY.match(key)}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def load_adapter(
    spec: str | os.PathLike, name: str | None = None, workdir: Path | None = None, lazy: bool = False,
    defer_checks: bool = False, hash_weights: bool = True,
) -> LoraAdapter:
    """Load and validate one PEFT LoRA adapter.

    Args:
        spec: a PEFT folder, a ``.zip`` of one, a file inside one, or a hub id.
        name: display name (default: the folder name).
        workdir: where zips are extracted.
        lazy: keep a safetensors adapter on disk: modules are validated now (shapes, NaN/inf) and
            read when used (``.bin`` files cannot be read in parts and load whole either way).
        defer_checks: with ``lazy``, check for NaN/inf when a module is read instead of scanning
            the file now: one pass over the data instead of two, for a caller that reads it all
            anyway (a merge); the error names the same file and tensor.
        hash_weights: hash the weights file now (``sha256``); False leaves it empty for
            :func:`hash_in_background` (a merge hashes while it computes; ``inspect`` never needs it).

    Returns:
        The adapter with float32 ``A``/``B`` per module (read on access when lazy) and per-module scale.

    Raises:
        AdapterError: with a message naming the adapter, file and tensor at fault.
    """
    folder = resolve_adapter_path(spec, workdir)
    label = name or (Path(os.fspath(spec)).stem if Path(os.fspath(spec)).suffix == ".zip" else folder.name)
    label = printable(label or os.fspath(spec))
    config = _read_config(folder, label)
    _validate_config(config, label)
    weights_path = _weights_path(folder, label)
    identity = file_identity(weights_path)  # before the first read: any change from here on is caught
    if lazy and weights_path.suffix == ".safetensors":
        from lego_viz.adapters.stored import SafetensorsFile

        stored = SafetensorsFile(weights_path, label)
        stored.check_on_read = defer_checks
        tensors = stored.tensors
        built = build_modules(tensors, config, label, weights_path.name, stored=stored)
    else:
        tensors = _read_weights(weights_path, label)
        built = build_modules(tensors, config, label, weights_path.name)
    return LoraAdapter(
        name=label,
        source=os.fspath(spec),
        config=config,
        modules=built.modules,
        extra_tensors=built.extra,
        warnings=built.warnings,
        sha256=sha256_file(weights_path, identity, label) if hash_weights else "",
        weights_file=weights_path.name,
        weights_path=str(weights_path),
        weights_identity=identity,
        config_sha256=sha256_file(folder / CONFIG_NAME),
        dtype=stored_dtype(tensors),
    )


# --------------------------------------------------------------------------- sets of adapters


def same_base(a: str | None, b: str | None) -> bool:
    """Whether two ``base_model_name_or_path`` values name the same model.

    Hub models moved into organisations (``gpt2`` → ``openai-community/gpt2``); a bare name equals an
    ``org/name`` with the same name. Anything else must match exactly (case-insensitive).
    """
    if a is None or b is None:
        return True
    a, b = a.strip().rstrip("/").lower(), b.strip().rstrip("/").lower()
    if a == b:
        return True
    if "/" in a and "/" in b:
        return False
    return a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def check_compatible(adapters: Sequence[LoraAdapter], allow_base_mismatch: bool = False) -> list[str]:
    """Check that adapters can be merged: same base model and the same shape per shared module.

    Args:
        adapters: the adapters to merge.
        allow_base_mismatch: accept different base-model names (shapes must still agree), e.g. a
            fine-tune of the same architecture; a warning is returned instead of an error.

    Returns:
        Warnings (partial module overlap, base names accepted despite differing).
    """
    if not adapters:
        raise AdapterError("no adapters given: select at least one adapter.")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise AdapterError(f"adapter names must be unique; repeated: {', '.join(dup)}. Rename one.")
    warnings: list[str] = []
    first = adapters[0]
    for other in adapters[1:]:
        if not same_base(first.base_model, other.base_model):
            message = (
                f"adapter {other.name!r} was trained on {other.base_model!r} but {first.name!r} on "
                f"{first.base_model!r}; adapters for different base models cannot be merged"
            )
            if not allow_base_mismatch:
                raise AdapterError(message + " (pass allow_base_mismatch / --allow-base-mismatch if the architectures are identical).")
            warnings.append(message + "; allowed by request.")
        if first.fan_in_fan_out != other.fan_in_fan_out:
            # The flag describes the base layer (GPT-2 Conv1D stores its weight transposed), not the
            # factors: A is (r, d_in) and B (d_out, r) either way, and PEFT resets the flag from the
            # layer type on load. So a disagreement is a config slip, not a reason to refuse.
            warnings.append(
                f"adapter {other.name!r} has fan_in_fan_out={other.fan_in_fan_out} but {first.name!r} has "
                f"{first.fan_in_fan_out}; the flag describes the base layer, not A or B, so they merge (the export "
                f"says True; PEFT sets it from the layer type when loading)."
            )
    shapes: dict[str, tuple[str, int, int]] = {}
    for adapter in adapters:
        for module, lora in adapter.modules.items():
            seen = shapes.setdefault(module, (adapter.name, lora.d_in, lora.d_out))
            if (seen[1], seen[2]) != (lora.d_in, lora.d_out):
                raise AdapterError(
                    f"adapter {adapter.name!r} targets {module} with d_in={lora.d_in}, d_out={lora.d_out} but "
                    f"{seen[0]!r} has d_in={seen[1]}, d_out={seen[2]}; they were trained on different models."
                )
    if len(adapters) > 1:
        common = set.intersection(*(set(a.modules) for a in adapters))
        if not common:
            raise AdapterError(
                "the adapters share no target module (e.g. "
                + "; ".join(f"{a.name}: {next(iter(a.modules))}" for a in adapters[:3])
                + "); there is nothing to merge."
            )
        partial = len(shapes) - len(common)
        if partial:
            warnings.append(f"{partial} of {len(shapes)} modules are present in only some adapters; they merge only those MSUs.")
    return warnings


def load_adapters(
    specs: Iterable[str | os.PathLike], names: Sequence[str] | None = None, lazy: bool = False, **options
) -> list[LoraAdapter]:
    """Load several adapters (``lazy`` and ``options`` as in :func:`load_adapter`), de-duplicating display names."""
    adapters: list[LoraAdapter] = []
    for i, spec in enumerate(specs):
        adapter = load_adapter(spec, name=names[i] if names else None, lazy=lazy, **options)
        base, n = adapter.name, 2
        while any(a.name == adapter.name for a in adapters):
            adapter.name = f"{base}_{n}"
            n += 1
        if note := twin_note(adapters, adapter):
            adapter.warnings.append(note)
        adapters.append(adapter)
    return adapters


def _same_files(a: LoraAdapter, b: LoraAdapter) -> bool:
    """The same weights file (after links), or the same contents where both are hashed already."""
    if a.sha256 and a.sha256 == b.sha256:
        return True
    try:
        return bool(a.weights_path and b.weights_path) and os.path.samefile(a.weights_path, b.weights_path)
    except OSError:
        return False


def twin_note(earlier: Sequence[LoraAdapter], adapter: LoraAdapter) -> str | None:
    """A warning when ``adapter`` is one of ``earlier`` given again (it would count twice in a merge)."""
    twin = next((a for a in earlier if a is not adapter and _same_files(a, adapter)), None)
    if twin is None:
        return None
    return (f"{adapter.name} is the same adapter as {twin.name}, given twice: it counts twice in a merge; "
            "drop one, or give one a weight of 2 if that is meant.")


def hash_in_background(adapters: Sequence[LoraAdapter]) -> Callable[[], None]:
    """Hash the weights of adapters loaded with ``hash_weights=False`` in a background thread.

    hashlib and file reads release the GIL, so the hashes cost no time on a second core while the
    caller computes. Returns the function that waits for them, fills in each ``sha256`` and raises
    :class:`AdapterError` for a weights file that changed since it was loaded (call it after the last read).
    """
    pending = [a for a in adapters if not a.sha256 and a.weights_path]
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    futures = [(adapter, pool.submit(sha256_file, Path(adapter.weights_path), adapter.weights_identity, adapter.name))
               for adapter in pending]
    pool.shutdown(wait=False)

    from lego_viz.adapters.stored import StoredLoraModule

    # Files read after loading (lazy modules) or hashed now must still be the ones loaded once the caller
    # has read them; an adapter read and hashed whole at load owes nothing to its file (which may be gone).
    later = [a for a in adapters if a.weights_path and (not a.sha256 or any(isinstance(m, StoredLoraModule) for m in a.modules.values()))]

    def finish() -> None:
        for adapter, future in futures:
            adapter.sha256 = future.result()
        for adapter in later:
            check_unchanged(Path(adapter.weights_path), adapter.weights_identity, adapter.name)

    return finish


def adapter_weights(adapters: Sequence[LoraAdapter], weights: Sequence[float] | None) -> list[float]:
    """One finite weight per adapter (all 1 when none are given), not all zero."""
    if weights is None:
        return [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise AdapterError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be finite numbers, got {weights}.")
    if all(w == 0 for w in weights):
        raise AdapterError("all adapter weights are zero; the merge would be empty. Give at least one non-zero weight.")
    return weights


def module_order(adapters: Sequence[LoraAdapter]) -> list[str]:
    """All module names of a set of adapters, in first-seen order."""
    return list(dict.fromkeys(m for a in adapters for m in a.modules))
