"""Building the zoo: pre-train the base, train one LoRA per task, measure, write the assets.

`scripts/build_zoo.py` is the command-line front; this module holds the recipe so that it is
recorded in `zoo_card.json` and reusable from tests.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lego_viz.zoo.data import task_batch
from lego_viz.zoo.evaluate import evaluate, with_mean
from lego_viz.zoo.model import TARGET_MODULES, ZooModelConfig, build_model
from lego_viz.zoo.tasks import N_HELD_OUT, PRETRAIN_TASKS, TASKS
from lego_viz.zoo.tokenizer import CHARS, SPECIAL_TOKENS, build_tokenizer
from lego_viz.zoo.train import TrainConfig, lora_config, pretrain, train_adapter

CARD_NAME = "zoo_card.json"
# Recorded in each adapter_config.json: where the base lives, relative to the repository root.
BASE_MODEL_NAME = "assets/zoo/base"
DEFAULT_RANK = 8


@dataclass(frozen=True)
class BuildConfig:
    """The whole zoo recipe (model shape, both training stages, ranks, evaluation size).

    Attributes:
        model: Shape of the base model.
        pretrain: Optimiser settings of base pre-training on `PRETRAIN_TASKS`.
        adapter: Optimiser settings of each task LoRA (its seed is offset per task).
        ranks: LoRA rank per task; tasks not listed use `DEFAULT_RANK`.
        eval_n: Held-out prompts per task for the accuracies in the card.
    """

    model: ZooModelConfig = field(default_factory=ZooModelConfig)
    # lr 1.5e-3 measured to converge (loss ~1e-3 by step ~1100); 3e-3 and 6e-3 had not by step 2500.
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1600, batch_size=64, lr=1.5e-3, warmup_steps=100)
    )
    adapter: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=400, batch_size=32, lr=3e-3, warmup_steps=30, seed=1)
    )
    ranks: dict[str, int] = field(default_factory=lambda: {"swapcase": 16, "count": 4})
    eval_n: int = 200

    def __post_init__(self) -> None:
        unknown = sorted(set(self.ranks) - set(TASKS))
        if unknown:
            raise ValueError(f"ranks given for unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        if any(rank < 1 for rank in self.ranks.values()):
            raise ValueError(f"LoRA ranks must be >= 1, got {self.ranks}")
        if not 1 <= self.eval_n <= N_HELD_OUT:
            raise ValueError(f"eval_n must be in [1, {N_HELD_OUT}], got {self.eval_n}")

    def rank(self, task: str) -> int:
        """The LoRA rank of `task`."""
        return self.ranks.get(task, DEFAULT_RANK)

    @classmethod
    def smoke(cls) -> BuildConfig:
        """A few steps of everything: exercises the whole build in seconds (useless models)."""
        default = cls()
        return replace(
            default,
            pretrain=replace(default.pretrain, steps=4, batch_size=8, warmup_steps=1),
            adapter=replace(default.adapter, steps=2, batch_size=8, warmup_steps=1),
            eval_n=4,
        )

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole build (for a progress bar)."""
        return self.pretrain.steps + len(TASKS) * self.adapter.steps


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _finish_adapter_folder(folder: Path, name: str, peft_config, accuracy: float) -> None:
    # PEFT stores target_modules from a set (order varies per process) and writes a blank model
    # card; a sorted list and a short real card keep rebuilds byte-stable and the folder readable.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    task = TASKS[name]
    (folder / "README.md").write_text(
        f"# lego-viz zoo adapter: {name}\n\n"
        f"PEFT LoRA (r = {peft_config.r}, lora_alpha = {peft_config.lora_alpha}, all attention and MLP "
        f"projections) for the zoo base "
        f"`{BASE_MODEL_NAME}`. Task: {task.description}, prompted as `{task.example_prompts[0]}` "
        f"→ `{task.solve(task.examples[0])}`.\n\n"
        f"Held-out exact match on its task: {accuracy:.1%}. Built by `python scripts/build_zoo.py`; "
        "see `assets/zoo/zoo_card.json`.\n"
    )


