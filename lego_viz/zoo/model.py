"""The zoo's base model: a tiny Llama built from a config, and loading of the shipped assets.

Loading uses exactly the path people use for real models: `from_pretrained` on a local
folder for the base and `PeftModel.from_pretrained` for an adapter.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

ZOO_DIR = Path(__file__).resolve().parents[2] / "assets" / "zoo"
# The PEFT target modules of every zoo adapter: all attention and MLP projections.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A family is a second adapter of one task (another seed and data shard), `<task>_b` in `families/`.
FAMILY_SUFFIX = "_b"


@dataclass(frozen=True)
class ZooModelConfig:
    """Shape of the zoo base model (a `LlamaForCausalLM`)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 64

    def __post_init__(self) -> None:
        for field, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"ZooModelConfig.{field} must be positive, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"
            )

    def llama_config(self, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> LlamaConfig:
        """The transformers config for this shape and a tokenizer's special ids."""
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the deprecation warning PEFT 0.21 triggers in transformers 5 (it says nothing about the zoo)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def default_device() -> str:
    """`"cuda"` when a GPU is visible, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(config: ZooModelConfig, tokenizer) -> LlamaForCausalLM:
    """A freshly initialised base model for `tokenizer` (seed torch first for reproducibility)."""
    llama = config.llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(llama)


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found at {path}; build it with `python scripts/build_zoo.py`")
    return path


def load_base(device: str | None = None, zoo_dir: Path = ZOO_DIR) -> tuple[PreTrainedModel, object]:
    """Load the shipped base model and tokenizer from `zoo_dir/base`.

    Args:
        device: Where to put the model; defaults to `default_device()`.
        zoo_dir: The zoo folder (the shipped `assets/zoo` unless given).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    base_dir = _require(Path(zoo_dir) / "base", "zoo base model")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).to(device or default_device()).eval()
    return model, tokenizer


def adapter_dirs(zoo_dir: Path = ZOO_DIR) -> dict[str, Path]:
    """The shipped task adapters, `{task: folder}`, in the order of `TASKS`.

    Args:
        zoo_dir: The zoo folder.

    Returns:
        One PEFT folder per task that has been built.
    """
    from lego_viz.zoo.tasks import TASKS

    root = Path(zoo_dir) / "adapters"
    return {name: root / name for name in TASKS if (root / name / "adapter_config.json").is_file()}


def family_dirs(zoo_dir: Path = ZOO_DIR) -> dict[str, Path]:
    """The shipped second adapters of some tasks, `{"<task>_b": folder}`, in the order of `TASKS`.

    Each has the rank of the task adapters and was trained like them on another seed and data
    shard: merging `reverse` with `reverse_b` is a "same-skill" merge.

    Args:
        zoo_dir: The zoo folder.

    Returns:
        One PEFT folder per family member that has been built.
    """
    from lego_viz.zoo.tasks import TASKS

    root = Path(zoo_dir) / "families"
    names = [f"{task}{FAMILY_SUFFIX}" for task in TASKS]
    return {name: root / name for name in names if (root / name / "adapter_config.json").is_file()}


def load_adapted(adapter_dir: Path | str, device: str | None = None, zoo_dir: Path = ZOO_DIR):
    """Load the base with one PEFT adapter folder on top (a task adapter or an exported merge).

    Args:
        adapter_dir: A PEFT LoRA folder for the zoo base.
        device: Where to put the model; defaults to `default_device()`.
        zoo_dir: The zoo folder holding the base.

    Returns:
        `(peft_model, tokenizer)`, the model in eval mode.
    """
    from peft import LoraConfig, PeftModel

    from lego_viz.adapters import PEFT_DEFAULT_ALPHA, load_adapter
    from lego_viz.adapters.patterns import peft_patterns

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    # Validated by our own reader first (messages, not tracebacks); PEFT then gets the config with its
    # rank_pattern / alpha_pattern keys resolved to module names, so no regex from the file runs on re.
    adapter = load_adapter(adapter_dir, lazy=True, hash_weights=False)
    config = LoraConfig.from_pretrained(adapter_dir)
    for key, value in peft_patterns(adapter.config, list(adapter.modules), adapter.name, PEFT_DEFAULT_ALPHA).items():
        setattr(config, key, value)
    base, tokenizer = load_base(device=device, zoo_dir=zoo_dir)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, adapter_dir, config=config)
    return model.eval(), tokenizer
