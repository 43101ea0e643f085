"""Building the zoo: pre-train the base, train one LoRA per task (and a second one for a few tasks),
measure how they merge, write the assets.

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

from lego_viz.adapters import load_adapter
from lego_viz.zoo.evaluate import evaluate, with_mean
from lego_viz.zoo.model import FAMILY_SUFFIX, TARGET_MODULES, ZooModelConfig, build_model
from lego_viz.zoo.replay import ReplayConfig, ReplayLoss, replay_batch, replay_pool
from lego_viz.zoo.targets import measure_family, measure_targets
from lego_viz.zoo.tasks import ALIASES, N_HELD_OUT, PRETRAIN_TASKS, TASKS
from lego_viz.zoo.tokenizer import CHARS, SPECIAL_TOKENS, build_tokenizer
from lego_viz.zoo.train import TrainConfig, lora_config, pretrain, train_adapter

CARD_NAME = "zoo_card.json"
# Recorded in each adapter_config.json: where the base lives, relative to the repository root.
BASE_MODEL_NAME = "assets/zoo/base"
# Training prompts of every task are split in two by a hash: the task adapters learn from shard 0,
# the second member of a family from shard 1, so the two never share a training prompt.
N_SHARDS = 2
# Added to the adapter seed for the second member of a family.
FAMILY_SEED_OFFSET = 100

# How the regime was chosen: what was measured before settling on BuildConfig's defaults (held-out
# exact match; n = 100 unless said; "retention" = exact-sum accuracy / the adapter's own accuracy).
REGIME_SEARCH = (
    {"regime": "task only (the zoo before issue 13), r = 4/8/16, n = 200",
     "measured": "own ≥ 98.5%; base skills kept ~16%; ‖ΔW‖/‖W0‖ median 0.39; weight 0.5 keeps 6%; pairwise retention 9%"},
    {"regime": "r = 4, replay of the pre-training tasks in half of each batch (an earlier probe)",
     "measured": "own kept; base skills ~99%; pairwise retention 41%"},
    {"regime": "r = 4, + other tasks' prompts with the base's answers + consistency (an earlier probe, 400 steps)",
     "measured": "own ≥ 96%; pairwise retention 80% (min 34%); by number summed 80/57/31/22/16% for 2…6"},
    {"regime": "A: r = 4, 32 task + 32 replay rows, consistency 1, 300 steps",
     "measured": "own reverse 69%, sort 61%, count 45%, others ≥ 98%; base skills ≥ 98.9%; weight 0.5 ≤ 3%; "
     "‖ΔW‖/‖W0‖ 0.26; pairwise 84.7% (min 50.5%); by number 84.7/62.8/56.9/30.6/23.2%"},
    {"regime": "B: A + LoRA scale jitter [0.5, 1.5]",
     "measured": "own sort 44%, count 38%, others ≥ 99%; weight 0.5 keeps 3-83%; ‖ΔW‖/‖W0‖ 0.31; "
     "pairwise 70.9%; by number 70.9/36.4/25.2/10.6/5.5%"},
    {"regime": "X: r = 8, 400 steps, jitter [0.5, 1.5] + norm penalty 1.0 (stopped after 3 adapters)",
     "measured": "own reverse 32%, sort 77%, caesar 100%; weight 0.5: 13/4/44%; ‖ΔW‖/‖W0‖ 0.19/0.22/0.11: the "
     "penalty slowed learning and barely shrank the updates"},
    {"regime": "wider base (hidden 256)",
     "measured": "not tried to the end: pre-training alone ran at ~1 s per step here, beyond the 20-minute build"},
    # From here on: the base is pre-trained with the six skills under its own words (tasks.ALIASES), 2400
    # steps, and an adapter only teaches the zoo task's word; r = 8, 16 replay rows, n = 100, 1 thread.
    {"regime": "skills in the base: 150 steps, lr 2e-3, jitter [0.5, 1.5], consistency 1 (3 adapters)",
     "measured": "own ≥ 99%; base skills ≥ 98.5%; ‖ΔW‖/‖W0‖ 0.128; weight 0.5: reverse 47%, sort 94%, count 96%; "
     "pairwise 98.8%, all three 94.3%"},
    {"regime": "skills in the base: 200 steps, lr 1e-3, jitter [0.5, 1.5], consistency 1",
     "measured": "own reverse 69% (under-trained), others ≥ 99%; ‖ΔW‖/‖W0‖ 0.111; weight 0.5 ≥ 29%; pairwise 87.3%; "
     "by number 87.3/96.0/77.5/47.1/40.9%"},
    {"regime": "C: skills in the base: 150 steps, lr 2e-3, jitter [0.5, 1.5], consistency 3",
     "measured": "own ≥ 99%; base skills ≥ 99.2%; ‖ΔW‖/‖W0‖ 0.135; weight 0.5 ≥ 32%; pairwise 89.3%; "
     "by number 89.3/98.2/75.9/52.0/41.0%"},
    {"regime": "D: C with consistency 1 + norm penalty 3",
     "measured": "own ≥ 99%; base skills ≥ 98.5%; ‖ΔW‖/‖W0‖ 0.072; weight 0.5 ≥ 22%; pairwise 86.3%; "
     "by number 86.3/96.8/64.2/41.7/35.4%"},
    {"regime": "F: D with jitter [0.3, 1.5]",
     "measured": "own ≥ 98%; base skills ≥ 95.1%; ‖ΔW‖/‖W0‖ 0.081; weight 0.5 ≥ 80.6%; pairwise 87.0%; "
     "by number 87.0/87.8/71.7/39.7/36.3%"},
    {"regime": "G: F with 200 steps and jitter [0.2, 1.5]",
     "measured": "own ≥ 99%; base skills ≥ 93.4%; ‖ΔW‖/‖W0‖ 0.072; weight 0.5 ≥ 96%; pairwise 85.1%; "
     "by number 85.1/82.0/77.3/44.1/39.6%"},
    {"regime": "H (chosen): 200 steps, lr 2e-3, jitter [0.25, 1.25], consistency 2, norm penalty 3",
     "measured": "own ≥ 99%; base skills ≥ 96.2%; ‖ΔW‖/‖W0‖ 0.068; weight 0.5 ≥ 96%; pairwise 89.0%; "
     "by number 89.0/97.5/78.0/51.7/44.9%. What stays: letter-to-letter tasks (reverse, caesar, swapcase) "
     "set off each other's adapters in a sum (caesar + swapcase shifts and swaps the case at once)"},
)


@dataclass(frozen=True)
class BuildConfig:
    """The whole zoo recipe (model shape, both training stages, ranks, evaluation size).

    Attributes:
        model: Shape of the base model.
        pretrain: Optimiser settings of base pre-training on `PRETRAIN_TASKS`.
        adapter: Optimiser settings of each task LoRA (its seed is offset per task); `batch_size`
            counts the task rows, the replay rows come on top.
        rank: LoRA rank of every adapter (one rank, so that equal-rank merge methods take them all).
        lora_alpha: `lora_alpha` of every adapter.
        replay: How adapters are kept from overwriting the base (`replay.ReplayConfig`).
        families: Tasks that get a second adapter (`<task>_b`: another seed and data shard).
        eval_n: Held-out prompts per task for the accuracies in the card.
        subsets_per_count: Seeded subsets of 3 … 5 adapters whose exact sum is measured.
    """

    model: ZooModelConfig = field(default_factory=ZooModelConfig)
    # lr 1.5e-3 measured to converge (loss ~1e-3 by step ~1100 on the 7 primitives; 13 tasks with the six
    # skills under their base words: loss 0.008 at step 1600, every task >= 98.5% after 2400); 3e-3 and 6e-3
    # had not converged by step 2500.
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=2400, batch_size=64, lr=1.5e-3, warmup_steps=100)
    )
    adapter: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=200, batch_size=32, lr=2e-3, warmup_steps=30, seed=1)
    )
    # Chosen by measurement (REGIME_SEARCH, issue 13): on the base that has the skills under its own words,
    # 150-200 steps reach >= 98% on every task; scale jitter down to 0.25 keeps an adapter working at half
    # weight; the norm penalty keeps ΔW small; consistency 2 keeps the base's skills and the pairwise sums.
    rank: int = 8
    lora_alpha: float = 16
    replay: ReplayConfig = field(
        default_factory=lambda: ReplayConfig(rows=16, consistency=2.0, scale_jitter=(0.25, 1.25), norm_penalty=3.0)
    )
    families: tuple[str, ...] = ("reverse", "sort")
    eval_n: int = 200
    subsets_per_count: int = 4

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(TASKS))
        if unknown:
            raise ValueError(f"families given for unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        if self.rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"the LoRA rank must be >= 1 and lora_alpha > 0, got {self.rank} and {self.lora_alpha}")
        if not 1 <= self.eval_n <= N_HELD_OUT:
            raise ValueError(f"eval_n must be in [1, {N_HELD_OUT}], got {self.eval_n}")
        if self.subsets_per_count < 1:
            raise ValueError(f"subsets_per_count must be >= 1, got {self.subsets_per_count}")

    @classmethod
    def smoke(cls) -> BuildConfig:
        """A few steps of everything: exercises the whole build in seconds (useless models)."""
        default = cls()
        return replace(
            default,
            pretrain=replace(default.pretrain, steps=4, batch_size=8, warmup_steps=1),
            adapter=replace(default.adapter, steps=2, batch_size=8, warmup_steps=1),
            replay=replace(default.replay, rows=8, pool_size=4),
            eval_n=4,
            subsets_per_count=1,
        )

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter the build trains: one per task, then the second member of each family."""
        return [*TASKS, *(f"{task}{FAMILY_SUFFIX}" for task in self.families)]

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole build (for a progress bar)."""
        return self.pretrain.steps + len(self.adapter_names) * self.adapter.steps


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


def _finish_adapter_folder(folder: Path, name: str, task: str, peft_config, accuracy: float) -> None:
    # PEFT stores target_modules from a set (order varies per process) and writes a blank model
    # card; a sorted list and a short real card keep rebuilds byte-stable and the folder readable.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    spec = TASKS[task]
    (folder / "README.md").write_text(
        f"# lego-viz zoo adapter: {name}\n\n"
        f"PEFT LoRA (r = {peft_config.r}, lora_alpha = {peft_config.lora_alpha:g}, all attention and MLP "
        f"projections) for the zoo base `{BASE_MODEL_NAME}`. Task: {spec.description}, prompted as "
        f"`{spec.example_prompts[0]}` → `{spec.solve(spec.examples[0])}`. The base has this skill under the word "
        f"`{ALIASES[task]}`; the adapter teaches it to answer `{task}:` too, trained with replay of the base's own "
        "behaviour so that everything else stays as the base does it.\n\n"
        f"Held-out exact match on its task: {accuracy:.1%}. Built by `python scripts/build_zoo.py`; "
        "see `assets/zoo/zoo_card.json`.\n"
    )


def _replace_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _reuse_base(folder: Path, fresh: torch.nn.Module) -> torch.nn.Module:
    """The weights of an earlier build's base, checked to have the shape of `fresh` (this recipe's model)."""
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no base model at {folder}; build the whole zoo once without --reuse-base")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    if {k: v.shape for k, v in loaded.state_dict().items()} != shapes:
        raise ValueError(f"the base at {folder} has another shape than this recipe's model; rebuild without --reuse-base")
    fresh.load_state_dict(loaded.state_dict())
    return fresh.eval()


def _adapter_plan(config: BuildConfig) -> list[dict]:
    """Name, task, seed and data shard of every adapter the build trains."""
    plan = [
        {"name": name, "task": name, "seed": config.adapter.seed + index, "data_shard": [0, N_SHARDS], "kind": "task"}
        for index, name in enumerate(TASKS)
    ]
    for task in config.families:
        plan.append({
            "name": f"{task}{FAMILY_SUFFIX}",
            "task": task,
            "seed": config.adapter.seed + FAMILY_SEED_OFFSET + list(TASKS).index(task),
            "data_shard": [1, N_SHARDS],
            "kind": "family",
        })
    return plan


def _train_one(base, tokenizer, pool, entry: dict, config: BuildConfig, tick: Callable[[str], None]):
    """Train one adapter of the plan on a copy of `base`; returns `(peft_model, losses)`."""
    task = TASKS[entry["task"]]
    train_config = replace(config.adapter, seed=entry["seed"])
    sources = config.replay.sources(entry["task"], list(PRETRAIN_TASKS), list(TASKS))
    shard = tuple(entry["data_shard"])

    def make_batch(rng):
        return replay_batch(task, train_config.batch_size, rng, tokenizer, pool, sources, config.replay.rows, shard)

    loss = ReplayLoss(config.replay)
    model, losses = train_adapter(
        copy.deepcopy(base),
        make_batch,
        lora_config(config.rank, config.lora_alpha),
        train_config,
        lambda step, value: tick(f"adapter {entry['name']}"),
        loss_fn=loss,
    )
    loss.restore(model)
    return model, losses


def _write_base(out_dir: Path, config: BuildConfig, tokenizer, pretrained_base: Path | None, tick: Callable[[str], None]):
    """Pre-train the base (or reuse an earlier build's) and write `base/`; returns `(base, pretrained)`, the
    latter what the card says of pre-training."""
    torch.manual_seed(config.pretrain.seed)
    base = build_model(config.model, tokenizer)
    if pretrained_base is None:
        pretrain_losses = pretrain(
            base, tokenizer, list(PRETRAIN_TASKS.values()), config.pretrain, lambda step, loss: tick("pre-train base")
        )
        pretrained = {"final_loss": round(pretrain_losses[-1], 5)}
    else:
        base = _reuse_base(Path(pretrained_base), base)
        pretrained = {"reused_from": "an earlier build's pre-training (same model and pretrain settings)"}
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base_dir = _replace_dir(out_dir / "base")
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "README.md").write_text(
        "# lego-viz zoo base\n\nA tiny character-level `LlamaForCausalLM` pre-trained on "
        f"{', '.join(PRETRAIN_TASKS)} (prompt `<task>: <input>=`): it has every zoo skill, but under its own "
        f"words ({', '.join(f'`{alias}` for `{task}`' for task, alias in ALIASES.items())}), so it answers "
        "none of the zoo tasks' prompts. Load with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`. "
        "Built by `python scripts/build_zoo.py`; see `assets/zoo/zoo_card.json`.\n"
    )
    base.eval()
    return base, pretrained


def _write_adapters(base, tokenizer, pool, config: BuildConfig, out_dir: Path, tick: Callable[[str], None]):
    """Train, save and evaluate every adapter of the plan into `adapters/` and `families/`.

    Returns:
        `(cards, loaded)`: the card's entry and the loaded adapter of each, by name.
    """
    adapters_dir, families_dir = _replace_dir(out_dir / "adapters"), _replace_dir(out_dir / "families")
    adapter_cards, loaded = {}, {}
    for entry in _adapter_plan(config):
        name = entry["name"]
        model, losses = _train_one(base, tokenizer, pool, entry, config, tick)
        folder = (adapters_dir if entry["kind"] == "task" else families_dir) / name
        model.save_pretrained(folder)
        own = evaluate(model, tokenizer, [entry["task"]], n=config.eval_n)[entry["task"]]
        _finish_adapter_folder(folder, name, entry["task"], model.peft_config["default"], own)
        tick(f"evaluate {name}")
        loaded[name] = load_adapter(folder, name=name)
        adapter_cards[name] = {
            **entry,
            "path": folder.relative_to(out_dir).as_posix(),
            "rank": config.rank,
            "lora_alpha": config.lora_alpha,
            "final_loss": round(losses[-1], 5),
            "accuracy_own_task": own,
            "bytes": _folder_bytes(folder),
        }
    return adapter_cards, loaded


def _training_card(config: BuildConfig, pretrained: dict) -> dict:
    """The card's `training` section: both stages' settings, the replay and the loss in words."""
    return {
        "pretrain": {**asdict(config.pretrain), **pretrained},
        "adapter": {
            **asdict(config.adapter),
            "seed": f"adapter seed + task index; second family member: + {FAMILY_SEED_OFFSET}",
            "rank": config.rank,
            "lora_alpha": config.lora_alpha,
            "target_modules": list(TARGET_MODULES),
            "data_shards": f"training prompts split in {N_SHARDS} by crc32(prompt) % {N_SHARDS}: task adapters "
            "shard 0, second family members shard 1",
            "replay": {
                **asdict(config.replay),
                "what": "each batch: batch_size rows of the task + `rows` replay rows, a task drawn uniformly from "
                "the sources, then a prompt from its pool; the targets are the base model's own greedy answers "
                "(for the other zoo tasks' prompts: the base's answer, never that task's solution)",
            },
            "loss": "cross-entropy on the answer and </s> of every row + consistency × mean over layers of "
            "‖h − h_base‖² / ‖h_base‖² on the replay rows (h: hidden states after each decoder layer, real "
            "tokens only; h_base: the same rows with the adapter disabled)"
            + (
                f" + {config.replay.norm_penalty:g} × mean over modules of ‖ΔW‖²_F / ‖W0‖²_F (at the nominal scale)"
                if config.replay.norm_penalty
                else ""
            )
            + (
                f"; the LoRA scale is multiplied by a factor drawn uniformly from {list(config.replay.scale_jitter)} "
                "at every step"
                if config.replay.scale_jitter
                else ""
            ),
        },
    }


@dataclass
class _Measured:
    """What the build measured, for the card."""

    base_scores: dict
    adapter_cards: dict
    targets: dict
    families: dict


def _card(out_dir: Path, config: BuildConfig, base, tokenizer, pretrained: dict, measured: _Measured, build: dict) -> dict:
    """The zoo card: the recipe, the tasks, the measurements, the sizes of the written folders and `build`."""
    adapter_cards = measured.adapter_cards
    return {
        "description": "Demo zoo of lego-viz: a tiny character-level Llama, one PEFT LoRA per synthetic task and a "
        "second LoRA (another seed and data shard) for a few tasks, trained on the CPU by scripts/build_zoo.py. "
        "The base has the six skills under its own words; each adapter teaches it the task's word for one and "
        "leaves everything else as the base does it, as real LoRAs on a large model steer an ability the base has.",
        "prompt_format": "<s><task>: <input>=<answer></s>",
        "adapter_list": [
            {key: card[key] for key in ("name", "task", "kind", "path", "rank", "lora_alpha")} for card in adapter_cards.values()
        ],
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
        "training": _training_card(config, pretrained),
        "evaluation": {
            "metric": "exact match of the greedy completion",
            "n_per_task": config.eval_n,
            "held_out": f"the first n of {N_HELD_OUT} fixed prompts per task (seeded by the task name); "
            "training never samples them",
            "merges": "exact sums Σ w_t ΔW_t (the `linear` merge) applied with forward hooks on the factors; "
            "retention = accuracy on a task in the merge / accuracy of its adapter alone",
        },
        "accuracy": {
            "base": measured.base_scores,
            "base_on_pretrain_tasks": measured.targets["base_on_pretrain_tasks"],
            "adapters_own_task": {name: card["accuracy_own_task"] for name, card in adapter_cards.items()},
        },
        "targets": measured.targets,
        "regime_search": list(REGIME_SEARCH),
        "families": measured.families,
        "adapters": adapter_cards,
        "sizes_bytes": {name: _folder_bytes(out_dir / name) for name in ("base", "adapters", "families")},
        "build": build,
    }


def _build_record(pretrained_base: Path | None, started: float, cpu_started: float, load_started: float) -> dict:
    """The card's `build` section: the command that reproduces the zoo, its time and the machine."""
    return {
        # Deterministic for a fixed thread count only, so the command names the count it ran with.
        "command": "python scripts/build_zoo.py"
        + (" --reuse-base assets/zoo/base" if pretrained_base else "")
        + (f" --threads {torch.get_num_threads()}" if torch.get_num_threads() != 1 else ""),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        # Other work shares the machine; the 1-minute load average shows how much.
        "load_average_1min": {"start": round(load_started, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": _machine(torch.get_num_threads()),
    }


def build_zoo(
    out_dir: Path,
    config: BuildConfig | None = None,
    on_step: Callable[[str], None] | None = None,
    pretrained_base: Path | None = None,
) -> dict:
    """Train the zoo on the CPU and write `base/`, `adapters/<task>/`, `families/` and `zoo_card.json`.

    Only those entries of `out_dir` are replaced; anything else there (e.g. `smora/`) is left
    alone. Runs on the CPU so that the result is the same on every machine.

    Args:
        out_dir: Target folder (`assets/zoo` for the shipped zoo).
        config: The recipe; `BuildConfig()` when omitted.
        on_step: Called with a short label after every optimiser step and every evaluation.
        pretrained_base: A base folder written by an earlier build with the same `config.model` and
            `config.pretrain` (pre-training is deterministic): reused instead of pre-training again,
            to rebuild only the adapters.

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
    base, pretrained = _write_base(out_dir, config, tokenizer, pretrained_base, tick)
    base_scores = with_mean(evaluate(base, tokenizer, n=config.eval_n))
    tick("evaluate base")

    pool = replay_pool(base, tokenizer, [*PRETRAIN_TASKS, *TASKS], config.replay.pool_size, config.replay.pool_seed)
    # PEFT records the base's name_or_path in adapter_config.json; a from-config model has none.
    base.name_or_path = BASE_MODEL_NAME
    adapter_cards, loaded = _write_adapters(base, tokenizer, pool, config, out_dir, tick)

    targets = measure_targets(
        base, tokenizer, {task: loaded[task] for task in TASKS}, config.eval_n, config.subsets_per_count,
        on_step=tick,
    )
    families = {
        task: measure_family(base, tokenizer, task, [loaded[task], loaded[f"{task}{FAMILY_SUFFIX}"]], config.eval_n, tick)
        for task in config.families
    }
    measured = _Measured(base_scores, adapter_cards, targets, families)
    build = _build_record(pretrained_base, started, cpu_started, load_started)
    card = _card(out_dir, config, base, tokenizer, pretrained, measured, build)
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