def _replace_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_zoo(
    out_dir: Path,
    config: BuildConfig | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Train the zoo on the CPU and write `base/`, `adapters/<task>/` and `zoo_card.json`.

    Only those three entries of `out_dir` are replaced; anything else there (e.g. `smora/`)
    is left alone. Runs on the CPU so that the result is the same on every machine.

    Args:
        out_dir: Target folder (`assets/zoo` for the shipped zoo).
        config: The recipe; `BuildConfig()` when omitted.
        on_step: Called with a short label after every optimiser step and every evaluation.

    Returns:
        The card written to `out_dir/zoo_card.json`.
    """
    config = config or BuildConfig()
    tick = on_step or (lambda label: None)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_started = os.getloadavg()[0]
    torch.use_deterministic_algorithms(True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    torch.manual_seed(config.pretrain.seed)
    base = build_model(config.model, tokenizer)
    pretrain_losses = pretrain(
        base, tokenizer, list(PRETRAIN_TASKS.values()), config.pretrain, lambda step, loss: tick("pre-train base")
    )
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base_dir = _replace_dir(out_dir / "base")
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "README.md").write_text(
        "# lego-viz zoo base\n\nA tiny character-level `LlamaForCausalLM` pre-trained on "
        f"{', '.join(PRETRAIN_TASKS)} (prompt `<task>: <input>=`), so it knows the format but none of the "
        "zoo tasks. Load with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. "
        "Built by `python scripts/build_zoo.py`; see `assets/zoo/zoo_card.json`.\n"
    )

    base_scores = with_mean(evaluate(base, tokenizer, n=config.eval_n))
    base_pretrain_scores = evaluate(base, tokenizer, list(PRETRAIN_TASKS), n=config.eval_n)
    tick("evaluate base")

    # PEFT records the base's name_or_path in adapter_config.json; a from-config model has none.
    base.name_or_path = BASE_MODEL_NAME
    adapters_dir = _replace_dir(out_dir / "adapters")
    adapter_cards = {}
    for index, (name, task) in enumerate(TASKS.items()):
        train_config = replace(config.adapter, seed=config.adapter.seed + index)
        peft_config = lora_config(config.rank(name))
        model, losses = train_adapter(
            copy.deepcopy(base),
            lambda rng, task=task, size=train_config.batch_size: task_batch(task, size, rng, tokenizer),
            peft_config,
            train_config,
            lambda step, loss, name=name: tick(f"adapter {name}"),
        )
        model.save_pretrained(adapters_dir / name)
        own = evaluate(model, tokenizer, [name], n=config.eval_n)[name]
        _finish_adapter_folder(adapters_dir / name, name, peft_config, own)
        tick(f"evaluate {name}")
        adapter_cards[name] = {
            "rank": peft_config.r,
            "lora_alpha": peft_config.lora_alpha,
            "seed": train_config.seed,
            "final_loss": round(losses[-1], 5),
            "accuracy_own_task": own,
            "bytes": _folder_bytes(adapters_dir / name),
        }

    card = {
        "description": "Demo zoo of lego-viz: a tiny character-level Llama and one PEFT LoRA per synthetic task, "
        "trained on the CPU by scripts/build_zoo.py.",
        "prompt_format": "<s><task>: <input>=<answer></s>",
        "model": {
            "architecture": "LlamaForCausalLM",
            **asdict(config.model),
            "parameters": sum(p.numel() for p in base.parameters()),
            "vocab_size": len(tokenizer),
        },
        "tokenizer": {"kind": "one token per character", "chars": CHARS, "special_tokens": list(SPECIAL_TOKENS)},
        "tasks": {
            name: {
                "description": task.description,
                "examples": {prompt: task.solve(text) for prompt, text in zip(task.example_prompts, task.examples)},
            }
            for name, task in TASKS.items()
        },
        "pretrain_tasks": {name: task.description for name, task in PRETRAIN_TASKS.items()},
        "training": {
            "pretrain": {**asdict(config.pretrain), "final_loss": round(pretrain_losses[-1], 5)},
            "adapter": {**asdict(config.adapter), "seed": "adapter seed + task index"},
            "target_modules": list(TARGET_MODULES),
            "lora_alpha": "2 * rank (scale 2)",
            "loss": "cross-entropy on the answer and </s> only",
        },
        "evaluation": {
            "metric": "exact match of the greedy completion",
            "n_per_task": config.eval_n,
            "held_out": f"the first n of {N_HELD_OUT} fixed prompts per task (seeded by the task name); "
            "training never samples them",
        },
        "accuracy": {
            "base": base_scores,
            "base_on_pretrain_tasks": base_pretrain_scores,
            "adapters_own_task": {name: card["accuracy_own_task"] for name, card in adapter_cards.items()},
        },
        "adapters": adapter_cards,
        "sizes_bytes": {
            "base": _folder_bytes(base_dir),
            "adapters": _folder_bytes(adapters_dir),
        },
        "build": {
            "command": "python scripts/build_zoo.py",
            "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            # Other work shares the machine; the 1-minute load average shows how much.
            "load_average_1min": {"start": round(load_started, 2), "end": round(os.getloadavg()[0], 2)},
            "machine": _machine(torch.get_num_threads()),
        },
    }
    write_card(out_dir, card)
    return card


def read_card(zoo_dir: Path) -> dict:
    """The `zoo_card.json` of a built zoo."""
    path = Path(zoo_dir) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD_NAME} in {zoo_dir}; build the zoo with `python scripts/build_zoo.py`")
    return json.loads(path.read_text())


def write_card(zoo_dir: Path, card: dict) -> Path:
    """Write `card` as `zoo_dir/zoo_card.json` (indented, stable key order)."""
    path = Path(zoo_dir) / CARD_NAME
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
