"""The shipped SMoRA adapters load on the shipped zoo base and reproduce their recorded accuracies."""

from __future__ import annotations

import pytest
import torch

from lego_viz.smora import smora_layers
from lego_viz.smora.assets import load_shipped, shipped_adapters, shipped_results
from lego_viz.zoo.evaluate import evaluate

# The run of results.json whose weights each shipped folder holds.
RUN_OF = {"multitask": "smora", "merged_router": "merged_router"}

pytestmark = pytest.mark.skipif(
    set(shipped_adapters()) != set(RUN_OF) or shipped_results() is None,
    reason="shipped SMoRA assets not found in assets/zoo/smora (run `python scripts/train_smora.py`)",
)


@pytest.mark.parametrize("name", sorted(RUN_OF))
def test_shipped_adapter_reproduces_its_recorded_accuracy(name: str) -> None:
    results = shipped_results()
    run = results["runs"][RUN_OF[name]]
    model, tokenizer, config = load_shipped(name, device="cpu")  # also checks the base fingerprint
    assert len(smora_layers(model)) == 4 * 7  # every projection of the 4-layer zoo base
    assert config.k == (results["settings"]["k"] if name == "multitask" else results["settings"]["router_k"])
    tasks = ["reverse", "count"]  # the two hardest for these models: most sensitive to a wrong load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scores = evaluate(model, tokenizer, tasks, n=results["settings"]["eval_n"])
    finally:
        torch.set_num_threads(threads)
    # same prompts, greedy decoding, same weights: the recorded exact-match accuracy comes back
    assert scores == {t: run["accuracy"][t] for t in tasks}
