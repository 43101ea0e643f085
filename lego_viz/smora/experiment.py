"""The zoo SMoRA experiment behind `scripts/train_smora.py` and the README tables.

Two questions on the demo zoo:

1. Multi-task SMoRA (k of r ranks active per token) vs a dense LoRA of rank r and one of rank k, all
   trained the same way on the mixture of zoo tasks; load balance with and without loss-free balancing.
2. Dynamic vs static composition of the same units: a router trained over the frozen, concatenated MSUs
   of the zoo task adapters (k active per token) vs the static merges of those adapters (linear = exact
   sum, svd and lego at rank k), with each task's own adapter as the ceiling.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lego_viz.adapters import load_adapter
from lego_viz.checks.invariance import lora_hooks
from lego_viz.merge import merge
from lego_viz.smora.assets import base_fingerprint
from lego_viz.smora.config import SMoRAConfig
from lego_viz.smora.inject import inject_smora, smora_parameters
from lego_viz.smora.io import save_smora
from lego_viz.smora.merged import inject_merged_router
from lego_viz.smora.probe import task_routing
from lego_viz.smora.routing import load_balance
from lego_viz.smora.train import TrainConfig, TrainHistory, train_smora
from lego_viz.zoo.data import mixture_batch
from lego_viz.zoo.evaluate import evaluate, with_mean
from lego_viz.zoo.model import TARGET_MODULES, ZOO_DIR, adapter_dirs, default_device, load_base
from lego_viz.zoo.tasks import TASKS, held_out
from lego_viz.zoo.train import lora_config, train_adapter

MULTITASK_NAME = "multitask"
ROUTER_NAME = "merged_router"
STATIC_METHODS = ("linear", "svd", "lego")
# Held-out texts per task for the load-balance figure measured after training.
_LOAD_TEXTS = 64
# Fraction of the last training steps averaged for the end-of-training load balance.
_TAIL = 0.1


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings of the whole experiment (all recorded in the results).

    Args:
        r: Ranks of the multi-task SMoRA adapter (and of the large dense LoRA).
        k: Active ranks per token (and rank of the small dense LoRA).
        gamma: Loss-free balancing step (the toy model needs more than the reference 1e-5).
        steps: Training steps of the multi-task adapters.
        batch_size: Examples per step (drawn uniformly over tasks).
        lr: Peak learning rate of the multi-task adapters.
        router_k: Active units per token of the router over merged MSUs, and k of the static merges.
        router_steps: Training steps of that router.
        router_lr: Its peak learning rate.
        eval_n: Held-out prompts per task for accuracy.
        seed: Seeds initialisation and batches of every run.
    """

    r: int = 32
    k: int = 8
    gamma: float = 1e-3
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    router_k: int = 8
    router_steps: int = 400
    router_lr: float = 3e-2
    eval_n: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        SMoRAConfig(r=self.r, k=self.k, gamma=self.gamma)  # validates r, k and gamma
        for name in ("steps", "batch_size", "router_k", "router_steps", "eval_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.router_lr <= 0:
            raise ValueError("learning rates must be > 0")

    def smora(self, gamma: float | None = None) -> SMoRAConfig:
        """The multi-task SMoRA config; `lora_alpha = 2k` gives an active rank the zoo adapters' scale 2."""
        return SMoRAConfig(
            r=self.r, k=self.k, lora_alpha=2.0 * self.k, target_modules=TARGET_MODULES,
            gamma=self.gamma if gamma is None else gamma,
        )

    def train(self, router: bool = False) -> TrainConfig:
        steps = self.router_steps if router else self.steps
        return TrainConfig(
            steps=steps, batch_size=self.batch_size, lr=self.router_lr if router else self.lr,
            warmup_steps=min(50, steps // 10), seed=self.seed,
        )


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _history(history: TrainHistory) -> dict:
    tail = max(1, int(len(history.load_balance) * _TAIL))
    return {
        "loss": [round(v, 4) for v in history.loss],
        "load_balance": [round(v, 4) for v in history.load_balance],
        "load_balance_end": sum(history.load_balance[-tail:]) / tail,
    }


def eval_load_balance(model: nn.Module, tokenizer, tasks: list[str]) -> float:
    """Mean over SMoRA layers of `max(c)/mean(c)` on held-out texts (prompt + answer) of `tasks`."""
    texts = {t: [p + a for p, a in held_out(t, _LOAD_TEXTS)] for t in tasks}
    routing = task_routing(model, tokenizer, texts)
    values = [load_balance(routing.load(m)) for m in routing.counts]
    return sum(values) / len(values)


class _Runner:
    """Shared plumbing of the runs: fresh bases, the batch source, evaluation, timing."""

    def __init__(self, config: ExperimentConfig, zoo_dir: Path, device: str, progress: bool) -> None:
        self.config, self.zoo_dir, self.device, self.progress = config, zoo_dir, device, progress
        self.tasks = list(TASKS)

    def record(self) -> dict:
        """Saved with each adapter: the experiment settings and the base it was trained on."""
        return {"experiment": asdict(self.config), "base_sha256": base_fingerprint(self.zoo_dir)}

    def base(self) -> tuple[nn.Module, object]:
        model, tokenizer = load_base(device=self.device, zoo_dir=self.zoo_dir)
        torch.manual_seed(self.config.seed)  # same adapter initialisation in every run
        return model, tokenizer

    def batches(self, tokenizer) -> Callable:
        tasks = [TASKS[t] for t in self.tasks]
        return lambda rng: mixture_batch(tasks, self.config.batch_size, rng, tokenizer)

    def accuracy(self, model: nn.Module, tokenizer, tasks: list[str] | None = None) -> dict[str, float]:
        return evaluate(model, tokenizer, tasks or self.tasks, n=self.config.eval_n)

    def smora_run(self, model: nn.Module, tokenizer, train: TrainConfig, desc: str) -> dict:
        start = time.perf_counter()
        history = train_smora(model, self.batches(tokenizer), train, desc=desc, progress=self.progress)
        seconds = time.perf_counter() - start
        return {
            "accuracy": with_mean(self.accuracy(model, tokenizer)),
            "trainable_params": _trainable(model),
            "active_ranks": model.smora_config.k,
            "gamma": model.smora_config.gamma,
            "load_balance_eval": eval_load_balance(model, tokenizer, self.tasks),
            "train_seconds": round(seconds, 1),
            **_history(history),
        }


def run_experiment(
    config: ExperimentConfig,
    zoo_dir: Path = ZOO_DIR,
    out_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every model of the experiment, save the two shipped SMoRA adapters, return the results.

    Args:
        config: Experiment settings.
        zoo_dir: The zoo (base model and task adapters).
        out_dir: Where to save `multitask/`, `merged_router/` (None: save nothing).
        device: Torch device; default CUDA when available.
        progress: Show progress bars.
        log: Receives one line per finished run.

    Returns:
        JSON-able results: settings, per-run accuracies, load balance and histories.
    """
    device = device or default_device()
    runner = _Runner(config, Path(zoo_dir), device, progress)
    runs: dict[str, dict] = {}

    model, tokenizer = runner.base()
    runs["base"] = {"accuracy": with_mean(runner.accuracy(model, tokenizer)), "trainable_params": 0, "active_ranks": 0}
    log(f"base: mean accuracy {runs['base']['accuracy']['mean']:.3f}")

    for label, gamma in (("smora", config.gamma), ("smora_no_balance", 0.0)):
        model, tokenizer = runner.base()
        inject_smora(model, config.smora(gamma))
        runs[label] = runner.smora_run(model, tokenizer, config.train(), label)
        if label == "smora" and out_dir is not None:
            save_smora(model, Path(out_dir) / MULTITASK_NAME, force=True, extra=runner.record())
        log(f"{label}: mean accuracy {runs[label]['accuracy']['mean']:.3f}, load balance {runs[label]['load_balance_end']:.2f}")

    for label, rank in (("lora_r", config.r), ("lora_k", config.k)):
        base, tokenizer = runner.base()
        start = time.perf_counter()
        model, losses = train_adapter(base, runner.batches(tokenizer), lora_config(rank), config.train())
        runs[label] = {
            "accuracy": with_mean(runner.accuracy(model, tokenizer)),
            "trainable_params": _trainable(model),
            "active_ranks": rank,
            "train_seconds": round(time.perf_counter() - start, 1),
            "loss": [round(v, 4) for v in losses],
        }
        log(f"{label} (r={rank}): mean accuracy {runs[label]['accuracy']['mean']:.3f}")

    runs.update(_composition_runs(runner, out_dir, log))
    return {"settings": _settings(runner), "tasks": runner.tasks, "runs": runs}


def _settings(runner: _Runner) -> dict:
    config = runner.config
    return {
        **asdict(config),
        "smora": config.smora().to_dict(),
        "train": asdict(config.train()),
        "router_train": asdict(config.train(router=True)),
        "device": runner.device,
        "base_sha256": base_fingerprint(runner.zoo_dir),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def rerun_composition(
    previous: dict,
    config: ExperimentConfig,
    zoo_dir: Path = ZOO_DIR,
    out_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Redo only the runs that use the zoo task adapters, keeping the others of `previous`.

    The multi-task and dense runs depend on the base model alone: after a rebuild of the task
    adapters on the same base (same fingerprint) and with the same settings they would come out
    identical, so only the router over merged MSUs, the static merges and the own-adapter ceiling
    are run again (and only `merged_router/` is rewritten).

    Args:
        previous: The results of an earlier `run_experiment` (its `results.json`).
        config: Experiment settings; must equal those of `previous`.
        zoo_dir: The zoo (base model and task adapters).
        out_dir: Where to save `merged_router/` (None: save nothing).
        device: Torch device; default CUDA when available.
        progress: Show progress bars.
        log: Receives one line per finished run.

    Returns:
        `previous` with the composition runs replaced.

    Raises:
        ValueError: The settings, device or base model differ from those of `previous`.
    """
    runner = _Runner(config, Path(zoo_dir), device or default_device(), progress)
    settings = _settings(runner)
    changed = sorted(
        key for key in ("base_sha256", "device", "torch_threads", *asdict(config))
        if previous.get("settings", {}).get(key) != settings[key]
    )
    if changed:
        raise ValueError(
            f"the earlier results differ in {', '.join(changed)}; run the whole experiment instead of --composition-only"
        )
    runs = {**previous["runs"], **_composition_runs(runner, out_dir, log)}
    return {**previous, "settings": settings, "runs": runs}


def _composition_runs(runner: _Runner, out_dir: Path | None, log: Callable[[str], None]) -> dict[str, dict]:
    """The router over merged MSUs, the static merges at the same k, and each task's own adapter."""
    config = runner.config
    adapters = [load_adapter(path, name=task) for task, path in adapter_dirs(runner.zoo_dir).items()]
    if [a.name for a in adapters] != runner.tasks:
        raise FileNotFoundError(
            f"the zoo at {runner.zoo_dir} has adapters for {[a.name for a in adapters]}, not all of {runner.tasks}; "
            "build it with `python scripts/build_zoo.py`"
        )
    runs: dict[str, dict] = {}
    # Balancing pushes every unit toward the same load, while task units should follow their task's
    # tokens (and tasks own different numbers of units): both are run, the unbalanced one is shipped.
    for label, gamma in (("merged_router", 0.0), ("merged_router_balanced", config.gamma)):
        model, tokenizer = runner.base()
        inject_merged_router(model, adapters, config.router_k, gamma=gamma)
        runs[label] = runner.smora_run(model, tokenizer, config.train(router=True), label)
        runs[label]["units"] = model.smora_config.r
        runs[label]["trainable_params"] = sum(p.numel() for p in smora_parameters(model))
        if label == "merged_router" and out_dir is not None:
            save_smora(model, Path(out_dir) / ROUTER_NAME, force=True, extra=runner.record())
        log(f"{label}: mean accuracy {runs[label]['accuracy']['mean']:.3f}, load balance {runs[label]['load_balance_end']:.2f}")

    base, tokenizer = runner.base()
    for method in STATIC_METHODS:
        merged = merge(adapters, method, k=None if method == "linear" else config.router_k)
        with lora_hooks(base, merged.modules):
            runs[method] = {
                "accuracy": with_mean(runner.accuracy(base, tokenizer)),
                "rank": max(merged.ranks.values()),
                "options": {key: value for key, value in merged.options.items() if key != "device"},
            }
        log(f"{method}: mean accuracy {runs[method]['accuracy']['mean']:.3f}")
    own = {}
    for adapter in adapters:
        with lora_hooks(base, adapter.modules):
            own.update(runner.accuracy(base, tokenizer, [adapter.name]))
    runs["own_adapter"] = {"accuracy": with_mean(own), "rank": adapters[0].ranks[0]}
    return runs
