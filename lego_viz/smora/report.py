"""Markdown tables of the SMoRA experiment results (pasted into the README)."""

from __future__ import annotations

from collections.abc import Callable


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(results: dict, labels: dict[str, str], extra: dict[str, Callable[[dict], str]]) -> list[str]:
    tasks = results["tasks"]
    header = ["model", *extra, *tasks, "mean"]
    lines = [_row(header), _row(["---"] * len(header))]
    for key, label in labels.items():
        run = results["runs"].get(key)
        if run is None:
            continue
        accuracy = run["accuracy"]
        lines.append(_row([label, *(fn(run) for fn in extra.values()), *(_percent(accuracy[t]) for t in tasks),
                           f"**{_percent(accuracy['mean'])}**"]))
    return lines


def _balance(run: dict) -> str:
    if "load_balance_end" not in run:
        return "–"
    return f"{run['load_balance_end']:.2f} / {run['load_balance_eval']:.2f}"


def results_markdown(results: dict) -> str:
    """Two markdown tables: multi-task SMoRA vs dense LoRAs, and the router over merged MSUs vs static merges.

    Args:
        results: What `run_experiment` returned (or `results.json`).

    Returns:
        Markdown text with both tables and a line of settings under each.
    """
    s = results["settings"]
    r, k, router_k = s["r"], s["k"], s["router_k"]
    units = results["runs"].get("merged_router", {}).get("units", "n")
    worst = f"{units / router_k:g}" if isinstance(units, int) else "n/k"
    first = _table(
        results,
        {
            "smora": f"SMoRA r={r}, k={k}, balanced (γ={s['gamma']:g})",
            "smora_no_balance": f"SMoRA r={r}, k={k}, no balancing",
            "lora_r": f"dense LoRA r={r}",
            "lora_k": f"dense LoRA r={k}",
            "base": "base model",
        },
        {
            "active ranks / token": lambda run: str(run["active_ranks"]),
            "trainable params": lambda run: f"{run['trainable_params']:,}",
            "max(c)/mean(c) train end / held-out": _balance,
        },
    )
    second = _table(
        results,
        {
            "merged_router": f"router over merged MSUs, k={router_k} of {units} units (dynamic), no balancing",
            "merged_router_balanced": f"router over merged MSUs, k={router_k} of {units} units (dynamic), balanced (γ={s['gamma']:g})",
            "linear": f"linear: exact sum (rank {units}, static)",
            "svd": f"svd, rank {router_k} (static)",
            "lego": f"lego, k={router_k} (static)",
            "own_adapter": "each task's own adapter (ceiling)",
            "base": "base model",
        },
        {"max(c)/mean(c) train end / held-out": _balance},
    )
    settings = (
        f"Exact-match accuracy (%) on {s['eval_n']} held-out prompts per task, greedy decoding. "
        f"Multi-task runs: {s['steps']} steps × {s['batch_size']} examples, lr {s['lr']:g}, seed {s['seed']}, "
        f"device {s['device']}. Load balance `max(c)/mean(c)`: 1 is even, {r / k:g} is the worst for k of r."
    )
    router = (
        f"Router: only W_g (and β) train, {s['router_steps']} steps, lr {s['router_lr']:g}; the MSUs stay frozen. "
        f"Static merges: `lego_viz.merge.merge()` with default options; worst load balance {worst}."
    )
    return "\n".join(["#### Multi-task SMoRA vs dense LoRA", "", *first, "", settings, "",
                      "#### Dynamic vs static composition of the same MSUs", "", *second, "", router, ""])
