"""The demo zoo: a tiny character-level Llama, synthetic tasks and one trained LoRA per task.

Everything runs offline on a CPU; the assets are built by `scripts/build_zoo.py` into
`assets/zoo/` and loaded with the same `from_pretrained` calls used for real models.
"""

from lego_viz.zoo.data import encode_pairs, mixture_batch, task_batch
from lego_viz.zoo.evaluate import evaluate, generate, with_mean
from lego_viz.zoo.model import (
    TARGET_MODULES,
    ZOO_DIR,
    ZooModelConfig,
    adapter_dirs,
    default_device,
    family_dirs,
    load_adapted,
    load_base,
)
from lego_viz.zoo.tasks import PRETRAIN_TASKS, TASKS, Task, get_task, held_out
from lego_viz.zoo.tokenizer import build_tokenizer

__all__ = [
    "PRETRAIN_TASKS",
    "TARGET_MODULES",
    "TASKS",
    "ZOO_DIR",
    "Task",
    "ZooModelConfig",
    "adapter_dirs",
    "build_tokenizer",
    "default_device",
    "encode_pairs",
    "evaluate",
    "family_dirs",
    "generate",
    "get_task",
    "held_out",
    "load_adapted",
    "load_base",
    "mixture_batch",
    "task_batch",
    "with_mean",
]
